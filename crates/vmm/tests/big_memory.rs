//! Guests of more than 3 GiB: RAM above the MMIO hole (`[4 GiB, 4 GiB + size - 3 GiB)`),
//! identity-mapped for the guest, saved without the hole, restored eagerly, lazily (faults
//! above 4 GiB become APFs), from an NBD export and as clones on one shared page cache;
//! APF areas in the hole or past the end of RAM are #GP. Each test prints exactly `SKIPPED: no /dev/kvm` and passes where KVM is
//! absent.
//!
//! Host cost: a 4 GiB guest's RAM is mapped but untouched except its low 16 MiB and the
//! scanned 4 MiB; its memory file is sparse (zero blocks are holes) and each test removes it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use guest_abi::TaskKind;
use testkit::fixture::{
    Guest, assert_every_token_answered, assert_passed, manifest_only, restore_ok, restore_options,
};
use vmm::clones::{CloneOptions, restore_clones};
use vmm::snapshot::Snapshot;
use vmm::snapshot::format::MemoryRegion;
use vmm::source::SourceOptions;
use vmm::{ApfMode, ApfPath, NoObserver, RunOptions, RunReport, SnapshotPlan};

const GIB: u64 = 1 << 30;
const SCAN: u64 = 4 << 20;

/// A guest of `mem` bytes whose one scan reads `SCAN` bytes at `scan_at`, next to a compute
/// task, on 2 vCPUs; the scan asks for a snapshot after its fill pass.
fn guest(mem: u64, scan_at: u64, apf: ApfMode) -> Guest {
    Guest {
        mem,
        workload: "compute:1,scan:1".into(),
        scan_bytes: Some(SCAN),
        scan_at: Some(scan_at),
        ..Guest::standard(apf)
    }
}

fn scan_of(r: &RunReport) -> &vmm::report::TaskReport {
    r.tasks
        .iter()
        .find(|t| t.kind == Some(TaskKind::Scan))
        .expect("a scan task")
}

/// Snapshots `g` into `out` and checks the memory file: regions without the hole, sparse.
fn snapshot(g: &Guest, out: &Path) {
    let cfg = g.config();
    let scan = cfg.tasks.iter().find(|t| t.kind == TaskKind::Scan as u32);
    assert_eq!(scan.map(|t| t.arg0), g.scan_at, "the scan lies where asked");
    g.snapshot(out);
    let snap = Snapshot::open(out).expect("the snapshot opens");
    let m = &snap.manifest.memory;
    let high = g.mem - 3 * GIB;
    assert_eq!(
        m.regions,
        [
            MemoryRegion {
                gpa: 0,
                size: 3 * GIB,
                file_offset: 0
            },
            MemoryRegion {
                gpa: 4 * GIB,
                size: high,
                file_offset: 3 * GIB
            },
        ]
    );
    let meta = std::fs::metadata(out.join("memory.raw")).unwrap();
    assert_eq!(meta.len(), g.mem, "the file holds RAM, not the hole");
    assert!(
        meta.blocks() * 512 < 256 << 20,
        "untouched memory is not written: {} bytes on disk",
        meta.blocks() * 512
    );
}

/// A lazy restore with userspace APF whose only lazily served memory is the scan's: it
/// faults on pages at `scan_at..`, all of them above 4 GiB, and they become APFs.
fn assert_lazy_apf_above_4_gib(r: &RunReport, scan_at: u64) {
    assert_passed(r);
    assert_every_token_answered(r);
    assert!(scan_at >= 4 * GIB);
    assert_eq!(scan_of(r).work, SCAN / 4096, "{:?}", scan_of(r));
    let lazy = r.lazy.as_ref().expect("a lazy restore");
    // Every page the pager mapped is a scanned page (the compute task and the kernel live in
    // the low 16 MiB, loaded before the first instruction).
    assert_eq!(lazy.resident_pages, SCAN / 4096, "{lazy:?}");
    let e = &r.apf.engine;
    assert!(e.faults > 0 && e.injected > 0, "{e:?}");
    let restore = r.restore.as_ref().expect("a restore");
    assert_eq!(restore.eager_bytes, guest_abi::WORKLOAD_GPA);
}

#[test]
fn a_4_gib_guest_scans_above_4_gib_and_restores_eagerly_lazily_and_from_nbd() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = testkit::scratch("bigmem", "4g");
    let out = dir.join("snap");
    let g = guest(4 * GIB, 4 * GIB, ApfMode::V2);
    // A plain run first: the scan above 4 GiB reads its pattern back.
    let r = vmm::boot_and_run(
        &vmm::VmConfig {
            tasks: {
                let mut tasks = g.config().tasks;
                for t in &mut tasks {
                    t.flags &= !guest_abi::SCAN_SNAPSHOT;
                }
                tasks
            },
            ..g.config()
        },
        &RunOptions {
            timeout: Some(testkit::fixture::TIMEOUT),
            ..RunOptions::default()
        },
    )
    .expect("a 4 GiB guest boots");
    assert_passed(&r);
    assert_eq!(r.mem_size, 4 * GIB);

    snapshot(&g, &out);
    let eager = restore_ok(&restore_options(&out, false, ApfPath::Userspace, "0"));
    assert_passed(&eager);
    assert_eq!(eager.restore.as_ref().unwrap().eager_bytes, 4 * GIB);

    let lazy = restore_ok(&restore_options(&out, true, ApfPath::Userspace, "1ms"));
    assert_lazy_apf_above_4_gib(&lazy, 4 * GIB);
    println!(
        "4 GiB lazy: set-up {} µs, {} faults, {} APFs",
        lazy.restore.as_ref().unwrap().setup_us,
        lazy.apf.engine.faults,
        lazy.apf.engine.injected
    );

    // The memory file served by qemu-nbd: the same file offsets, through the same mapping.
    if testkit::require_qemu_nbd() {
        let socket = dir.join("nbd.sock");
        let _server = harness::qemu_nbd::Server::start(&out.join("memory.raw"), &socket)
            .expect("qemu-nbd serves the memory file");
        let local = manifest_only(&out, &dir.join("manifest-only"));
        let mut o = restore_options(&local, true, ApfPath::Userspace, "1ms");
        o.source = SourceOptions {
            nbd: Some(
                format!("nbd+unix:///mem?socket={}", socket.display())
                    .parse()
                    .expect("an NBD URL"),
            ),
            ..SourceOptions::default()
        };
        assert_lazy_apf_above_4_gib(&restore_ok(&o), 4 * GIB);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// 5 GiB, v1: the scan reads the last 4 MiB of RAM (the last entries of the identity map),
/// restored lazily; that restore is snapshot again (the pages it never fetched are read from
/// the first snapshot's file, region by region) and the second snapshot restored lazily.
#[test]
fn a_5_gib_guest_scans_the_end_of_ram_and_restores_lazily_with_v1_twice() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = testkit::scratch("bigmem", "5g");
    let (out, again) = (dir.join("snap"), dir.join("again"));
    let scan_at = 6 * GIB - SCAN;
    // Three passes: the restored scan asks for a snapshot again after its second.
    let g = Guest {
        passes: 3,
        ..guest(5 * GIB, scan_at, ApfMode::V1)
    };
    snapshot(&g, &out);
    let mut o = restore_options(&out, true, ApfPath::Userspace, "1ms");
    o.snapshot = Some(SnapshotPlan {
        out: again.clone(),
        on_guest_request: true,
        ..SnapshotPlan::default()
    });
    let r = restore_ok(&o);
    assert!(
        r.snapshot.is_some() && r.apf.engine.injected > 0,
        "{:?}",
        r.apf.engine
    );
    let lazy = restore_ok(&restore_options(&again, true, ApfPath::Userspace, "1ms"));
    assert_lazy_apf_above_4_gib(&lazy, scan_at);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The hostile area cases keep their meaning with RAM above the hole: an area past the end
/// of RAM (5 GiB for a 4 GiB guest) or anywhere in `[3 GiB, 4 GiB)` is #GP; the last 64
/// bytes below the hole and at the end of RAM are areas like any other.
#[test]
fn apf_areas_in_the_hole_or_past_the_end_of_a_4_gib_guest_are_gp() {
    if !testkit::require_kvm() {
        return;
    }
    for apf in [ApfMode::V1, ApfMode::V2] {
        let run = |case: &str| {
            let tasks = vmm::workload::build(
                &format!("hostile:{case}"),
                vmm::workload::WorkloadParams {
                    vcpus: 2,
                    mem_size: 4 * GIB,
                    scan_at: Some(4 * GIB),
                    scan_bytes: None,
                    scan_passes: 1,
                    compute_ms: 0,
                },
            )
            .unwrap();
            let cfg = vmm::VmConfig {
                tasks,
                ..guest(4 * GIB, 4 * GIB, apf).config()
            };
            let r = vmm::boot_and_run(
                &cfg,
                &RunOptions {
                    timeout: Some(testkit::fixture::TIMEOUT),
                    ..RunOptions::default()
                },
            )
            .unwrap_or_else(|e| panic!("{case} ({apf:?}): {e}"));
            assert_passed(&r);
            assert!(
                r.console.contains(&format!("hostile: {case}: PASS")),
                "{case}: {}",
                r.console
            );
            r
        };
        let r = run("area-outside-ram");
        assert!(
            r.apf.engine.gp.area_not_in_ram >= 3,
            "{:?}",
            r.apf.engine.gp
        );
        let r = run("area-mmio");
        assert!(
            r.apf.engine.gp.area_not_in_ram >= 4,
            "{:?}",
            r.apf.engine.gp
        );
        let r = run("area-straddles-ram-end");
        assert!(
            r.apf.engine.gp.area_not_in_ram >= 1,
            "{:?}",
            r.apf.engine.gp
        );
        for area in [5 * GIB - 64, 3 * GIB - 64] {
            assert!(
                r.apf.enables.iter().any(|e| e.area_gpa == area),
                "{apf:?}: no enable at {area:#x}: {:?}",
                r.apf.enables
            );
        }
    }
}

/// Clones of a guest with RAM above 4 GiB (3 GiB + 16 MiB, so that the capacity check's
/// worst case, 3 guests' worth for 2 clones, fits a small host): the shared page cache is
/// indexed by guest-physical address, so it reaches the end of RAM (4 GiB + 16 MiB), not
/// the RAM's size; each clone maps both of its regions; the scan at 4 GiB is fetched into
/// the cache once for both clones and faults there become APFs in each.
#[test]
fn clones_of_a_guest_with_ram_above_4_gib_share_the_cache_above_the_hole() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = testkit::scratch("bigmem", "clones");
    let out = dir.join("snap");
    let mem = 3 * GIB + (16 << 20);
    snapshot(&guest(mem, 4 * GIB, ApfMode::V2), &out);
    let opts = CloneOptions {
        restore: restore_options(&out, true, ApfPath::Userspace, "1ms"),
        clones: 2,
    };
    let r = restore_clones(&opts, &|_| Box::new(NoObserver)).expect("the clones restore");
    println!("{}", r.summary());
    for c in &r.clones {
        let run = c
            .report
            .as_deref()
            .unwrap_or_else(|| panic!("clone {} failed: {:?}", c.index, c.error));
        assert_passed(run);
        assert_every_token_answered(run);
        assert_eq!(scan_of(run).work, SCAN / 4096, "{:?}", scan_of(run));
        let e = &run.apf.engine;
        assert!(e.faults > 0 && e.injected > 0, "clone {}: {e:?}", c.index);
    }
    let t = &r.totals;
    assert_eq!((t.clones, t.exited_ok, t.failed), (2, 2, 0));
    // The low 16 MiB read once into the cache, then each scanned chunk once for both.
    assert_eq!(
        t.source_bytes_fetched,
        guest_abi::WORKLOAD_GPA + SCAN,
        "{t:?}"
    );
    assert_eq!(t.pager.fetch_errors, 0);
    // The scanned pages above 4 GiB are in the cache; its pages below the hole are at most
    // the low 16 MiB (nothing else was touched).
    let cache = t.guest_memory.cache_bytes;
    assert!(
        (SCAN..=guest_abi::WORKLOAD_GPA + SCAN).contains(&cache),
        "{:?}",
        t.guest_memory
    );
    let _ = std::fs::remove_dir_all(&dir);
}
