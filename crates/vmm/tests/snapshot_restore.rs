//! Snapshots, eager and lazy restores and the userspace APF path on `/dev/kvm`, through the
//! library API. Each test prints exactly `SKIPPED: no /dev/kvm` and passes where KVM is
//! absent.
//!
//! The workload: 2 vCPUs, `compute:2,scan:1` with the scan over 2 MiB (32 chunks of 64 KiB,
//! the pager's fetch unit), 2 passes, `SCAN_SNAPSHOT`: the snapshot is taken right after the
//! fill pass, so the restored scan re-reads the whole region while it arrives (at 20 ms per
//! fetch, about 0.7 s). Task 0 (compute) shares vCPU 0 with the scan.

use std::path::{Path, PathBuf};
use std::time::Duration;

use apf_host::FallbackReason;
use guest_abi::WORKLOAD_GPA;
use testkit::fixture::{
    Guest, MEM, TIMEOUT, assert_every_token_answered, assert_passed, copy_dir, restore_ok,
};
use vmm::snapshot::format::FORMAT_VERSION;
use vmm::workload::{self, WorkloadParams};
use vmm::{ApfMode, ApfPath, RestoreOptions, RunOptions, RunReport, SnapshotPlan, VmmError};

fn scratch(name: &str) -> PathBuf {
    testkit::scratch("test", name)
}

fn take_snapshot(apf: ApfMode, passes: u64, out: &Path) -> RunReport {
    let r = Guest {
        passes,
        ..Guest::standard(apf)
    }
    .snapshot(out);
    let s = r.snapshot.as_ref().expect("a snapshot was taken");
    assert!(s.trigger.contains("tag 1"), "{}", s.trigger);
    assert!(out.join("manifest.json").exists() && out.join("memory.raw").exists());
    r
}

fn options(dir: &Path, lazy: bool, apf: bool, latency: &str) -> RestoreOptions {
    let path = if apf {
        ApfPath::Userspace
    } else {
        ApfPath::Off
    };
    testkit::fixture::restore_options(dir, lazy, path, latency)
}

fn restore(opts: &RestoreOptions) -> vmm::Result<RunReport> {
    vmm::restore(opts, &mut vmm::NoObserver)
}

/// Wake-all delivered on every vCPU that had APF enabled in the snapshot.
fn assert_wake_all_after_restore(r: &RunReport) {
    assert_eq!(r.apf.engine.wake_all_queued, 2, "{:?}", r.apf.engine);
    assert_eq!(r.apf.engine.wake_all_delivered, 2, "{:?}", r.apf.engine);
    // The guest saw the restore's wake-all on every vCPU. It may also take the boot-time
    // wake-all after the restore: when the snapshot caught that #PF injected but not yet
    // taken, it sits in the saved vCPU events and is delivered on the first entry.
    for c in &r.cpus {
        assert!((1..=2).contains(&c.wake_all), "vCPU {}: {c:?}", c.index);
    }
}

fn lazy_restore_with_and_without_apf(apf: ApfMode) {
    let dir = scratch(&format!("lazy-{apf:?}"));
    let snap = dir.join("snap");
    take_snapshot(apf, 2, &snap);

    let r = restore_ok(&options(&snap, true, true, "20ms"));
    assert_passed(&r);
    assert_wake_all_after_restore(&r);
    assert!(
        r.apf.engine.injected > 0,
        "no APF injected: {:?}",
        r.apf.engine
    );
    assert_every_token_answered(&r);
    let np: u64 = r.cpus.iter().map(|c| c.not_present).sum();
    let ready: u64 = r.cpus.iter().map(|c| c.page_ready).sum();
    assert_eq!(np, r.apf.engine.injected, "guest saw every not-present");
    assert_eq!(
        ready, r.apf.engine.page_ready_delivered,
        "guest saw every page ready"
    );
    assert!(
        r.tasks.iter().any(|t| t.ran_while_token_outstanding > 0),
        "no task ran while a token was outstanding: {:?}",
        r.tasks
    );
    let d = &r.apf.driver;
    assert!(
        d.vcpu_faults > 0 && r.apf.latency.fault_to_apf.summary().count > 0,
        "{d:?}"
    );
    assert_eq!(r.lazy.as_ref().unwrap().pager.fetch_errors, 0);

    let off = restore_ok(&options(&snap, true, false, "20ms"));
    assert_passed(&off);
    assert_wake_all_after_restore(&off);
    assert_eq!(off.apf.engine.injected, 0, "{:?}", off.apf.engine);
    assert!(
        off.tasks.iter().all(|t| t.ran_while_token_outstanding == 0),
        "{:?}",
        off.tasks
    );
    assert!(off.apf.driver.apf_off_faults > 0, "{:?}", off.apf.driver);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lazy_restore_v1_injects_apfs_and_apf_off_never_does() {
    if !testkit::require_kvm() {
        return;
    }
    lazy_restore_with_and_without_apf(ApfMode::V1);
}

#[test]
fn lazy_restore_v2_injects_apfs_and_apf_off_never_does() {
    if !testkit::require_kvm() {
        return;
    }
    lazy_restore_with_and_without_apf(ApfMode::V2);
}

#[test]
fn eager_restore_and_a_snapshot_taken_twice() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("twice");
    let first = dir.join("first");
    // Three passes: snapshots requested after pass 1 (taken here) and after pass 2.
    take_snapshot(ApfMode::V2, 3, &first);

    let r = restore_ok(&options(&first, false, true, "0"));
    assert_passed(&r);
    assert_wake_all_after_restore(&r);
    assert_eq!(r.apf.engine.injected, 0, "eager memory is all present");

    // Restore, run to the guest's next request (after pass 2), snapshot again.
    let second = dir.join("second");
    let mut opts = options(&first, true, true, "1ms");
    opts.snapshot = Some(SnapshotPlan {
        out: second.clone(),
        on_guest_request: true,
        ..SnapshotPlan::default()
    });
    let r = restore_ok(&opts);
    let s = r.snapshot.as_ref().expect("second snapshot taken");
    assert!(s.trigger.contains("tag 2"), "{}", s.trigger);

    // Restore the second snapshot, lazily: the last pass runs and checks the pattern.
    let r = restore_ok(&options(&second, true, true, "20ms"));
    assert_passed(&r);
    assert_wake_all_after_restore(&r);
    assert!(r.apf.engine.injected > 0);
    assert_every_token_answered(&r);
    let r = restore_ok(&options(&second, false, true, "0"));
    assert_passed(&r);
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_snapshot(from: &Path, to: &Path) {
    copy_dir(from, to);
}

#[test]
fn corrupted_snapshots_are_refused_or_stop_the_vm_naming_the_page() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("corrupt");
    let good = dir.join("good");
    take_snapshot(ApfMode::V2, 2, &good);

    // A flipped byte in the scan region: page 5 of the workload memory.
    let flipped = dir.join("flipped");
    copy_snapshot(&good, &flipped);
    let gpa = WORKLOAD_GPA + 5 * 4096 + 17;
    let mut mem = std::fs::read(flipped.join("memory.raw")).unwrap();
    mem[usize::try_from(gpa).unwrap()] ^= 0x40;
    std::fs::write(flipped.join("memory.raw"), &mem).unwrap();
    let e = restore(&options(&flipped, false, true, "0")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VmmError::MemorySource { .. }), "{msg}");
    assert!(
        msg.contains("checksum") && msg.contains("0x1000000"),
        "{msg}"
    );
    let e = restore(&options(&flipped, true, true, "1ms")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VmmError::Pager(_)), "{msg}");
    assert!(
        msg.contains("checksum") && msg.contains("gpa 0x100"),
        "{msg}"
    );

    // A truncated memory file.
    let truncated = dir.join("truncated");
    copy_snapshot(&good, &truncated);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory.raw"))
        .unwrap();
    f.set_len(MEM - 4096).unwrap();
    for lazy in [false, true] {
        let msg = restore(&options(&truncated, lazy, true, "0"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("truncated"), "{msg}");
    }

    // Bad manifests: garbage, another format version, missing.
    let bad = dir.join("bad");
    copy_snapshot(&good, &bad);
    std::fs::write(bad.join("manifest.json"), b"{\"magic\": \"apfvm-snap").unwrap();
    let msg = restore(&options(&bad, false, true, "0"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a valid apfvm snapshot manifest"), "{msg}");
    let text = std::fs::read_to_string(good.join("manifest.json")).unwrap();
    std::fs::write(
        bad.join("manifest.json"),
        text.replacen(&format!("\"format\":{FORMAT_VERSION}"), "\"format\":99", 1),
    )
    .unwrap();
    let msg = restore(&options(&bad, false, true, "0"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("format version 99"), "{msg}");
    std::fs::remove_file(bad.join("manifest.json")).unwrap();
    assert!(restore(&options(&bad, true, true, "0")).is_err());
    // A leftover temporary directory is never a snapshot.
    assert!(restore(&options(&dir.join("good.tmp-1-0"), false, true, "0")).is_err());
    // The good one still restores.
    assert_passed(&restore_ok(&options(&good, false, true, "0")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A format 1 snapshot (what apfvm wrote before RAM regions: no `memory.regions`, the file
/// is guest RAM `[0, mem_size)`) still restores, eagerly and lazily, and a snapshot taken of
/// it is written in the current format.
#[test]
fn a_format_1_snapshot_still_restores() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("format1");
    let v2 = dir.join("v2");
    // Three passes: the restored scan asks for a snapshot again after its second.
    take_snapshot(ApfMode::V2, 3, &v2);
    let v1 = dir.join("v1");
    copy_snapshot(&v2, &v1);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v1.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["memory"]["regions"].as_array().map(Vec::len), Some(1));
    m["format"] = 1.into();
    m["memory"].as_object_mut().unwrap().remove("regions");
    std::fs::write(v1.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    assert_passed(&restore_ok(&options(&v1, false, true, "0")));
    let r = restore_ok(&options(&v1, true, true, "1ms"));
    assert_passed(&r);
    assert!(r.apf.engine.injected > 0, "{:?}", r.apf.engine);
    let mut again = options(&v1, false, true, "0");
    let v1_again = dir.join("v1-again");
    again.snapshot = Some(SnapshotPlan {
        out: v1_again.clone(),
        on_guest_request: true,
        ..SnapshotPlan::default()
    });
    restore_ok(&again);
    let text = std::fs::read_to_string(v1_again.join("manifest.json")).unwrap();
    assert!(
        text.contains(&format!("\"format\":{FORMAT_VERSION}")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_at_a_time_and_refusal_to_overwrite() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("at");
    let snap = dir.join("snap");
    let mut cfg = Guest::standard(ApfMode::V1).config();
    // Compute tasks alone, long enough for --at to land first.
    cfg.tasks = workload::build(
        "compute:2",
        WorkloadParams {
            vcpus: 2,
            mem_size: MEM,
            scan_at: None,
            scan_bytes: None,
            scan_passes: 1,
            compute_ms: 400,
        },
    )
    .unwrap();
    let plan = SnapshotPlan {
        out: snap.clone(),
        on_guest_request: false,
        at: Some(Duration::from_millis(100)),
        on_flag: None,
    };
    let opts = RunOptions {
        timeout: Some(TIMEOUT),
        snapshot: Some(plan),
        ..RunOptions::default()
    };
    let r = vmm::boot_and_run(&cfg, &opts).unwrap();
    assert_eq!(r.snapshot.as_ref().unwrap().trigger, "--at");
    // Never overwrite an existing snapshot.
    let e = vmm::boot_and_run(&cfg, &opts).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let r = restore_ok(&options(&snap, false, true, "0"));
    assert_eq!(r.exit_status, 0, "{}", r.console);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot taken while the scan task sleeps on a not-present token (lazy restore, 20 ms
/// per fetch, paused mid-scan): the token is not saved ("in-flight faults are not
/// migrated"), the restore's wake-all wakes the sleeper, and it finishes correctly.
fn sleeper_at_snapshot_is_woken_by_the_wake_all(apf: ApfMode) {
    let dir = scratch(&format!("sleeper-{apf:?}"));
    let first = dir.join("first");
    take_snapshot(apf, 2, &first);
    let mut had_sleeper = false;
    for (i, at_ms) in [250u64, 290, 330, 370].into_iter().enumerate() {
        let second = dir.join(format!("second-{i}"));
        let mut opts = options(&first, true, true, "20ms");
        opts.snapshot = Some(SnapshotPlan {
            out: second.clone(),
            on_guest_request: false,
            at: Some(Duration::from_millis(at_ms)),
            on_flag: None,
        });
        let r = restore_ok(&opts);
        assert!(r.snapshot.is_some());
        let r2 = restore_ok(&options(&second, false, true, "0"));
        assert_passed(&r2);
        assert_wake_all_after_restore(&r2);
        if r.apf.outstanding_at_end > 0 {
            had_sleeper = true;
            break;
        }
    }
    assert!(had_sleeper, "never caught the scan asleep on a token");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn v1_sleeper_at_snapshot_is_woken_after_restore() {
    if !testkit::require_kvm() {
        return;
    }
    sleeper_at_snapshot_is_woken_by_the_wake_all(ApfMode::V1);
}

#[test]
fn v2_sleeper_at_snapshot_is_woken_after_restore() {
    if !testkit::require_kvm() {
        return;
    }
    sleeper_at_snapshot_is_woken_by_the_wake_all(ApfMode::V2);
}

/// `--apf kernel`: KVM's own in-kernel APF on the same userfaultfd memory (v2 guest, no MSR
/// filter, in-kernel halt): the guest gets not-present and page-ready from KVM, apfvm's
/// engine sees nothing, the faults come from KVM's kworkers (not the vCPU threads).
#[test]
fn kernel_apf_baseline_on_the_same_lazy_memory() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("kernel");
    let snap = dir.join("snap");
    take_snapshot(ApfMode::V2, 2, &snap);
    let mut opts = options(&snap, true, true, "20ms");
    opts.apf = ApfPath::Kernel;
    let r = restore_ok(&opts);
    assert_passed(&r);
    assert_eq!(r.apf.engine.injected, 0);
    assert_eq!(r.apf.driver.msr_exits, 0, "KVM owns the APF MSRs");
    let np: u64 = r.cpus.iter().map(|c| c.not_present).sum();
    let ready: u64 = r.cpus.iter().map(|c| c.page_ready).sum();
    assert!(np > 0, "KVM injected no APF: {:?}", r.cpus);
    assert_eq!(np, ready);
    assert!(r.cpus.iter().all(|c| c.wake_all == 1), "{:?}", r.cpus);
    assert!(r.apf.driver.other_thread_faults > 0, "{:?}", r.apf.driver);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest booted without APF (CPUID bit clear, MSRs never written): every fault is handed
/// to the engine once, answered `Sync(NotEnabled)`, and the vCPU then waits for its page
/// without being kicked again (a kick interrupts KVM's wait and the retried access would post
/// a new message: no kick storm).
#[test]
fn lazy_restore_of_a_guest_without_apf_falls_back_once_per_fault() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("noapf");
    let snap = dir.join("snap");
    take_snapshot(ApfMode::Off, 2, &snap);
    let r = restore_ok(&options(&snap, true, true, "5ms"));
    assert_passed(&r);
    assert_eq!(r.apf.engine.injected, 0);
    assert_eq!(r.apf.engine.wake_all_queued, 0);
    let not_enabled = r.apf.engine.fallback.get(FallbackReason::NotEnabled);
    assert!(not_enabled > 0, "{:?}", r.apf.engine.fallback);
    let d = &r.apf.driver;
    assert!(d.fault_kicks <= d.pages_mapped + 2, "kick storm: {d:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
