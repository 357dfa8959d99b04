//! One soak iteration: snapshot the case's guest, restore it, and check the run — exit
//! status 0, every task done, every scan's checksum verified on the host, every APF token the
//! engine injected answered, no fault in an eager restore, no APF with APF off. A VMM error
//! or a panic is a failure of the iteration, never of the soak.

use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use guest_abi::TaskKind;
use vmm::report::{TaskState, exit_status_name};
use vmm::{RestoreOptions, RunReport, VmmError};

use super::case::Case;
use crate::bench::point::ms;
use crate::bench::{Mode, Snapshots};
use crate::error::Error;

/// What can go wrong in an iteration.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The guest's exit status was not 0.
    ExitStatus,
    /// A scan read memory whose checksum is not the pattern's (or was not verified).
    ChecksumMismatch,
    /// A task not done at the end, or the run hit its timeout.
    Stuck,
    /// Engine tokens not answered (page ready + wake-all covered != injected, or some
    /// outstanding at the end).
    LostWakeup,
    /// Counters that cannot be (eager with faults, APF off with APFs).
    Inconsistent,
    /// apfvm returned an error (snapshot or restore).
    VmmError,
    /// apfvm panicked.
    Panic,
}

impl FailureKind {
    /// Its name in the counts and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::ExitStatus => "exit-status",
            FailureKind::ChecksumMismatch => "checksum-mismatch",
            FailureKind::Stuck => "stuck",
            FailureKind::LostWakeup => "lost-wakeup",
            FailureKind::Inconsistent => "inconsistent",
            FailureKind::VmmError => "vmm-error",
            FailureKind::Panic => "panic",
        }
    }
}

/// One failure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Failure {
    /// What.
    pub kind: FailureKind,
    /// The details.
    pub detail: String,
}

/// One iteration's record.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Iteration {
    /// 1, 2, ...
    pub index: u64,
    /// Seconds since the soak started, at its start.
    pub started_s: f64,
    /// What ran.
    #[serde(flatten)]
    pub case: Case,
    /// Snapshot time (boot, fill, write), ms.
    pub snapshot_ms: f64,
    /// Restore → guest exit, ms.
    pub restore_ms: f64,
    /// Missing-page faults (userfaultfd messages).
    pub faults: u64,
    /// Not-present APFs the guest received (every APF mode, KVM's included).
    pub apf_injected: u64,
    /// Page ready the guest took.
    pub guest_page_ready: u64,
    /// Wake-alls the guest took.
    pub guest_wake_all: u64,
    /// Page readies the guest took for a token a wake-all had already covered (a host bug:
    /// must be 0).
    pub guest_ready_after_wake_all: u64,
    /// Userspace engine: not-present injected.
    pub engine_injected: u64,
    /// Userspace engine: page ready delivered.
    pub page_ready_delivered: u64,
    /// Userspace engine: tokens covered by a wake-all.
    pub tokens_covered_by_wake_all: u64,
    /// Userspace engine: tokens dropped by a disable, reset or restore.
    pub tokens_dropped_other: u64,
    /// Userspace engine: wake-alls delivered.
    pub wake_alls_delivered: u64,
    /// Userspace APF: tokens outstanding at the end.
    pub outstanding_at_end: u64,
    /// Faults the engine served synchronously (all reasons).
    pub sync_fallbacks: u64,
    /// Tasks.
    pub tasks: usize,
    /// Tasks not done at the end (all of them when the run timed out).
    pub stuck_tasks: u64,
    /// Tokens unanswered + stuck tasks.
    pub lost_wakeups: u64,
    /// Scans whose checksum was wrong or not verified.
    pub checksum_mismatches: u64,
    /// Empty when it passed.
    pub failures: Vec<Failure>,
}

impl Iteration {
    /// The record of `case`, nothing measured yet.
    pub fn new(index: u64, started_s: f64, case: Case) -> Iteration {
        Iteration {
            index,
            started_s,
            case,
            snapshot_ms: 0.0,
            restore_ms: 0.0,
            faults: 0,
            apf_injected: 0,
            guest_page_ready: 0,
            guest_wake_all: 0,
            guest_ready_after_wake_all: 0,
            engine_injected: 0,
            page_ready_delivered: 0,
            tokens_covered_by_wake_all: 0,
            tokens_dropped_other: 0,
            wake_alls_delivered: 0,
            outstanding_at_end: 0,
            sync_fallbacks: 0,
            tasks: 0,
            stuck_tasks: 0,
            lost_wakeups: 0,
            checksum_mismatches: 0,
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, kind: FailureKind, detail: impl Into<String>) {
        self.failures.push(Failure {
            kind,
            detail: detail.into(),
        });
    }

    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Records an error of `phase` (`snapshot`, `restore`): a timeout is a stuck run.
    pub fn error(&mut self, phase: &str, e: &Error) {
        if let Some(VmmError::Timeout { .. }) = e.vmm() {
            let all = u64::from(self.case.setup.vcpus * self.case.setup.tasks_per_vcpu);
            self.stuck_tasks = all;
            self.lost_wakeups += all;
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default().to_string();
            self.fail(FailureKind::Stuck, format!("{phase}: {first}"));
        } else {
            self.fail(FailureKind::VmmError, format!("{phase}: {e}"));
        }
    }

    /// Takes the counts of `r` and checks it.
    pub fn check(&mut self, r: &RunReport) {
        self.count(r);
        if r.exit_status != 0 {
            self.fail(
                FailureKind::ExitStatus,
                format!(
                    "the guest exited with status {} ({})",
                    r.exit_status,
                    exit_status_name(r.exit_status)
                ),
            );
        }
        self.check_tasks(r);
        self.check_tokens(r);
        self.check_counters();
    }

    /// What `r` counted.
    fn count(&mut self, r: &RunReport) {
        let pager = r.lazy.as_ref().map(|l| &l.pager);
        let e = &r.apf.engine;
        self.restore_ms = ms(r.elapsed());
        self.faults = pager.map_or(0, |p| p.fault_messages);
        self.apf_injected = r.cpus.iter().map(|c| c.counters.not_present).sum();
        self.guest_page_ready = r.cpus.iter().map(|c| c.counters.page_ready).sum();
        self.guest_wake_all = r.cpus.iter().map(|c| c.counters.wake_all).sum();
        self.guest_ready_after_wake_all =
            r.cpus.iter().map(|c| c.counters.ready_after_wake_all).sum();
        self.engine_injected = e.injected;
        self.page_ready_delivered = e.page_ready_delivered;
        self.tokens_covered_by_wake_all = e.dropped.wake_all;
        self.tokens_dropped_other = e.dropped.total() - e.dropped.wake_all;
        self.wake_alls_delivered = e.wake_all_delivered;
        self.outstanding_at_end = r.apf.outstanding_at_end;
        self.sync_fallbacks = e.fallback.total();
        self.tasks = r.tasks.len();
    }

    /// Every task done, with exit code 0; every scan's checksum verified.
    fn check_tasks(&mut self, r: &RunReport) {
        let expected = self.case.setup.vcpus * self.case.setup.tasks_per_vcpu;
        if r.tasks.len() != expected as usize {
            self.fail(
                FailureKind::Stuck,
                format!("{} tasks reported, {expected} expected", r.tasks.len()),
            );
        }
        for t in &r.tasks {
            let kind = t
                .kind
                .map_or_else(|| "?".to_string(), |k| format!("{k:?}").to_lowercase());
            if t.state != TaskState::Done {
                self.stuck_tasks += 1;
                self.fail(
                    FailureKind::Stuck,
                    format!("task {} ({kind}) is {:?}", t.index, t.state),
                );
            } else if t.exit_code != 0 {
                self.fail(
                    FailureKind::ExitStatus,
                    format!("task {} ({kind}) exited with {}", t.index, t.exit_code),
                );
            }
            if t.kind == Some(TaskKind::Scan) && t.checksum_ok != Some(true) {
                self.checksum_mismatches += 1;
                let why = if t.checksum_ok.is_none() {
                    "not verified"
                } else {
                    "not the fill pattern's"
                };
                self.fail(
                    FailureKind::ChecksumMismatch,
                    format!("task {} read checksum {:#x} ({why})", t.index, t.checksum),
                );
            }
        }
    }

    /// Every token the engine injected answered: a page ready, or covered by a wake-all.
    fn check_tokens(&mut self, r: &RunReport) {
        let e = &r.apf.engine;
        let answered = e.page_ready_delivered + e.dropped.wake_all;
        let unanswered = self.outstanding_at_end.max(
            e.injected
                .saturating_sub(answered + self.tokens_dropped_other),
        );
        self.lost_wakeups += unanswered + self.stuck_tasks;
        if answered != e.injected || self.outstanding_at_end != 0 {
            self.fail(
                FailureKind::LostWakeup,
                format!(
                    "engine: {} injected, {} page ready + {} covered by a wake-all ({} dropped otherwise), {} outstanding at the end",
                    e.injected, e.page_ready_delivered, e.dropped.wake_all, self.tokens_dropped_other, self.outstanding_at_end
                ),
            );
        }
    }

    /// Counters that cannot be: a page ready for a token a wake-all covered, a fault in an
    /// eager restore, an APF with APF off.
    fn check_counters(&mut self) {
        if self.guest_ready_after_wake_all != 0 {
            self.fail(
                FailureKind::Inconsistent,
                format!(
                    "the guest took {} page readies for tokens a wake-all had covered",
                    self.guest_ready_after_wake_all
                ),
            );
        }
        match self.case.mode {
            Mode::Eager if self.faults != 0 => {
                self.fail(
                    FailureKind::Inconsistent,
                    format!("eager restore with {} faults", self.faults),
                );
            }
            Mode::Off | Mode::OffHalt if self.apf_injected != 0 => {
                self.fail(
                    FailureKind::Inconsistent,
                    format!("APF off but {} APFs injected", self.apf_injected),
                );
            }
            _ => {}
        }
    }

    /// The line printed for it.
    pub fn line(&self) -> String {
        let mut s = format!(
            "[{:>5} {:>6.0}s] {}  ",
            self.index,
            self.started_s,
            self.case.describe()
        );
        if self.passed() {
            let _ = write!(
                s,
                "ok {:>6.0} ms  faults {:>3} APFs {:>3} ready {:>3} wake-all {}",
                self.restore_ms,
                self.faults,
                self.apf_injected,
                self.guest_page_ready,
                self.guest_wake_all
            );
        } else {
            let f: Vec<String> = self
                .failures
                .iter()
                .map(|f| format!("{:?}: {}", f.kind, f.detail))
                .collect();
            let _ = write!(s, "FAIL {}", f.join("; "));
        }
        s
    }
}

/// Runs one iteration; errors and panics become failures of the record.
pub fn iteration(index: u64, started_s: f64, case: Case, timeout: Duration) -> Iteration {
    let mut rec = Iteration::new(index, started_s, case);
    match std::panic::catch_unwind(AssertUnwindSafe(|| run_case(&rec.case, timeout))) {
        Ok(Ok((snapshot_ms, report))) => {
            rec.snapshot_ms = snapshot_ms;
            rec.check(&report);
        }
        Ok(Err((phase, e))) => rec.error(phase, &e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            rec.fail(FailureKind::Panic, format!("panicked: {msg}"));
        }
    }
    rec
}

type Phased<T> = std::result::Result<T, (&'static str, Error)>;

fn run_case(case: &Case, timeout: Duration) -> Phased<(f64, RunReport)> {
    let t = Instant::now();
    // One fresh snapshot per iteration, removed with `snaps` when this returns.
    let mut snaps = Snapshots::new().map_err(|e| ("snapshot", e))?;
    let dir = snaps
        .get(case.setup, case.booted)
        .map_err(|e| ("snapshot", e))?;
    let snapshot_ms = ms(t.elapsed());
    let (lazy, apf) = case.mode.restore_path();
    let mut opts = RestoreOptions::new(dir);
    opts.lazy = lazy;
    opts.apf = apf;
    opts.fetch_latency = case.fetch_latency.unwrap_or_default();
    opts.prefetch = case.prefetch.unwrap_or_default();
    opts.timeout = Some(timeout);
    let report =
        vmm::restore(&opts, &mut vmm::NoObserver).map_err(|e| ("restore", Error::Vmm(e)))?;
    Ok((snapshot_ms, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_is_a_stuck_run() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut it = Iteration::new(1, 0.0, Case::random(&mut rng));
        it.error(
            "restore",
            &Error::Vmm(VmmError::Timeout {
                after: Duration::from_mins(1),
                console: String::new(),
            }),
        );
        assert_eq!(it.failures[0].kind, FailureKind::Stuck);
        assert!(it.lost_wakeups > 0);
        assert!(it.line().contains("FAIL"));
        for k in [
            FailureKind::ExitStatus,
            FailureKind::LostWakeup,
            FailureKind::VmmError,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }
}
