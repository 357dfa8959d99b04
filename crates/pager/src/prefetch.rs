//! Prefetch policies: what the pager fetches besides faulted pages.
//!
//! - `none`: faulted units only.
//! - `readahead`: sequential readahead with an adaptive window. A fault on the unit right
//!   after the previous fault's, or inside (or just past) the window queued last, is
//!   sequential: the window doubles (up to [`READAHEAD_MAX_UNITS`]) and the units after the
//!   fault up to the window are queued. Any other fault halves it (down to none) and drops
//!   what was queued for the old stream.
//! - `fill`: streams every page not yet present, in address order, until the guest is
//!   fully resident (reported as [`crate::PagerStats::fully_resident_ns`]).
//!
//! Prefetches are low priority: they wait in the pager's queue (at most
//! [`PREFETCH_DEPTH`] jobs submitted at once), a fetch thread takes one only while another
//! is left for faults, a fault always goes ahead of every queued prefetch, and a fault on a
//! unit whose prefetch is still queued gets its own high-priority fetch.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::region::GuestRegion;
use crate::working_set::{WORKING_SET_DEPTH, WorkingSetQueue};

/// The prefetch policy of a pager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Prefetch {
    /// Faulted units only.
    #[default]
    None,
    /// Sequential readahead with an adaptive window.
    Readahead,
    /// Background fill of every page not yet present.
    Fill,
}

impl fmt::Display for Prefetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prefetch::None => "none",
            Prefetch::Readahead => "readahead",
            Prefetch::Fill => "fill",
        })
    }
}

/// A `--prefetch` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad prefetch policy {0:?}: expected none, readahead or fill")]
pub struct ParsePrefetchError(String);

impl FromStr for Prefetch {
    type Err = ParsePrefetchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "none" | "off" => Ok(Prefetch::None),
            "readahead" => Ok(Prefetch::Readahead),
            "fill" => Ok(Prefetch::Fill),
            _ => Err(ParsePrefetchError(s.to_string())),
        }
    }
}

/// Readahead window at the start, in fetch units.
pub const READAHEAD_INITIAL_UNITS: u64 = 4;
/// Largest readahead window, in fetch units (4 MiB of 64 KiB chunks).
pub const READAHEAD_MAX_UNITS: u64 = 64;
/// Prefetch jobs submitted to the fetch threads at once (1 when fetching inline).
pub const PREFETCH_DEPTH: usize = 8;
/// Units in one prefetch job with fetch threads (a remote source: fewer, larger requests).
pub const BATCH_UNITS_THREADS: u64 = 16;
/// Units in one prefetch job fetched inline on the pager thread (a fault waits at most one).
pub const BATCH_UNITS_INLINE: u64 = 4;

/// The adaptive readahead window, in unit indexes (`first page / unit pages`).
#[derive(Debug)]
pub(crate) struct Readahead {
    window: u64,
    last: Option<u64>,
    /// Units `[start, end)` were queued by the last sequential step.
    start: u64,
    end: u64,
}

impl Readahead {
    pub fn new() -> Self {
        Self {
            window: READAHEAD_INITIAL_UNITS,
            last: None,
            start: 0,
            end: 0,
        }
    }

    /// A fault on unit `u` (fetch started or joined). Returns whether the fault was
    /// sequential and the units to queue.
    pub fn on_fault(&mut self, u: u64) -> (bool, Range<u64>) {
        let sequential =
            self.last.is_some_and(|l| u == l + 1) || (u >= self.start && u <= self.end);
        self.last = Some(u);
        if sequential {
            self.window = (self.window * 2).clamp(1, READAHEAD_MAX_UNITS);
        } else {
            self.window /= 2;
            self.end = u + 1;
        }
        let from = self.end.max(u + 1);
        let to = u + 1 + self.window;
        self.start = u;
        self.end = self.end.max(to);
        (sequential, from..to.max(from))
    }

    #[cfg(test)]
    pub fn window(&self) -> u64 {
        self.window
    }
}

/// What to prefetch next: the working set first (in recorded order), then per policy: the
/// readahead queue, or the fill cursor.
#[derive(Debug)]
pub(crate) struct Planner {
    policy: Prefetch,
    working_set: WorkingSetQueue,
    readahead: Readahead,
    /// Readahead: units queued for prefetch (region, first page).
    queued: VecDeque<(usize, u64)>,
    /// Fill: the next page to look at (region, page).
    fill_cursor: (usize, u64),
}

/// A prefetch job: the region index, its first page, and its units `(first page, pages)`,
/// consecutive.
pub(crate) type PrefetchJob = (usize, u64, Vec<(u64, u64)>);

impl Planner {
    pub fn new(policy: Prefetch, regions: &[GuestRegion], working_set: WorkingSetQueue) -> Planner {
        Planner {
            policy,
            working_set,
            readahead: Readahead::new(),
            queued: VecDeque::new(),
            fill_cursor: (0, regions.first().map_or(0, GuestRegion::first_page)),
        }
    }

    /// Prefetch jobs in flight at once and units per job, fetching on threads or inline:
    /// the working-set stream keeps [`WORKING_SET_DEPTH`] jobs in flight either way.
    pub fn limits(&self, threads: bool) -> (usize, u64) {
        match (threads, self.working_set.is_empty()) {
            (true, _) => (PREFETCH_DEPTH, BATCH_UNITS_THREADS),
            (false, true) => (1, BATCH_UNITS_INLINE),
            (false, false) => (WORKING_SET_DEPTH, BATCH_UNITS_INLINE),
        }
    }

    /// The unit at `first` is resident: true when it completed the working set.
    pub fn mapped(&mut self, first: u64) -> bool {
        self.working_set.mapped(first)
    }

    /// Prefetches no more (a fetch failed for good).
    pub fn stop(&mut self) {
        self.working_set.stop();
        self.queued.clear();
        self.policy = Prefetch::None;
    }

    /// Readahead: a fault on the unit at `first` (of `unit_pages`, in region `ri` of a
    /// source of `page_count` pages) moves the window and queues what follows.
    pub fn on_fault(
        &mut self,
        ri: usize,
        first: u64,
        unit_pages: u64,
        region: &GuestRegion,
        page_count: u64,
    ) {
        if self.policy != Prefetch::Readahead {
            return;
        }
        let (sequential, units) = self.readahead.on_fault(first / unit_pages);
        if !sequential {
            self.queued.clear();
        }
        for u in units {
            let p = u * unit_pages;
            if !region.contains_page(p) || p >= page_count {
                break;
            }
            self.queued.push_back((ri, p));
        }
    }

    /// True while there is something left to prefetch (of `regions` regions).
    pub fn pending(&self, regions: usize) -> bool {
        if !self.working_set.is_empty() {
            return true;
        }
        match self.policy {
            Prefetch::None => false,
            Prefetch::Readahead => !self.queued.is_empty(),
            Prefetch::Fill => self.fill_cursor.0 < regions,
        }
    }

    /// The next job: up to `batch` consecutive units of one region that `eligible` accepts
    /// (not present, not in flight, never failed), each unit as `unit_of` cuts it.
    pub fn next(
        &mut self,
        batch: u64,
        regions: &[GuestRegion],
        page_count: u64,
        unit_of: impl Fn(u64, &GuestRegion) -> (u64, u64),
        eligible: impl Fn(usize, &GuestRegion, u64) -> bool,
    ) -> Option<PrefetchJob> {
        if !self.working_set.is_empty()
            && let Some(job) = self.working_set.next(batch, regions, &unit_of, &eligible)
        {
            return Some(job);
        }
        let mut units: Vec<(u64, u64)> = Vec::new();
        let mut region_index = 0;
        match self.policy {
            Prefetch::None => return None,
            Prefetch::Readahead => {
                return take_run(&mut self.queued, batch, regions, &unit_of, &eligible, true);
            }
            Prefetch::Fill => {
                while let Some(region) = regions.get(self.fill_cursor.0).copied() {
                    let ri = self.fill_cursor.0;
                    let p = self.fill_cursor.1;
                    if p >= region.end_page() || p >= page_count {
                        if !units.is_empty() {
                            break;
                        }
                        self.fill_cursor.0 += 1;
                        if let Some(next) = regions.get(self.fill_cursor.0) {
                            self.fill_cursor.1 = next.first_page();
                        }
                        continue;
                    }
                    let (first, pages) = unit_of(p, &region);
                    if eligible(ri, &region, first) {
                        region_index = ri;
                        units.push((first, pages));
                    } else if !units.is_empty() {
                        break;
                    }
                    self.fill_cursor.1 = first + pages;
                    if units.len() as u64 >= batch {
                        break;
                    }
                }
            }
        }
        let first = units.first()?.0;
        Some((region_index, first, units))
    }
}

/// A job from the front of `queue`: up to `batch` units, consecutive in one region, each
/// accepted by `eligible` (not present, not in flight, never failed). Units taken are
/// dropped from the queue, eligible or not; with `stop_at_gap` an ineligible unit after an
/// eligible one ends the job (readahead keeps a job one sequential run), without it the run
/// goes on past it (a working set's order has holes where pages already came).
pub(crate) fn take_run(
    queue: &mut VecDeque<(usize, u64)>,
    batch: u64,
    regions: &[GuestRegion],
    unit_of: impl Fn(u64, &GuestRegion) -> (u64, u64),
    eligible: impl Fn(usize, &GuestRegion, u64) -> bool,
    stop_at_gap: bool,
) -> Option<PrefetchJob> {
    let mut units: Vec<(u64, u64)> = Vec::new();
    let mut region_index = 0;
    while let Some(&(ri, p)) = queue.front() {
        let region = regions[ri];
        let (first, pages) = unit_of(p, &region);
        let contiguous = units
            .last()
            .is_none_or(|&(f, n)| ri == region_index && f + n == first);
        if !contiguous || units.len() as u64 >= batch {
            break;
        }
        queue.pop_front();
        if eligible(ri, &region, first) {
            region_index = ri;
            units.push((first, pages));
        } else if stop_at_gap && !units.is_empty() {
            break;
        }
    }
    let first = units.first()?.0;
    Some((region_index, first, units))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_on_sequential_faults_and_shrinks_otherwise() {
        let mut r = Readahead::new();
        let (seq, q) = r.on_fault(100);
        assert!(!seq);
        assert_eq!(q, 101..103, "first fault: half the initial window");
        // The stream goes on: faults at the end of what was queued.
        let (seq, q) = r.on_fault(103);
        assert!(seq);
        assert_eq!(q, 104..108);
        let (_, q) = r.on_fault(108);
        assert_eq!(q, 109..117);
        for _ in 0..10 {
            let u = r.end;
            r.on_fault(u);
        }
        assert_eq!(r.window(), READAHEAD_MAX_UNITS);
        // Random faults halve it down to nothing.
        for u in [5, 900, 17, 4000, 33, 70_000, 2] {
            r.on_fault(u);
        }
        assert_eq!(r.window(), 0);
        let (_, q) = r.on_fault(10_000);
        assert!(q.is_empty());
        // Two consecutive faults restart it.
        let (seq, q) = r.on_fault(10_001);
        assert!(seq);
        assert_eq!(q, 10_002..10_003);
        assert_eq!("fill".parse::<Prefetch>().unwrap(), Prefetch::Fill);
        assert!("more".parse::<Prefetch>().is_err());
    }
}
