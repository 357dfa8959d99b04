//! The working-set stream: the pages a recording saw the guest touch, fetched in recorded
//! order ahead of the guest, before any other prefetch policy gets a turn.
//!
//! Each fetch unit is queued once, at its first appearance in the list; pages outside the
//! served regions (loaded before the first instruction, or not guest RAM) are skipped. A job
//! is a run of consecutive units taken from the front of the queue (a recorded scan becomes
//! a few large requests, a scattered set one request per unit); units already present or in
//! flight are dropped as they come up. Like every prefetch, the stream is low priority: a
//! fault always goes first. [`WorkingSetQueue::mapped`] tells when the last unit of the set
//! became resident, however it arrived (streamed or faulted).

use std::collections::{HashSet, VecDeque};

use crate::prefetch::{PrefetchJob, take_run};
use crate::region::GuestRegion;
use crate::uffd::PAGE_SIZE_U64;

/// Prefetch jobs of the working-set stream in flight at once (also when fetching inline:
/// the fetch itself is quick, what takes time is the added latency, which overlaps).
pub const WORKING_SET_DEPTH: usize = 8;

/// The working set's units still to stream, and those not yet resident.
#[derive(Debug, Default)]
pub(crate) struct WorkingSetQueue {
    /// (region, unit first page), in recorded order, each unit once.
    queue: VecDeque<(usize, u64)>,
    /// Units of the set not yet resident.
    left: HashSet<u64>,
    /// The set had units to serve and all of them are resident now.
    complete: bool,
}

impl WorkingSetQueue {
    /// The units holding `gpas` (guest-physical addresses, in recorded order) that lie in
    /// `regions`, cut by `unit_of`.
    pub fn new(
        gpas: &[u64],
        regions: &[GuestRegion],
        unit_of: impl Fn(u64, &GuestRegion) -> (u64, u64),
    ) -> WorkingSetQueue {
        let mut q = WorkingSetQueue::default();
        for &gpa in gpas {
            let page = gpa / PAGE_SIZE_U64;
            let Some(ri) = regions.iter().position(|r| r.contains_page(page)) else {
                continue;
            };
            let (first, _) = unit_of(page, &regions[ri]);
            if q.left.insert(first) {
                q.queue.push_back((ri, first));
            }
        }
        q
    }

    /// Units queued and not yet taken.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Streams no more (a fetch failed for good).
    pub fn stop(&mut self) {
        self.queue.clear();
    }

    /// The next job: up to `batch` units from the front of the queue, consecutive in one
    /// region, each accepted by `eligible` (not present, not in flight, never failed).
    pub fn next(
        &mut self,
        batch: u64,
        regions: &[GuestRegion],
        unit_of: impl Fn(u64, &GuestRegion) -> (u64, u64),
        eligible: impl Fn(usize, &GuestRegion, u64) -> bool,
    ) -> Option<PrefetchJob> {
        take_run(&mut self.queue, batch, regions, unit_of, eligible, false)
    }

    /// The unit at `first` is resident now. True exactly once: when it was the set's last.
    pub fn mapped(&mut self, first: u64) -> bool {
        if self.left.remove(&first) && self.left.is_empty() && !self.complete {
            self.complete = true;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<GuestRegion> {
        // Pages [16, 32) and [64, 128): unit of 4 pages.
        vec![
            GuestRegion::layout(16 * PAGE_SIZE_U64, 16 * 4096),
            GuestRegion::layout(64 * PAGE_SIZE_U64, 64 * 4096),
        ]
    }

    fn unit_of(page: u64, r: &GuestRegion) -> (u64, u64) {
        r.unit_of(4, 1 << 20, page)
    }

    #[test]
    fn units_stream_in_recorded_order_each_once_consecutive_ones_together() {
        let regs = regions();
        let gpa = |p: u64| p * PAGE_SIZE_U64;
        // 100 first, then the units 20, 24 (consecutive), 0 (not served: skipped), 21 (same
        // unit as 20: once), 64, then 68 and 72 after a unit that is present already.
        let list: Vec<u64> = [100, 20, 24, 0, 21, 64, 12, 76, 68, 72]
            .into_iter()
            .map(gpa)
            .collect();
        let mut q = WorkingSetQueue::new(&list, &regs, unit_of);
        let mut jobs = Vec::new();
        let eligible = |_: usize, _: &GuestRegion, first: u64| first != 76;
        while let Some((ri, first, units)) = q.next(8, &regs, unit_of, eligible) {
            jobs.push((ri, first, units.len()));
        }
        assert_eq!(
            jobs,
            [(1, 100, 1), (0, 20, 2), (1, 64, 1), (1, 68, 2)],
            "recorded order kept; a present unit (76) dropped"
        );
        assert!(q.is_empty());
        // Residency: true once, with the last unit of the set.
        for first in [100, 20, 24, 64, 76, 68] {
            assert!(!q.mapped(first), "{first} is not the last");
        }
        assert!(q.mapped(72));
        assert!(!q.mapped(72));
    }

    #[test]
    fn a_batch_is_cut_at_its_size() {
        let regs = regions();
        let list: Vec<u64> = (64..128).map(|p| p * PAGE_SIZE_U64).collect();
        let mut q = WorkingSetQueue::new(&list, &regs, unit_of);
        let (_, first, units) = q.next(3, &regs, unit_of, |_, _, _| true).unwrap();
        assert_eq!((first, units.len()), (64, 3));
        let (_, first, _) = q.next(3, &regs, unit_of, |_, _, _| true).unwrap();
        assert_eq!(first, 76);
    }
}
