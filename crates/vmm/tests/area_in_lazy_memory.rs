//! Issue 14 item 1: a guest whose APF area lies in lazily served memory
//! (`--workload hostile:area-in-lazy-memory`, `docs/reliability.md`). Every vCPU moves its
//! area to a block at the top of RAM before its scan runs; the guest is snapshotted after the
//! scans' fill pass and restored with `--lazy` under APF v1 and v2, each under both APF
//! policies. The VMM's first read and write of a reason (v1) or token (v2) after the
//! restore, and the guest's handlers, then touch a page still arriving through the pager.
//! That deadlocked when the area was read through the host mapping under the APF driver's
//! lock: the pager needs that lock to report the fault, before it serves the page.
//!
//! Each restore runs on its own thread with a deadline of its own besides the restore's
//! `timeout`: a deadlock there also blocks the teardown after the timeout (the pager thread
//! cannot be stopped while it waits for the lock), so only the watchdog can catch it.
//! Each test prints exactly `SKIPPED: no /dev/kvm` and passes where KVM is absent.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use guest_abi::{TaskKind, lazy_area_gpa};
use testkit::fixture::{Guest, MEM, assert_every_token_answered, assert_passed, restore_options};
use vmm::memory::GuestRam;
use vmm::{ApfMode, ApfPath, ApfPolicy, RestoreOptions, RunObserver, RunReport};

/// The restore's own `timeout`: a restore of this guest takes well under a second.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the test waits for the restore to return at all.
const WATCHDOG: Duration = Duration::from_mins(1);

fn scratch(name: &str) -> PathBuf {
    testkit::scratch("lazy-area", name)
}

/// The fixture's guest (2 vCPUs, 64 MiB, scans of 2 MiB in all, 2 passes, snapshot after the
/// fill pass) running `hostile:area-in-lazy-memory`.
fn guest(apf: ApfMode) -> Guest {
    Guest {
        workload: "hostile:area-in-lazy-memory".into(),
        ..Guest::standard(apf)
    }
}

/// Where the case puts vCPU `cpu`'s area.
fn area(cpu: usize) -> u64 {
    lazy_area_gpa(MEM, u32::try_from(cpu).unwrap())
}

/// Snapshots the case into `out`; checks every vCPU's area was in lazy memory then.
fn snapshot(apf: ApfMode, out: &Path) {
    let r = guest(apf).snapshot(out);
    for (cpu, a) in r.apf.active.iter().enumerate() {
        assert_eq!(
            a.map(|a| a.area_gpa),
            Some(area(cpu)),
            "vCPU {cpu}'s area at the snapshot: {:?}\nconsole:\n{}",
            r.apf.active,
            r.console
        );
    }
}

/// Whether the host page behind guest-physical `gpa` is present in this process (bit 63 of
/// its `/proc/self/pagemap` entry), found without touching it.
fn present(ram: &GuestRam, gpa: u64) -> bool {
    let host = ram.host_ptr(gpa, 1).expect("an address in RAM") as u64;
    let mut entry = [0u8; 8];
    File::open("/proc/self/pagemap")
        .and_then(|f| f.read_exact_at(&mut entry, host / 4096 * 8))
        .expect("read /proc/self/pagemap");
    u64::from_le_bytes(entry) >> 63 == 1
}

/// Looks at the areas' pages before the first guest instruction and after the last.
#[derive(Debug, Default)]
struct AreaPages {
    areas: Vec<u64>,
    at_start: Vec<bool>,
    at_end: Vec<bool>,
}

impl RunObserver for AreaPages {
    fn start(&mut self, ram: &GuestRam) -> vmm::Result<()> {
        self.at_start = self.areas.iter().map(|&a| present(ram, a)).collect();
        Ok(())
    }

    fn finish(&mut self, ram: &GuestRam, _elapsed: Duration) {
        self.at_end = self.areas.iter().map(|&a| present(ram, a)).collect();
    }
}

/// Runs `vmm::restore(opts)` on its own thread; panics if it has not returned within
/// `watchdog` (the thread is left behind: it is stuck).
fn restore_within(
    opts: RestoreOptions,
    mut observer: AreaPages,
    watchdog: Duration,
) -> (vmm::Result<RunReport>, AreaPages) {
    let (tx, rx) = mpsc::channel();
    let what = format!("{}", opts.dir.display());
    std::thread::spawn(move || {
        let r = vmm::restore(&opts, &mut observer);
        let _ = tx.send((r, observer));
    });
    rx.recv_timeout(watchdog).unwrap_or_else(|_| {
        panic!(
            "the restore of {what} did not return within {watchdog:?} (its timeout: \
             {RESTORE_TIMEOUT:?}): deadlocked"
        )
    })
}

/// Snapshots the case booted with `apf` and restores it lazily under each APF policy.
fn restore_with_the_area_in_lazy_memory(apf: ApfMode) {
    let dir = scratch(&format!("{apf:?}"));
    let snap = dir.join("snap");
    snapshot(apf, &snap);
    for policy in [ApfPolicy::Always, ApfPolicy::Adaptive] {
        check_lazy_restore(&snap, apf, policy);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn check_lazy_restore(snap: &Path, apf: ApfMode, policy: ApfPolicy) {
    let mut opts = restore_options(snap, true, ApfPath::Userspace, "2ms");
    opts.timeout = Some(RESTORE_TIMEOUT);
    opts.apf_policy = policy;
    let watch = AreaPages {
        areas: (0..2).map(area).collect(),
        ..AreaPages::default()
    };
    let (r, watch) = restore_within(opts, watch, WATCHDOG);
    let apf = format!("{apf:?} ({policy:?})");
    let r = r.unwrap_or_else(|e| panic!("{apf}: the lazy restore failed: {e}"));
    println!(
        "{apf}: {} injected, {} page ready, faults {:?}, areas present at start {:?}, at end {:?}",
        r.apf.engine.injected,
        r.apf.engine.page_ready_delivered,
        r.apf.driver,
        watch.at_start,
        watch.at_end
    );

    // The guest's success: every task done with 0, every scan's pattern read back, and the
    // case's own checks (the area still where it moved it, its words consumed at the end).
    assert_passed(&r);
    assert_eq!(
        r.console
            .matches("hostile: area-in-lazy-memory: PASS")
            .count(),
        2,
        "console:\n{}",
        r.console
    );
    assert!(!r.console.contains("FAIL"), "console:\n{}", r.console);
    assert!(
        r.tasks
            .iter()
            .filter(|t| t.kind == Some(TaskKind::Compute))
            .all(|t| t.work > 0),
        "{:?}",
        r.tasks
    );

    // Each vCPU's area lay in lazily served memory, and its page came through the pager
    // during the run: absent before the first instruction, present after the last.
    let eager = r.restore.as_ref().expect("a restore report").eager_bytes;
    for cpu in 0..2 {
        let a = r.apf.active[cpu].expect("APF active at the end").area_gpa;
        assert_eq!(a, area(cpu), "vCPU {cpu}");
        assert!(
            a >= eager && a < MEM,
            "vCPU {cpu}'s area {a:#x} is not in lazy memory [{eager:#x}, {MEM:#x})"
        );
    }
    assert_eq!(
        (watch.at_start, watch.at_end),
        (vec![false, false], vec![true, true]),
        "the areas' pages were not served on demand"
    );

    // APFs went through those areas on both vCPUs, and every token was answered.
    assert!(r.apf.engine.injected > 0, "no APF: {:?}", r.apf.engine);
    for c in &r.cpus {
        assert!(c.not_present > 0, "vCPU {} took no APF: {c:?}", c.index);
        assert_eq!(c.ready_after_wake_all, 0, "{c:?}");
    }
    assert_every_token_answered(&r);
    let np: u64 = r.cpus.iter().map(|c| c.not_present).sum();
    let ready: u64 = r.cpus.iter().map(|c| c.page_ready).sum();
    assert_eq!(np, r.apf.engine.injected, "guest saw every not-present");
    assert_eq!(
        ready, r.apf.engine.page_ready_delivered,
        "and every page ready"
    );
    assert_eq!(r.lazy.as_ref().unwrap().pager.fetch_errors, 0);
}

#[test]
fn a_v1_guest_whose_apf_area_is_in_lazy_memory_restores_lazily() {
    if !testkit::require_kvm() {
        return;
    }
    restore_with_the_area_in_lazy_memory(ApfMode::V1);
}

#[test]
fn a_v2_guest_whose_apf_area_is_in_lazy_memory_restores_lazily() {
    if !testkit::require_kvm() {
        return;
    }
    restore_with_the_area_in_lazy_memory(ApfMode::V2);
}
