//! The soak's totals and its verdict: PASS, FAIL, or INTERRUPTED (stopped by SIGINT or
//! SIGTERM before `--duration`: not a pass, whatever the counts so far).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::case::latency_kind;
use super::iteration::{FailureKind, Iteration};
use crate::bench::Mode;
use crate::host::Host;

/// The totals.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counts {
    /// Iterations run.
    pub iterations: u64,
    /// That passed every check.
    pub passed: u64,
    /// That failed one.
    pub failed: u64,
    /// Iterations by restore mode.
    pub by_mode: BTreeMap<Mode, u64>,
    /// Iterations by the protocol the guest booted with.
    pub by_booted: BTreeMap<String, u64>,
    /// Lazy iterations by prefetch policy.
    pub by_prefetch: BTreeMap<String, u64>,
    /// Lazy iterations by latency kind (`none`, `fixed`, `uniform`, `exp`).
    pub by_latency: BTreeMap<&'static str, u64>,
    /// Missing-page faults.
    pub faults: u64,
    /// Not-present APFs the guest received (all APF modes).
    pub apf_injected: u64,
    /// Page ready the guest took.
    pub guest_page_ready: u64,
    /// Wake-alls the guest took.
    pub guest_wake_all: u64,
    /// Page readies for tokens a wake-all had covered (must be 0).
    pub guest_ready_after_wake_all: u64,
    /// Userspace engine: not-present injected.
    pub engine_injected: u64,
    /// Userspace engine: page ready delivered.
    pub page_ready_delivered: u64,
    /// Userspace engine: tokens covered by a wake-all.
    pub tokens_covered_by_wake_all: u64,
    /// Userspace engine: wake-alls delivered.
    pub wake_alls_delivered: u64,
    /// Synchronous fallbacks.
    pub sync_fallbacks: u64,
    /// Tokens unanswered + stuck tasks (must be 0).
    pub lost_wakeups: u64,
    /// Tasks not done (must be 0).
    pub stuck_tasks: u64,
    /// Scans with a wrong or unverified checksum (must be 0).
    pub checksum_mismatches: u64,
    /// Failed iterations by kind.
    pub failures_by_kind: BTreeMap<FailureKind, u64>,
    /// VMM errors (must be 0).
    pub vmm_errors: u64,
    /// VMM panics (must be 0).
    pub panics: u64,
}

impl Counts {
    /// Counts `it`.
    pub fn add(&mut self, it: &Iteration) {
        self.iterations += 1;
        if it.passed() {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        *self.by_mode.entry(it.case.mode).or_default() += 1;
        *self
            .by_booted
            .entry(format!("{:?}", it.case.booted).to_lowercase())
            .or_default() += 1;
        if let Some(p) = it.case.prefetch {
            *self.by_prefetch.entry(p.to_string()).or_default() += 1;
        }
        if let Some(l) = &it.case.fetch_latency {
            *self.by_latency.entry(latency_kind(l)).or_default() += 1;
        }
        self.faults += it.faults;
        self.apf_injected += it.apf_injected;
        self.guest_page_ready += it.guest_page_ready;
        self.guest_wake_all += it.guest_wake_all;
        self.guest_ready_after_wake_all += it.guest_ready_after_wake_all;
        self.engine_injected += it.engine_injected;
        self.page_ready_delivered += it.page_ready_delivered;
        self.tokens_covered_by_wake_all += it.tokens_covered_by_wake_all;
        self.wake_alls_delivered += it.wake_alls_delivered;
        self.sync_fallbacks += it.sync_fallbacks;
        self.lost_wakeups += it.lost_wakeups;
        self.stuck_tasks += it.stuck_tasks;
        self.checksum_mismatches += it.checksum_mismatches;
        let mut kinds: Vec<FailureKind> = it.failures.iter().map(|f| f.kind).collect();
        kinds.sort();
        kinds.dedup();
        for k in kinds {
            *self.failures_by_kind.entry(k).or_default() += 1;
            match k {
                FailureKind::VmmError => self.vmm_errors += 1,
                FailureKind::Panic => self.panics += 1,
                _ => {}
            }
        }
    }
}

/// The soak's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Ran for `--duration`; every iteration passed.
    Pass,
    /// Some iteration failed (interrupted or not).
    Fail,
    /// Stopped by SIGINT or SIGTERM before `--duration`, no iteration failed so far.
    Interrupted,
}

impl Verdict {
    /// The verdict of `counts`, `interrupted` or not.
    pub fn of(counts: &Counts, interrupted: bool) -> Verdict {
        if counts.failed > 0 {
            Verdict::Fail
        } else if interrupted {
            Verdict::Interrupted
        } else {
            Verdict::Pass
        }
    }

    /// `PASS`, `FAIL`, `INTERRUPTED`.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Interrupted => "INTERRUPTED",
        }
    }
}

/// The soak's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    /// The command line.
    pub command: String,
    /// The seed.
    pub seed: u64,
    /// `--duration`, s.
    pub duration_s: f64,
    /// Wall time, s.
    pub elapsed_s: f64,
    /// Start, UTC.
    pub started: String,
    /// End, UTC.
    pub ended: String,
    /// Stopped early by SIGINT/SIGTERM.
    pub interrupted: bool,
    /// This machine.
    pub machine: Host,
    /// Each restore's timeout, s.
    pub restore_timeout_s: f64,
    /// The totals.
    pub counts: Counts,
    /// PASS, FAIL or INTERRUPTED.
    pub result: Verdict,
    /// True when it ran its whole duration and no iteration failed.
    pub passed: bool,
}

impl Summary {
    /// The text printed at the end.
    pub fn text(&self) -> String {
        fn map<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
        let c = &self.counts;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "apfvm soak: {} iterations in {:.0} s (seed {}): {} passed, {} failed{}",
            c.iterations,
            self.elapsed_s,
            self.seed,
            c.passed,
            c.failed,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "  by mode:        {}", map(&c.by_mode));
        let _ = writeln!(s, "  booted:         {}", map(&c.by_booted));
        let _ = writeln!(s, "  fetch latency:  {}", map(&c.by_latency));
        let _ = writeln!(s, "  prefetch:       {}", map(&c.by_prefetch));
        let _ = writeln!(
            s,
            "  faults {}, APFs injected {} (userspace engine {}), page ready {} (engine delivered {}), wake-alls {} (engine delivered {}, tokens covered {}), sync fallbacks {}",
            c.faults,
            c.apf_injected,
            c.engine_injected,
            c.guest_page_ready,
            c.page_ready_delivered,
            c.guest_wake_all,
            c.wake_alls_delivered,
            c.tokens_covered_by_wake_all,
            c.sync_fallbacks
        );
        let _ = writeln!(
            s,
            "  lost wakeups {}, stuck tasks {}, checksum mismatches {}, VMM errors {}, VMM panics {}, page readies after a wake-all {}",
            c.lost_wakeups,
            c.stuck_tasks,
            c.checksum_mismatches,
            c.vmm_errors,
            c.panics,
            c.guest_ready_after_wake_all
        );
        if !c.failures_by_kind.is_empty() {
            let by_kind: BTreeMap<&str, u64> = c
                .failures_by_kind
                .iter()
                .map(|(k, n)| (k.name(), *n))
                .collect();
            let _ = writeln!(s, "  failed iterations by kind: {}", map(&by_kind));
        }
        let _ = writeln!(s, "  result: {}", self.result.word());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::case::Case;
    use super::*;
    use crate::error::Error;

    #[test]
    fn failures_are_counted_by_kind_and_decide_the_verdict() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut it = Iteration::new(1, 0.0, Case::random(&mut rng));
        it.error("restore", &Error::Vmm(vmm::VmmError::Config("x".into())));
        let mut c = Counts::default();
        assert_eq!(Verdict::of(&c, false), Verdict::Pass);
        assert_eq!(Verdict::of(&c, true), Verdict::Interrupted);
        c.add(&it);
        assert_eq!(
            (
                c.failed,
                c.vmm_errors,
                c.failures_by_kind[&FailureKind::VmmError]
            ),
            (1, 1, 1)
        );
        assert_eq!(Verdict::of(&c, true), Verdict::Fail);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["failures_by_kind"]["vmm-error"], 1, "{json}");
        assert_eq!(json["by_mode"][it.case.mode.name()], 1, "{json}");
    }
}
