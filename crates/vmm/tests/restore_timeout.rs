//! Issue 14: a restore's `timeout` (`--timeout`) ends it whatever it is stuck on. Memory
//! that never arrives (a fetch latency of ten minutes) leaves the guest stuck three ways:
//! - `--apf off`: a vCPU blocked in `KVM_RUN` on a missing page (a kick makes it return);
//! - userspace APF: the scan asleep on its token, the other tasks spinning, no vCPU blocked;
//! - userspace APF with the guest's APF area in lazy memory
//!   (`hostile:area-in-lazy-memory`): the vCPU threads blocked in the VMM's own first read
//!   of their area, a userfaultfd wait in userspace that no kick ends. The run abandons them
//!   after its grace period and stopping the pager releases them.
//!
//! Each must return `VmmError::Timeout` soon after the limit: checked on a thread of its own
//! with a watchdog, so a hang fails the test instead of blocking it. Each test prints exactly
//! `SKIPPED: no /dev/kvm` and passes where KVM is absent.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use testkit::fixture::{Guest, restore_options, standard_snapshot};
use vmm::{ApfMode, ApfPath, RestoreOptions, RunReport, VmmError};

/// The restores' limit.
const LIMIT: Duration = Duration::from_secs(1);
/// Longest a stuck restore may take to return after its limit: the vCPU threads' grace
/// (`run::threads::STOP_GRACE`, 2 s) plus the teardown, with room for a loaded machine.
const ENDS_WITHIN: Duration = Duration::from_secs(15);
/// A fetch latency nothing in the test waits out.
const NEVER: &str = "10m";

/// Restores per `opts` on its own thread: the result and how long it took, or a panic if
/// it has not returned within `LIMIT + ENDS_WITHIN`.
fn restore_timed(opts: RestoreOptions) -> (vmm::Result<RunReport>, Duration) {
    let (tx, rx) = mpsc::channel();
    let what = format!("{} ({:?})", opts.dir.display(), opts.apf);
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = vmm::restore(&opts, &mut vmm::NoObserver);
        let _ = tx.send((r, t0.elapsed()));
    });
    rx.recv_timeout(LIMIT + ENDS_WITHIN).unwrap_or_else(|_| {
        panic!("the restore of {what} with a {LIMIT:?} timeout had not returned after {ENDS_WITHIN:?} more")
    })
}

/// A lazy restore of `snap` along `path` whose memory never arrives ends with the timeout.
fn assert_times_out(snap: &std::path::Path, path: ApfPath, what: &str) {
    let mut opts = restore_options(snap, true, path, NEVER);
    opts.timeout = Some(LIMIT);
    let (r, took) = restore_timed(opts);
    println!("{what}: ended after {took:?}");
    match r {
        Err(VmmError::Timeout { after, .. }) => assert_eq!(after, LIMIT, "{what}"),
        Err(e) => panic!("{what}: expected the timeout, got: {e}"),
        Ok(r) => panic!(
            "{what}: the guest finished without its memory (exit status {}):\n{}",
            r.exit_status, r.console
        ),
    }
    assert!(
        took >= LIMIT && took < LIMIT + ENDS_WITHIN,
        "{what}: ended after {took:?}"
    );
}

#[test]
fn a_timeout_ends_a_restore_whose_memory_never_arrives() {
    if !testkit::require_kvm() {
        return;
    }
    let snap = standard_snapshot(ApfMode::V2);
    assert_times_out(snap, ApfPath::Off, "apf off: a vCPU blocked in KVM_RUN");
    assert_times_out(snap, ApfPath::Userspace, "userspace APF: the scan asleep");
}

#[test]
fn a_timeout_ends_a_restore_whose_vcpu_threads_wait_for_their_apf_area() {
    if !testkit::require_kvm() {
        return;
    }
    for apf in [ApfMode::V1, ApfMode::V2] {
        let dir = testkit::scratch("restore-timeout", &format!("{apf:?}"));
        let snap = dir.join("snap");
        Guest {
            workload: "hostile:area-in-lazy-memory".into(),
            ..Guest::standard(apf)
        }
        .snapshot(&snap);
        assert_times_out(
            &snap,
            ApfPath::Userspace,
            &format!("{apf:?}, area in lazy memory: vCPU threads in the VMM's read of it"),
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
