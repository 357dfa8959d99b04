//! `apfvm soak`: restore random workloads in random modes over and over, check every run,
//! count what happened (issue 7 item 4; the result of a long run is in docs/reliability.md).
//!
//! One iteration ([`case`]): pick (from a seeded generator) a guest shape — 1 or 2 vCPUs,
//! per vCPU one scan over 1–4 MiB of cold memory and compute tasks (`compute:k,scan:m`, k in
//! 1..=4) — and the APF protocol it boots with (v1 or v2); snapshot it right after the
//! scans' fill pass (in a temporary directory removed at the end of the iteration); restore
//! it in a random mode (eager; lazy with APF off, off with KVM's APF halt, userspace APF,
//! KVM's in-kernel APF on v2 guests) with a random fetch latency (fixed 0–5 ms, `uniform:`,
//! `exp:`) and prefetch policy, and run it to its exit under a timeout.
//!
//! Every run must pass the checks of [`iteration`](mod@iteration); [`summary`] counts them. The verdict is
//! FAIL if any iteration failed, INTERRUPTED if SIGINT or SIGTERM stopped the soak before
//! its duration, PASS otherwise.

pub mod case;
pub mod iteration;
pub mod summary;

use std::time::{Duration, Instant};

pub use case::Case;
pub use iteration::{Failure, FailureKind, Iteration, iteration};
pub use summary::{Counts, Summary, Verdict};

use crate::error::{Result, require_kvm};
use crate::host::{Host, utc_now};
use crate::interrupt;

/// How to soak.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// Start iterations until this long has passed (the last one runs to its end).
    pub duration: Duration,
    /// The generator's seed: the same seed picks the same sequence of iterations.
    pub seed: u64,
    /// Each restore must end within this (else it counts as stuck).
    pub restore_timeout: Duration,
    /// The command line, for the JSON.
    pub command: String,
}

/// What `--json` gets.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SoakReport {
    /// The totals.
    pub summary: Summary,
    /// Every iteration.
    pub iterations: Vec<Iteration>,
}

/// Where the soak stands, as it goes.
#[derive(Clone, Copy, Debug)]
pub enum SoakEvent<'a> {
    /// It starts (the first line: duration, start, seed).
    Started(&'a str),
    /// An iteration ended.
    Iteration(&'a Iteration),
}

/// Runs the soak, telling `on_event` as it goes; SIGINT/SIGTERM stop it after the iteration
/// in progress (its verdict is then INTERRUPTED, or FAIL).
pub fn soak(o: &SoakOptions, mut on_event: impl FnMut(SoakEvent<'_>)) -> Result<SoakReport> {
    require_kvm()?;
    interrupt::catch()?;
    let started = utc_now();
    let t0 = Instant::now();
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let mut counts = Counts::default();
    let mut iterations = Vec::new();
    on_event(SoakEvent::Started(&format!(
        "apfvm soak: {:?} from {started}, seed {}, restore timeout {:?}",
        o.duration, o.seed, o.restore_timeout
    )));
    let mut index = 0;
    while t0.elapsed() < o.duration && !interrupt::interrupted() {
        index += 1;
        let case = Case::random(&mut rng);
        let it = iteration(index, t0.elapsed().as_secs_f64(), case, o.restore_timeout);
        if interrupt::interrupted() && !it.passed() {
            // Stopped by Ctrl-C in the middle: not a failure of the VMM.
            break;
        }
        on_event(SoakEvent::Iteration(&it));
        counts.add(&it);
        iterations.push(it);
    }
    let interrupted = interrupt::interrupted();
    let result = Verdict::of(&counts, interrupted);
    let summary = Summary {
        command: o.command.clone(),
        seed: o.seed,
        duration_s: o.duration.as_secs_f64(),
        elapsed_s: t0.elapsed().as_secs_f64(),
        started,
        ended: utc_now(),
        interrupted,
        machine: Host::this(),
        restore_timeout_s: o.restore_timeout.as_secs_f64(),
        counts,
        result,
        passed: result == Verdict::Pass,
    };
    Ok(SoakReport {
        summary,
        iterations,
    })
}
