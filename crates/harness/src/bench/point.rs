//! One measured point: restore a snapshot in one mode, with one fetch latency and one
//! memory, under a [`WindowObserver`]; check the run; extract its [`Sample`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use apf_host::FallbackReason;
use guest_abi::TaskKind;
use pager::{FetchLatency, LatencySummary, NbdUrl};
use vmm::source::SourceOptions;
use vmm::{RestoreOptions, RunReport};

use super::mode::{Memory, Mode};
use super::setup::Setup;
use super::window::WindowObserver;
use crate::error::{Error, Result};
use crate::interrupt;

/// Longest one restore may run before it is stopped as hung.
pub const RESTORE_TIMEOUT: Duration = Duration::from_mins(2);

/// One measured point: a setup, a mode, a fetch latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Point {
    /// The guest.
    pub setup: Setup,
    /// The mode.
    pub mode: Mode,
    /// Added delay per fetch (lazy modes).
    pub fetch_latency: Duration,
}

impl Point {
    /// `apf-v2 at 1ms (1 vCPU, 4 tasks per vCPU, memory nbd+fill)`.
    pub fn describe(&self, memory: Memory) -> String {
        format!(
            "{} at {:?} ({} vCPU, {} tasks per vCPU, memory {})",
            self.mode,
            self.fetch_latency,
            self.setup.vcpus,
            self.setup.tasks_per_vcpu,
            memory.label()
        )
    }
}

/// What one restore measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    /// Compute iterations in the window.
    pub compute_work: u64,
    /// Restore → every scan done, ms.
    pub scan_ms: f64,
    /// Missing-page faults (userfaultfd messages; duplicates included).
    pub faults: u64,
    /// Not-present APFs the guest received.
    pub apf_injected: u64,
    /// Faults the engine left synchronous, by reason (reasons with none left out).
    pub sync_fallbacks: BTreeMap<FallbackReason, u64>,
    /// uffd message → APF injected (userspace APF only; `None` when nothing was injected).
    pub inject_latency: Option<LatencySummary>,
    /// Page mapped → its page-ready handed out (userspace APF only; `None` when none was).
    pub ready_latency: Option<LatencySummary>,
    /// Guest timer ticks over the run (all vCPUs).
    pub timer_ticks: u64,
    /// Restore → guest exit, ms.
    pub elapsed_ms: f64,
    /// VM creation, eager memory and state, ms (time to the first guest instruction).
    pub setup_ms: f64,
    /// Scan tasks whose checksum matched the fill pattern (a mismatch fails the run).
    pub scans_verified: u64,
    /// Pages a prefetch mapped before any fault on them.
    pub prefetched_pages: u64,
    /// Every lazily served page present this long after the pager started, ms (`None`:
    /// not before the guest exited, or eager).
    pub resident_ms: Option<f64>,
    /// Fetches retried or failed for good (a checksum mismatch or an I/O error).
    pub fetch_retries: u64,
}

#[allow(clippy::cast_precision_loss)]
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Restores `snapshot` per `point` with `memory` (its NBD export at `nbd` when the source is
/// NBD) and runs it to its exit, measuring `window`; checks the run (exit status 0, every
/// scan checksum right, scans done) and extracts the sample.
pub fn run_point(
    snapshot: &Path,
    point: &Point,
    memory: Memory,
    nbd: Option<&NbdUrl>,
    window: Duration,
) -> Result<Sample> {
    interrupt::check()?;
    let (lazy, apf) = point.mode.restore_path();
    let mut opts = RestoreOptions::new(snapshot);
    opts.lazy = lazy;
    opts.apf = apf;
    opts.fetch_latency = if point.fetch_latency.is_zero() {
        FetchLatency::None
    } else {
        FetchLatency::Fixed(point.fetch_latency)
    };
    opts.prefetch = memory.prefetch;
    opts.source = SourceOptions {
        nbd: match memory.source {
            super::mode::Source::File => None,
            super::mode::Source::Nbd => Some(nbd.cloned().ok_or_else(|| {
                Error::Config(format!("no NBD server for {}", snapshot.display()))
            })?),
        },
        ..SourceOptions::default()
    };
    opts.timeout = Some(RESTORE_TIMEOUT);
    let mut observer = WindowObserver::new(window);
    let report = vmm::restore(&opts, &mut observer)?;
    sample(&report, &observer)
}

/// Checks a measured run and extracts its sample.
fn sample(r: &RunReport, observer: &WindowObserver) -> Result<Sample> {
    if r.exit_status != 0 {
        return Err(Error::Check(format!(
            "the guest exited with status {} ({})",
            r.exit_status,
            vmm::report::exit_status_name(r.exit_status)
        )));
    }
    if let Some(t) = r.tasks.iter().find(|t| t.checksum_ok == Some(false)) {
        return Err(Error::Check(format!(
            "task {} read memory whose checksum {:#x} is not the pattern's",
            t.index, t.checksum
        )));
    }
    let w = observer.report();
    let Some(scans_done) = w.scans_done else {
        return Err(Error::Check("the scans were not seen done".into()));
    };
    let pager = r.lazy.as_ref().map(|l| &l.pager);
    let injected = r.apf.latency.fault_to_apf.summary();
    let ready = r.apf.latency.ready_delivery.summary();
    Ok(Sample {
        compute_work: w.compute_work,
        scan_ms: ms(scans_done),
        faults: pager.map_or(0, |p| p.fault_messages),
        apf_injected: r.cpus.iter().map(|c| c.counters.not_present).sum(),
        sync_fallbacks: r
            .apf
            .engine
            .fallback
            .iter()
            .filter(|(_, n)| *n > 0)
            .collect(),
        inject_latency: (injected.count > 0).then_some(injected),
        ready_latency: (ready.count > 0).then_some(ready),
        timer_ticks: r.cpus.iter().map(|c| c.counters.timer_ticks).sum(),
        elapsed_ms: ms(r.elapsed()),
        setup_ms: r
            .restore
            .as_ref()
            .map_or(0.0, |x| ms(Duration::from_micros(x.setup_us))),
        scans_verified: r
            .tasks
            .iter()
            .filter(|t| t.kind == Some(TaskKind::Scan) && t.checksum_ok == Some(true))
            .count() as u64,
        prefetched_pages: pager.map_or(0, |p| p.prefetched_pages),
        resident_ms: pager
            .and_then(|p| p.fully_resident_ns)
            .map(|ns| ms(Duration::from_nanos(ns))),
        fetch_retries: pager.map_or(0, |p| p.fetch_retries + p.fetch_errors),
    })
}
