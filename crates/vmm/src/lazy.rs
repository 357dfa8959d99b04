//! Lazily served guest memory: ranges of RAM mapped empty and registered with
//! userfaultfd through `crates/pager`, each page fetched from a verified [`PageSource`] when
//! a vCPU (or the VMM) first touches it, prefetched per policy, each fetch delayed by an
//! added latency. The pager reports faults, arrivals and failures to the run through a
//! [`PagerObserver`]; this module knows nothing of APF.
//!
//! A clone (`crate::clones`) does not own its pager: its RAM is a private mapping of the
//! clones' shared page cache, attached to the one pager that fills it ([`ClonePlan`]).

use std::ops::Range;
use std::sync::Arc;

use pager::{
    Attachment, FetchLatency, GuestRegion, PageSource, Pager, PagerConfig, PagerHandle,
    PagerObserver, PagerStats, Prefetch,
};

use crate::error::{Result, VmmError};
use crate::memory::GuestRam;
use crate::working_set::{Recorder, Replay, WorkingSetReport};

/// What to serve lazily, and how.
#[derive(Debug, Clone)]
pub struct LazyPlan {
    /// Guest-physical ranges served on demand (page aligned, each inside one RAM region).
    pub ranges: Vec<Range<u64>>,
    /// Where its pages come from (verified per chunk).
    pub source: Arc<dyn PageSource>,
    /// Added delay per fetch.
    pub latency: FetchLatency,
    /// Prefetch policy.
    pub prefetch: Prefetch,
    /// A working set: streamed first, recorded, counted.
    pub working_set: WorkingSetPlan,
}

/// What the lazy memory does with a working set.
#[derive(Debug, Clone, Default)]
pub struct WorkingSetPlan {
    /// Guest-physical pages streamed ahead of the guest, in this order.
    pub stream: Vec<u64>,
    /// Counts hits and misses of a replay.
    pub replay: Option<Arc<Replay>>,
    /// Records the pages the guest touches first.
    pub recorder: Option<Arc<Recorder>>,
}

/// A clone's lazy memory: `lazy` says what is served (for the report); `pager` is the
/// shared-cache pager that serves it to every clone (`pager::Pager::start_shared`).
#[derive(Debug, Clone)]
pub struct ClonePlan {
    /// What is served, and how.
    pub lazy: LazyPlan,
    /// The pager that fills the shared cache.
    pub pager: PagerHandle,
}

/// The lazy section of a run's report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LazyReport {
    /// Where the memory came from.
    pub source: String,
    /// The prefetch policy.
    pub prefetch: Prefetch,
    /// The added fetch latency, as given.
    pub fetch_latency: String,
    /// Bytes of guest memory served on demand.
    pub lazy_bytes: u64,
    /// Of those, pages present at the end.
    pub resident_pages: u64,
    /// The pager's counters and latencies, as they are.
    pub pager: PagerStats,
}

/// A running pager over part of guest RAM (or a clone's attachment to the shared one).
/// Holds the RAM alive: the pager writes into it until it is stopped.
#[derive(Debug)]
pub struct LazyMemory {
    backend: Backend,
    plan: LazyPlan,
    ram: Arc<GuestRam>,
}

#[derive(Debug)]
enum Backend {
    /// A pager of its own.
    Own(Pager),
    /// A clone attached to the shared-cache pager.
    Clone {
        pager: PagerHandle,
        attachment: Attachment,
    },
}

/// `ranges` of `ram` as pager regions.
fn regions(ranges: &[Range<u64>], ram: &GuestRam) -> Result<Vec<GuestRegion>> {
    ranges
        .iter()
        .map(|range| {
            let len = usize::try_from(range.end - range.start)
                .map_err(|_| VmmError::Config(format!("lazy range {range:#x?} too large")))?;
            // Inside one RAM region, so one host mapping (checked by `host_ptr`).
            let host = ram.host_ptr(range.start, len)?;
            // SAFETY: `host` is the start of `len` bytes of guest RAM: a private mapping
            // (anonymous, or of the clones' shared cache) owned by `ram`, which the
            // `LazyMemory` holding this region keeps alive until its pager is stopped (or,
            // for a clone, until the run is over; the shared pager only wakes its threads,
            // it never writes into it). Nothing in the VMM treats guest RAM as typed Rust
            // values.
            Ok(unsafe { GuestRegion::new(range.start, host, len) })
        })
        .collect()
}

impl LazyMemory {
    /// Registers `plan.ranges` of `ram` (still untouched) with a new pager and starts it.
    pub fn start(
        plan: LazyPlan,
        ram: &Arc<GuestRam>,
        observer: Arc<dyn PagerObserver>,
    ) -> Result<LazyMemory> {
        let pager = Pager::start(
            regions(&plan.ranges, ram)?,
            Arc::clone(&plan.source),
            observer,
            &PagerConfig {
                latency: plan.latency,
                prefetch: plan.prefetch,
                working_set: plan.working_set.stream.clone(),
                ..PagerConfig::default()
            },
        )?;
        Ok(LazyMemory {
            backend: Backend::Own(pager),
            plan,
            ram: Arc::clone(ram),
        })
    }

    /// Attaches `plan.lazy.ranges` of a clone's `ram` (its private mapping of the shared
    /// cache, untouched there) to the shared pager; its faults go to `observer`.
    pub fn attach(
        plan: ClonePlan,
        ram: &Arc<GuestRam>,
        observer: Arc<dyn PagerObserver>,
    ) -> Result<LazyMemory> {
        let attachment = plan
            .pager
            .attach(regions(&plan.lazy.ranges, ram)?, observer)?;
        Ok(LazyMemory {
            backend: Backend::Clone {
                pager: plan.pager,
                attachment,
            },
            plan: plan.lazy,
            ram: Arc::clone(ram),
        })
    }

    fn handle(&self) -> PagerHandle {
        match &self.backend {
            Backend::Own(p) => p.handle(),
            Backend::Clone { pager, .. } => pager.clone(),
        }
    }

    /// The report section, now.
    pub fn report(&self) -> LazyReport {
        LazyReport {
            source: self.plan.source.describe(),
            prefetch: self.plan.prefetch,
            fetch_latency: self.plan.latency.to_string(),
            lazy_bytes: self.plan.ranges.iter().map(|r| r.end - r.start).sum(),
            resident_pages: self.handle().resident_pages(),
            pager: self.handle().stats(),
        }
    }

    /// True when the page at `gpa` is in memory (always, outside the lazy ranges).
    pub fn is_resident(&self, gpa: u64) -> bool {
        self.handle().is_resident(gpa)
    }

    /// The working-set section of a replay, now.
    pub fn working_set_report(&self) -> Option<WorkingSetReport> {
        let replay = self.plan.working_set.replay.as_ref()?;
        let ns = self.handle().stats().working_set_resident_ns;
        Some(replay.report(|gpa| self.is_resident(gpa), ns))
    }

    /// Reads `buf.len()` bytes of guest memory at `gpa` for a snapshot without faulting
    /// absent pages in: pages the pager never mapped are read from the source (verified),
    /// the others from RAM.
    pub fn read_for_snapshot(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        const PAGE: u64 = pager::PAGE_SIZE as u64;
        let source = &self.plan.source;
        let unit = source.unit_pages().max(1) * PAGE;
        let end = gpa + buf.len() as u64;
        let pager = self.handle();
        let mut at = gpa;
        let mut fetched: Option<(u64, Vec<u8>)> = None;
        while at < end {
            let page_end = ((at / PAGE) + 1) * PAGE;
            let piece_end = page_end.min(end);
            let out = &mut buf[offset(at - gpa)..offset(piece_end - gpa)];
            let lazy = self.plan.ranges.iter().find(|r| r.contains(&at));
            if lazy.is_none() || pager.is_resident(at) {
                self.ram.read(at, out)?;
            } else {
                let unit_start = at - at % unit;
                if fetched.as_ref().is_none_or(|(s, _)| *s != unit_start) {
                    // The unit, up to the end of its range (a RAM region ends on a unit).
                    let range_end = lazy.map_or(unit_start, |r| r.end);
                    let len = unit.min(range_end - unit_start);
                    let mut data = vec![0u8; offset(len)];
                    source
                        .fetch(unit_start / PAGE, &mut data)
                        .map_err(|e| VmmError::source(source.describe(), e))?;
                    fetched = Some((unit_start, data));
                }
                if let Some((s, data)) = &fetched {
                    out.copy_from_slice(&data[offset(at - s)..offset(piece_end - s)]);
                }
            }
            at = piece_end;
        }
        Ok(())
    }

    /// Stops the pager (after the vCPUs: closing the userfaultfd turns missing pages into
    /// zero pages) and returns its final counters. A clone detaches from the shared pager
    /// (which goes on serving the others) and returns its counters so far.
    pub fn stop(self) -> PagerStats {
        match self.backend {
            Backend::Own(p) => p.stop(),
            Backend::Clone { pager, attachment } => {
                attachment.detach();
                pager.stats()
            }
        }
    }
}

fn offset(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
