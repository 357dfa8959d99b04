//! Fetched units held until their added latency has passed, earliest deadline first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

/// A fetched unit waiting for its deadline.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// When it may be mapped.
    pub at: Instant,
    /// Its first page.
    pub first: u64,
    /// Its bytes.
    pub buf: Vec<u8>,
    /// Fetched by a prefetch job.
    pub prefetch: bool,
}

impl PartialEq for Fetched {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.first == other.first
    }
}
impl Eq for Fetched {}
impl PartialOrd for Fetched {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Fetched {
    // Earliest deadline first in a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .cmp(&self.at)
            .then_with(|| other.first.cmp(&self.first))
    }
}

/// The held units.
#[derive(Debug, Default)]
pub(crate) struct Deadlines(BinaryHeap<Fetched>);

impl Deadlines {
    /// Holds `unit` until its deadline.
    pub fn push(&mut self, unit: Fetched) {
        self.0.push(unit);
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.0.peek().map(|f| f.at)
    }

    /// A unit whose deadline has passed at `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<Fetched> {
        if self.0.peek().is_some_and(|f| f.at <= now) {
            self.0.pop()
        } else {
            None
        }
    }
}
