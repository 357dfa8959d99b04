//! Remote memory from a second NBD server implementation, `nbdkit` with its file plugin
//! (Debian: nbdkit), so that the client is not tied to qemu-nbd's behaviour: the client
//! reads pages back (several requests in flight, a read larger than one request split), a
//! lazy restore with userspace APF and clones restore from it with every checksum right.
//! Each test prints `SKIPPED: no /dev/kvm` or `SKIPPED: nbdkit not installed` and passes
//! where that is missing (and fails instead when `APFVM_REQUIRE_KVM=1`).

use std::time::Duration;

use harness::qemu_nbd::{Server, ServerKind};
use pager::nbd::{NbdClient, NbdClientConfig};
use pager::{NbdSource, NbdSourceConfig, PAGE_SIZE, PageSource};
use testkit::fixture::{
    assert_passed, manifest_only, restore_ok, restore_options, standard_snapshot,
};
use vmm::clones::{CloneOptions, restore_clones};
use vmm::source::SourceOptions;
use vmm::{ApfMode, ApfPath, NoObserver, RestoreOptions};

fn serve(file: &std::path::Path, socket: &std::path::Path) -> Server {
    Server::start_kind(ServerKind::Nbdkit, file, socket).expect("nbdkit serves the memory file")
}

#[test]
fn the_client_reads_pages_back_from_nbdkit() {
    if !testkit::require_nbdkit() {
        return;
    }
    let dir = testkit::scratch("nbdkit", "client");
    let data: Vec<u8> = (0..(9 << 20)).map(|i: u32| (i * 31 % 253) as u8).collect();
    let file = dir.join("memory.raw");
    std::fs::write(&file, &data).unwrap();
    let server = serve(&file, &dir.join("nbd.sock"));
    let src = NbdSource::connect(server.url().clone(), NbdSourceConfig::default()).unwrap();
    assert_eq!(src.size(), data.len() as u64);
    let mut buf = vec![0u8; 3 * PAGE_SIZE];
    for first in [0u64, 1, 77, 1000, 2301] {
        src.fetch(first, &mut buf).unwrap();
        let at = usize::try_from(first).unwrap() * PAGE_SIZE;
        assert_eq!(buf, data[at..at + buf.len()], "page {first}");
    }
    assert!(src.fetch(2303, &mut buf).is_err(), "beyond the export");
    // Several requests in flight on one connection, answered in any order.
    let mut c = NbdClient::connect(server.url(), &NbdClientConfig::default()).unwrap();
    let chunk = 64 << 10;
    let mut bufs = vec![vec![0u8; chunk]; 8];
    let mut reads: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| (((7 - i) * chunk) as u64, &mut b[..]))
        .collect();
    c.read_many(&mut reads).unwrap();
    for (i, b) in bufs.iter().enumerate() {
        let at = (7 - i) * chunk;
        assert_eq!(b[..], data[at..at + chunk]);
    }
    // Larger than one request (4 MiB): split and pipelined.
    let mut big = vec![0u8; 9 << 20];
    src.fetch(0, &mut big).unwrap();
    assert!(big == data, "a 9 MiB read differs");
    let _ = std::fs::remove_dir_all(&dir);
}

fn nbd_options(dir: &std::path::Path, url: &pager::NbdUrl) -> RestoreOptions {
    let mut o = restore_options(dir, true, ApfPath::Userspace, "2ms");
    o.source = SourceOptions {
        nbd: Some(url.clone()),
        deadline: Duration::from_secs(10),
    };
    o
}

#[test]
fn lazy_restores_and_clones_from_nbdkit() {
    if !testkit::require_kvm() || !testkit::require_nbdkit() {
        return;
    }
    let dir = testkit::scratch("nbdkit", "restore");
    let snap = standard_snapshot(ApfMode::V2);
    let remote = manifest_only(snap, &dir.join("manifest-only"));
    let server = serve(&snap.join("memory.raw"), &dir.join("nbd.sock"));
    let r = restore_ok(&nbd_options(&remote, server.url()));
    assert_passed(&r);
    assert!(r.apf.engine.injected > 0, "{:?}", r.apf.engine);
    assert!(r.restore.as_ref().unwrap().source.starts_with("NBD"));
    let clones = restore_clones(
        &CloneOptions {
            restore: nbd_options(&remote, server.url()),
            clones: 3,
        },
        &|_| Box::new(NoObserver),
    )
    .unwrap();
    println!("{}", clones.summary());
    for c in &clones.clones {
        assert_passed(c.report.as_deref().expect("every clone finishes"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
