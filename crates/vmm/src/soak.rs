//! `apfvm soak`: restore random workloads in random modes over and over, check every run,
//! count what happened (issue 7 item 4; the result of a long run is in docs/reliability.md).
//!
//! One iteration: pick (from a seeded RNG) a guest shape — 1 or 2 vCPUs, per vCPU one scan
//! over 1–4 MiB of cold memory and compute tasks (`compute:k,scan:m`, k in 1..=4) — and the
//! APF protocol it boots with (v1 or v2); snapshot it right after the scans' fill pass (the
//! shared orchestration of [`crate::bench`], in a temporary directory removed at the end of
//! the iteration); restore it in a random mode (eager; lazy with APF off, off with KVM's APF
//! halt, userspace APF, KVM's in-kernel APF on v2 guests) with a random fetch latency (fixed
//! 0–5 ms, `uniform:`, `exp:`) and prefetch policy, and run it to its exit under a timeout.
//!
//! Every run must show: exit status 0; every task done (a task not done, or a run that hit
//! its timeout, is "stuck": a lost wakeup); every scan's checksum verified on the host; the
//! engine's tokens all answered (page ready delivered + tokens covered by a wake-all ==
//! injected, nothing outstanding at the end); eager has no fault; APF off injects nothing.
//! A VMM error or a panic (caught per iteration) is counted too. The exit status is 1 if any
//! iteration failed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::bench::{self, Mode, Setup, Snapshots};
use crate::config::ApfMode;
use crate::error::{Result, VmmError};
use crate::lazy::{FetchLatency, SourceOptions};
use crate::report::RunReport;
use crate::restore::RestoreOptions;

/// Guest RAM of every soak guest (the demo's).
pub const MEM_SIZE: u64 = 48 << 20;

/// How to soak.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// Start iterations until this long has passed (the last one runs to its end).
    pub duration: Duration,
    /// The RNG seed: the same seed picks the same sequence of iterations.
    pub seed: u64,
    /// Each restore must end within this (else it counts as stuck).
    pub restore_timeout: Duration,
    /// Write the summary and every iteration here.
    pub json: Option<PathBuf>,
    /// The command line, for the JSON.
    pub command: String,
}

/// `--duration`: like `--fetch-latency`'s durations, plus `m` (minutes) and `h` (hours).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let t = s.trim();
    let minutes = |n: &str, scale: f64| {
        n.parse::<f64>()
            .ok()
            .and_then(|v| Duration::try_from_secs_f64(v * scale).ok())
    };
    if let Some(n) = t.strip_suffix('h') {
        minutes(n, 3600.0)
    } else if let Some(n) = t.strip_suffix("min") {
        minutes(n, 60.0)
    } else if let (Some(n), false) = (t.strip_suffix('m'), t.ends_with("ms")) {
        minutes(n, 60.0)
    } else {
        pager::parse_duration(t)
    }
}

/// SplitMix64: small, seedable, good enough to pick test cases (no dependency).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::try_from(self.below(items.len() as u64)).unwrap_or(0)]
    }
}

/// What one iteration runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Case {
    /// The guest.
    pub setup: Setup,
    /// `--workload`.
    pub workload: String,
    /// The protocol the guest boots with.
    pub booted: ApfMode,
    /// The restore mode.
    pub mode: Mode,
    /// `--fetch-latency` (lazy modes; `-` for eager).
    pub fetch_latency: String,
    /// `--prefetch` (lazy modes; `-` for eager).
    pub prefetch: String,
}

impl Case {
    /// Picks a case.
    pub fn random(rng: &mut Rng) -> Case {
        let vcpus = u32::try_from(rng.range(1, 2)).unwrap_or(1);
        // k compute tasks in 1..=4 in all: (tasks_per_vcpu - 1) × vCPUs.
        let tasks_per_vcpu = if vcpus == 1 {
            rng.range(2, 5)
        } else {
            rng.range(2, 3)
        };
        let setup = Setup {
            vcpus,
            tasks_per_vcpu: u32::try_from(tasks_per_vcpu).unwrap_or(2),
            scan_per_vcpu: rng.pick(&[1u64, 2, 3, 4]) << 20,
            mem_size: MEM_SIZE,
        };
        let booted = rng.pick(&[ApfMode::V1, ApfMode::V2]);
        let apf = if booted == ApfMode::V1 {
            Mode::ApfV1
        } else {
            Mode::ApfV2
        };
        let mode = if booted == ApfMode::V2 {
            rng.pick(&[Mode::Eager, Mode::Off, Mode::OffHalt, apf, Mode::Kernel])
        } else {
            rng.pick(&[Mode::Eager, Mode::Off, Mode::OffHalt, apf])
        };
        let (fetch_latency, prefetch) = if mode == Mode::Eager {
            ("-".to_string(), "-".to_string())
        } else {
            let latency = match rng.below(3) {
                0 if rng.below(6) == 0 => "0".to_string(),
                0 => format!("{}us", rng.range(1, 5000)),
                1 => {
                    let lo = rng.range(0, 2000);
                    format!("uniform:{lo}us..{}us", lo + rng.range(1, 3000))
                }
                _ => format!("exp:{}us", rng.range(100, 2000)),
            };
            (
                latency,
                rng.pick(&["none", "readahead", "fill"]).to_string(),
            )
        };
        Case {
            workload: setup.workload(),
            setup,
            booted,
            mode,
            fetch_latency,
            prefetch,
        }
    }

    /// One line.
    pub fn describe(&self) -> String {
        format!(
            "{} vCPU {:<17} {} MiB/vCPU {:?} {:<8} {:<23} {:<9}",
            self.setup.vcpus,
            self.workload,
            self.setup.scan_per_vcpu >> 20,
            self.booted,
            self.mode.name(),
            self.fetch_latency,
            self.prefetch
        )
    }
}

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
    /// Userspace engine: tokens outstanding at the end.
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
    fn new(index: u64, started_s: f64, case: Case) -> Iteration {
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

    fn error(&mut self, phase: &str, e: &VmmError) {
        let all = u64::from(self.case.setup.vcpus * self.case.setup.tasks_per_vcpu);
        if matches!(e, VmmError::Timeout { .. }) {
            self.stuck_tasks = all;
            self.lost_wakeups += all;
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default().to_string();
            self.fail(FailureKind::Stuck, format!("{phase}: {first}"));
        } else {
            self.fail(FailureKind::VmmError, format!("{phase}: {e}"));
        }
    }

    fn check(&mut self, r: &RunReport) {
        let lazy = r.restore.as_ref().and_then(|x| x.lazy.as_ref());
        self.restore_ms = ms(r.elapsed_us);
        self.faults = lazy.map_or(0, |l| l.pager_fault_messages);
        self.apf_injected = r.cpus.iter().map(|c| c.counters.not_present).sum();
        self.guest_page_ready = r.cpus.iter().map(|c| c.counters.page_ready).sum();
        self.guest_wake_all = r.cpus.iter().map(|c| c.counters.wake_all).sum();
        let e = &r.engine;
        self.engine_injected = e.injected;
        self.page_ready_delivered = e.page_ready_delivered;
        self.tokens_covered_by_wake_all = e.tokens_covered_by_wake_all;
        self.tokens_dropped_other = e.tokens_dropped_other;
        self.wake_alls_delivered = e.wake_all_delivered;
        self.outstanding_at_end = e.outstanding_at_end;
        self.sync_fallbacks = e.fallback.values().sum();
        self.tasks = r.tasks.len();

        if r.exit_status != 0 {
            self.fail(
                FailureKind::ExitStatus,
                format!(
                    "the guest exited with status {} ({})",
                    r.exit_status,
                    crate::report::exit_status_name(r.exit_status)
                ),
            );
        }
        let expected = self.case.setup.vcpus * self.case.setup.tasks_per_vcpu;
        if r.tasks.len() != expected as usize {
            self.fail(
                FailureKind::Stuck,
                format!("{} tasks reported, {expected} expected", r.tasks.len()),
            );
        }
        for t in &r.tasks {
            if t.state != "done" {
                self.stuck_tasks += 1;
                self.fail(
                    FailureKind::Stuck,
                    format!("task {} ({}) is {}", t.index, t.kind, t.state),
                );
            } else if t.exit_code != 0 {
                self.fail(
                    FailureKind::ExitStatus,
                    format!("task {} ({}) exited with {}", t.index, t.kind, t.exit_code),
                );
            }
            if t.kind == "scan" && t.checksum_ok != Some(true) {
                self.checksum_mismatches += 1;
                self.fail(
                    FailureKind::ChecksumMismatch,
                    format!(
                        "task {} read checksum {:#x} ({})",
                        t.index,
                        t.checksum,
                        if t.checksum_ok.is_none() {
                            "not verified"
                        } else {
                            "not the fill pattern's"
                        }
                    ),
                );
            }
        }
        let answered = e.page_ready_delivered + e.tokens_covered_by_wake_all;
        let unanswered = e
            .outstanding_at_end
            .max(e.injected.saturating_sub(answered + e.tokens_dropped_other));
        self.lost_wakeups += unanswered + self.stuck_tasks;
        if answered != e.injected || e.outstanding_at_end != 0 {
            self.fail(
                FailureKind::LostWakeup,
                format!(
                    "engine: {} injected, {} page ready + {} covered by a wake-all ({} dropped otherwise), {} outstanding at the end",
                    e.injected,
                    e.page_ready_delivered,
                    e.tokens_covered_by_wake_all,
                    e.tokens_dropped_other,
                    e.outstanding_at_end
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

#[allow(clippy::cast_precision_loss)]
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

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
    pub by_mode: BTreeMap<String, u64>,
    /// Iterations by the protocol the guest booted with.
    pub by_booted: BTreeMap<String, u64>,
    /// Lazy iterations by prefetch policy.
    pub by_prefetch: BTreeMap<String, u64>,
    /// Lazy iterations by latency kind (`none`, `fixed`, `uniform`, `exp`).
    pub by_latency: BTreeMap<String, u64>,
    /// Missing-page faults.
    pub faults: u64,
    /// Not-present APFs the guest received (all APF modes).
    pub apf_injected: u64,
    /// Page ready the guest took.
    pub guest_page_ready: u64,
    /// Wake-alls the guest took.
    pub guest_wake_all: u64,
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
    pub failures_by_kind: BTreeMap<String, u64>,
    /// VMM errors (must be 0).
    pub vmm_errors: u64,
    /// VMM panics (must be 0).
    pub panics: u64,
}

impl Counts {
    fn add(&mut self, it: &Iteration) {
        self.iterations += 1;
        if it.passed() {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        *self.by_mode.entry(it.case.mode.name().into()).or_default() += 1;
        *self
            .by_booted
            .entry(format!("{:?}", it.case.booted).to_lowercase())
            .or_default() += 1;
        if it.case.mode != Mode::Eager {
            *self
                .by_prefetch
                .entry(it.case.prefetch.clone())
                .or_default() += 1;
            let kind = match it.case.fetch_latency.split_once(':') {
                Some((k, _)) => k.to_string(),
                None if it.case.fetch_latency == "0" => "none".into(),
                None => "fixed".into(),
            };
            *self.by_latency.entry(kind).or_default() += 1;
        }
        self.faults += it.faults;
        self.apf_injected += it.apf_injected;
        self.guest_page_ready += it.guest_page_ready;
        self.guest_wake_all += it.guest_wake_all;
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
            let name = serde_json::to_value(k)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *self.failures_by_kind.entry(name).or_default() += 1;
            match k {
                FailureKind::VmmError => self.vmm_errors += 1,
                FailureKind::Panic => self.panics += 1,
                _ => {}
            }
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
    pub machine: bench::Machine,
    /// Each restore's timeout, s.
    pub restore_timeout_s: f64,
    /// The totals.
    pub counts: Counts,
    /// True when no iteration failed.
    pub passed: bool,
}

impl Summary {
    /// The text printed at the end.
    pub fn text(&self) -> String {
        let c = &self.counts;
        let map = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
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
            "  lost wakeups {}, stuck tasks {}, checksum mismatches {}, VMM errors {}, VMM panics {}",
            c.lost_wakeups, c.stuck_tasks, c.checksum_mismatches, c.vmm_errors, c.panics
        );
        if !c.failures_by_kind.is_empty() {
            let _ = writeln!(
                s,
                "  failed iterations by kind: {}",
                map(&c.failures_by_kind)
            );
        }
        let _ = writeln!(s, "  result: {}", if self.passed { "PASS" } else { "FAIL" });
        s
    }
}

/// What `--json` gets.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SoakReport {
    /// The totals.
    pub summary: Summary,
    /// Every iteration.
    pub iterations: Vec<Iteration>,
}

/// Runs one iteration; errors and panics become failures of the record.
pub fn iteration(index: u64, started_s: f64, case: Case, timeout: Duration) -> Iteration {
    let mut rec = Iteration::new(index, started_s, case);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_case(&rec.case, timeout)));
    match outcome {
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

type Phased<T> = std::result::Result<T, (&'static str, VmmError)>;

fn run_case(case: &Case, timeout: Duration) -> Phased<(f64, RunReport)> {
    let t = Instant::now();
    // One fresh snapshot per iteration, removed with `snaps` when this returns.
    let mut snaps = Snapshots::new().map_err(|e| ("snapshot", e))?;
    let dir = snaps
        .get(case.setup, case.booted)
        .map_err(|e| ("snapshot", e))?;
    let snapshot_ms = t.elapsed().as_secs_f64() * 1000.0;
    let (lazy, apf) = case.mode.restore_path();
    let fetch_latency: FetchLatency = if lazy {
        case.fetch_latency
            .parse()
            .map_err(|e| ("restore", VmmError::Config(format!("{e}"))))?
    } else {
        FetchLatency::None
    };
    let source = SourceOptions {
        prefetch: if lazy {
            case.prefetch
                .parse()
                .map_err(|e| ("restore", VmmError::Config(format!("{e}"))))?
        } else {
            SourceOptions::default().prefetch
        },
        ..SourceOptions::default()
    };
    let report = crate::restore::restore_with(
        &RestoreOptions {
            dir,
            lazy,
            apf,
            fetch_latency,
            timeout: Some(timeout),
            echo_console: false,
            snapshot: None,
            window: None,
            apf_max_outstanding: None,
        },
        &source,
    )
    .map_err(|e| ("restore", e))?;
    drop(snaps);
    Ok((snapshot_ms, report))
}

/// Runs the soak, printing one line per iteration and the summary; writes `--json`.
pub fn soak(o: &SoakOptions) -> Result<SoakReport> {
    bench::require_kvm()?;
    bench::catch_interrupts();
    let started = bench::utc_now();
    let t0 = Instant::now();
    let mut rng = Rng::new(o.seed);
    let mut counts = Counts::default();
    let mut iterations = Vec::new();
    println!(
        "apfvm soak: {:?} from {started}, seed {}, restore timeout {:?}",
        o.duration, o.seed, o.restore_timeout
    );
    let mut index = 0;
    while t0.elapsed() < o.duration && !bench::interrupted() {
        index += 1;
        let case = Case::random(&mut rng);
        let it = iteration(index, t0.elapsed().as_secs_f64(), case, o.restore_timeout);
        if bench::interrupted() && !it.passed() {
            // Stopped by Ctrl-C in the middle: not a failure of the VMM.
            break;
        }
        println!("{}", it.line());
        counts.add(&it);
        iterations.push(it);
    }
    let summary = Summary {
        command: o.command.clone(),
        seed: o.seed,
        duration_s: o.duration.as_secs_f64(),
        elapsed_s: t0.elapsed().as_secs_f64(),
        started,
        ended: bench::utc_now(),
        interrupted: bench::interrupted(),
        machine: bench::Machine::this(),
        restore_timeout_s: o.restore_timeout.as_secs_f64(),
        passed: counts.failed == 0,
        counts,
    };
    let report = SoakReport {
        summary,
        iterations,
    };
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| VmmError::Bench(format!("serializing the soak report: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|err| VmmError::Os {
            what: "write the --json file",
            err,
        })?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_minutes_and_hours() {
        assert_eq!(parse_duration("30m"), Some(Duration::from_mins(30)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_mins(90)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2min"), Some(Duration::from_mins(2)));
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("ten"), None);
    }

    #[test]
    fn cases_are_seeded_valid_and_cover_every_mode() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut modes = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let c = Case::random(&mut a);
            assert_eq!(c.describe(), Case::random(&mut b).describe());
            let compute = (c.setup.tasks_per_vcpu - 1) * c.setup.vcpus;
            assert!((1..=4).contains(&compute), "{c:?}");
            assert!((1..=2).contains(&c.setup.vcpus));
            if c.mode == Mode::Kernel {
                assert_eq!(c.booted, ApfMode::V2);
            }
            if c.mode == Mode::ApfV1 {
                assert_eq!(c.booted, ApfMode::V1);
            }
            if c.mode == Mode::Eager {
                assert_eq!(c.fetch_latency, "-");
            } else {
                c.fetch_latency.parse::<FetchLatency>().unwrap();
                c.prefetch.parse::<pager::Prefetch>().unwrap();
            }
            modes.insert(c.mode);
        }
        assert_eq!(modes.len(), Mode::ALL.len());
    }

    #[test]
    fn checks_count_what_a_run_got_wrong() {
        let mut rng = Rng::new(1);
        let mut it = Iteration::new(1, 0.0, Case::random(&mut rng));
        it.error(
            "restore",
            &VmmError::Timeout {
                after: Duration::from_mins(1),
                console: String::new(),
            },
        );
        assert_eq!(it.failures[0].kind, FailureKind::Stuck);
        assert!(it.lost_wakeups > 0);
        let mut c = Counts::default();
        c.add(&it);
        assert_eq!((c.failed, c.failures_by_kind["stuck"]), (1, 1));
        assert!(it.line().contains("FAIL"));
    }
}
