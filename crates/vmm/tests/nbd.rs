//! Restores whose memory comes from a real NBD server (`qemu-nbd`, on a unix socket):
//! lazily with and without APF, with each prefetch policy, eagerly; a corrupted byte served
//! by the server; the server killed mid-restore and restarted; a server that never comes
//! back. Each test prints `SKIPPED: no /dev/kvm` or `SKIPPED: qemu-nbd not installed` and
//! passes where that is missing.
//!
//! The workload is `tests/snapshot_restore.rs`'s: 2 vCPUs, `compute:2,scan:1`, the scan over
//! 2 MiB (32 chunks of 64 KiB), snapshot right after its fill pass; the restored scan
//! re-reads the whole region and its checksum is compared with the fill pattern.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_abi::WORKLOAD_GPA;
use harness::qemu_nbd::Server;
use pager::Prefetch;
use testkit::fixture::{assert_passed, manifest_only, restore_options, standard_snapshot};
use vmm::source::SourceOptions;
use vmm::{ApfMode, ApfPath, RestoreOptions, RunReport};

macro_rules! require_kvm_and_qemu_nbd {
    () => {
        if !testkit::require_kvm() || !testkit::require_qemu_nbd() {
            return;
        }
    };
}

fn scratch(name: &str) -> PathBuf {
    testkit::scratch("nbd", name)
}

/// The shared snapshot of the standard guest: a directory in `dir` holding only its
/// manifest (what a machine restoring from the server has) and the memory file to serve.
fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let snap = standard_snapshot(ApfMode::V2);
    (
        manifest_only(snap, &dir.join("manifest-only")),
        snap.join("memory.raw"),
    )
}

/// `qemu-nbd` serving `file` on `socket` (the harness's one helper).
fn serve(file: &Path, socket: &Path) -> Server {
    Server::start(file, socket).expect("qemu-nbd serves the memory file")
}

/// Restore options for memory from the NBD export at `url`.
fn options(
    dir: &Path,
    lazy: bool,
    apf: bool,
    latency: &str,
    url: &str,
    prefetch: Prefetch,
    deadline: Duration,
) -> RestoreOptions {
    let path = if apf {
        ApfPath::Userspace
    } else {
        ApfPath::Off
    };
    let mut o = restore_options(dir, lazy, path, latency);
    o.prefetch = prefetch;
    o.source = SourceOptions {
        nbd: Some(url.parse().expect("an NBD URL")),
        deadline,
    };
    o
}

fn restore(opts: &RestoreOptions) -> vmm::Result<RunReport> {
    vmm::restore(opts, &mut vmm::NoObserver)
}

fn lazy(r: &RunReport) -> &vmm::lazy::LazyReport {
    r.lazy.as_ref().expect("a lazy restore")
}

#[test]
fn lazy_restore_from_nbd_with_and_without_apf_and_each_prefetch_policy() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("lazy");
    let (remote, memory) = snapshot(&dir);
    let server = serve(&memory, &dir.join("nbd.sock"));
    let deadline = Duration::from_secs(10);

    let on = restore(&options(
        &remote,
        true,
        true,
        "5ms",
        &server.url().to_string(),
        Prefetch::None,
        deadline,
    ))
    .unwrap();
    assert_passed(&on);
    assert!(
        on.apf.engine.injected > 0,
        "no APF injected: {:?}",
        on.apf.engine
    );
    let l = lazy(&on);
    assert!(l.source.starts_with("NBD nbd+unix:///mem"), "{}", l.source);
    assert_eq!(l.pager.fetch_errors, 0);
    assert!(l.pager.fetches >= 32, "{l:?}");

    let off = restore(&options(
        &remote,
        true,
        false,
        "5ms",
        &server.url().to_string(),
        Prefetch::None,
        deadline,
    ))
    .unwrap();
    assert_passed(&off);
    assert_eq!(off.apf.engine.injected, 0);
    assert!(off.apf.driver.apf_off_faults > 0);

    let ra = restore(&options(
        &remote,
        true,
        true,
        "5ms",
        &server.url().to_string(),
        Prefetch::Readahead,
        deadline,
    ))
    .unwrap();
    assert_passed(&ra);
    let l = lazy(&ra);
    assert!(l.pager.prefetched_pages > 0, "{l:?}");
    assert!(
        ra.apf.driver.vcpu_faults < on.apf.driver.vcpu_faults,
        "readahead: {} faults, none: {}",
        ra.apf.driver.vcpu_faults,
        on.apf.driver.vcpu_faults
    );

    let fill = restore(&options(
        &remote,
        true,
        true,
        "0",
        &server.url().to_string(),
        Prefetch::Fill,
        deadline,
    ))
    .unwrap();
    assert_passed(&fill);
    let l = lazy(&fill);
    assert!(l.pager.prefetch_fetches > 0, "{l:?}");
    println!(
        "fill: resident at {:?} ns, {} pages prefetched",
        l.pager.fully_resident_ns, l.pager.prefetched_pages
    );
    assert!(
        fill.summary().contains("prefetch fill"),
        "{}",
        fill.summary()
    );

    // Eager: everything read (and verified) from the server before the guest runs.
    let eager = restore(&options(
        &remote,
        false,
        true,
        "0",
        &server.url().to_string(),
        Prefetch::None,
        deadline,
    ))
    .unwrap();
    assert_passed(&eager);
    assert!(eager.restore.as_ref().unwrap().source.starts_with("NBD"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupted_byte_served_over_nbd_stops_the_vm_naming_the_page() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("corrupt");
    let (remote, memory) = snapshot(&dir);
    let bad = dir.join("corrupted.raw");
    let mut mem = std::fs::read(&memory).unwrap();
    let gpa = WORKLOAD_GPA + 5 * 4096 + 17;
    mem[usize::try_from(gpa).unwrap()] ^= 0x40;
    std::fs::write(&bad, &mem).unwrap();
    let server = serve(&bad, &dir.join("nbd.sock"));
    for lazy in [true, false] {
        let t0 = Instant::now();
        let e = restore(&options(
            &remote,
            lazy,
            true,
            "0",
            &server.url().to_string(),
            Prefetch::None,
            Duration::from_secs(10),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("fails its checksum") && e.contains("gpa 0x1000000"),
            "lazy {lazy}: {e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    drop(server);
    // An export of another size is refused before the guest runs.
    std::fs::write(&bad, &mem[..mem.len() / 2]).unwrap();
    let server = serve(&bad, &dir.join("nbd2.sock"));
    let e = restore(&options(
        &remote,
        true,
        true,
        "0",
        &server.url().to_string(),
        Prefetch::None,
        Duration::from_secs(10),
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("the export has 33554432 bytes"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_server_killed_mid_restore_and_restarted_the_guest_completes() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("restart");
    let (remote, memory) = snapshot(&dir);
    let mut server = serve(&memory, &dir.join("nbd.sock"));
    let url = server.url().to_string();
    let run = std::thread::spawn(move || {
        restore(&options(
            &remote,
            true,
            true,
            "20ms",
            &url,
            Prefetch::None,
            Duration::from_secs(10),
        ))
    });
    std::thread::sleep(Duration::from_millis(250));
    server.kill();
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !run.is_finished(),
        "the restore finished before the server came back"
    );
    server.restart().expect("qemu-nbd restarts");
    let r = run.join().unwrap().unwrap();
    assert_passed(&r);
    assert_eq!(lazy(&r).pager.fetch_errors, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_server_that_never_comes_back_ends_the_vm_within_the_deadline() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("gone");
    let (remote, memory) = snapshot(&dir);
    let mut server = serve(&memory, &dir.join("nbd.sock"));
    let url = server.url().to_string();
    let run = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = restore(&options(
            &remote,
            true,
            true,
            "20ms",
            &url,
            Prefetch::None,
            Duration::from_secs(1),
        ));
        (r, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(250));
    let killed = Instant::now();
    server.kill();
    let (r, _) = run.join().unwrap();
    let after_kill = killed.elapsed();
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("unreachable") && e.contains("deadline 1s") && e.contains("guest page"),
        "{e}"
    );
    assert!(
        after_kill < Duration::from_secs(5),
        "the VM ended {after_kill:?} after the server went away (deadline 1 s)"
    );
    println!("error {after_kill:?} after the kill: {e}");
    let _ = std::fs::remove_dir_all(&dir);
}
