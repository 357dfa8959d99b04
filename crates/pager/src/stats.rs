//! Counters and latency histograms of the pager, readable from any thread while it runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// A latency distribution, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Smallest sample.
    pub min_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
    /// Mean.
    pub mean_ns: u64,
}

/// A latency distribution being recorded: an hdrhistogram from 1 ns to 1 hour with three
/// significant digits (bounded memory whatever the number of samples). The one latency type of
/// the project: the pager's and the VMM's APF path record into it, reports show its
/// [`LatencySummary`].
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Latency {
    /// An empty distribution.
    pub fn new() -> Self {
        // 1 ns .. 1 hour, 3 significant digits: valid bounds, so this cannot fail.
        Self(Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds"))
    }

    /// Records one sample (saturating at the upper bound; 0 counts as 1 ns).
    pub fn record(&mut self, d: Duration) {
        self.0
            .saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
    }

    /// Its percentiles so far.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary::of(&self.0)
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.summary().serialize(s)
    }
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let mean_ns = h.mean() as u64;
        Self {
            count: h.len(),
            min_ns: h.min(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
            mean_ns,
        }
    }
}

impl std::fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = Duration::from_nanos;
        write!(
            f,
            "n={} p50={:?} p90={:?} p99={:?} max={:?}",
            self.count,
            d(self.p50_ns),
            d(self.p90_ns),
            d(self.p99_ns),
            d(self.max_ns)
        )
    }
}

/// A snapshot of the pager's counters and latencies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PagerStats {
    /// Page-fault messages read from the userfaultfd (duplicates included).
    pub fault_messages: u64,
    /// Messages for a page whose fetch was already in flight (reported, no second fetch).
    /// With clones, a second message of the same clone for the same page: another clone's
    /// first fault on a page in flight is not a duplicate (it is reported to that clone as
    /// its own fault; it joins the fetch all the same).
    pub duplicate_faults: u64,
    /// Messages for a page already mapped (a stale message: not reported, the thread was
    /// already woken by the copy, or, from a clone, woken now: the page is in the cache).
    pub stale_faults: u64,
    /// Messages for a page whose fetch failed (after [`crate::PagerObserver::on_error`]).
    pub faults_after_error: u64,
    /// Messages for addresses outside every registered region, or other events.
    pub unexpected_events: u64,
    /// Fetches started (units; a unit is one page unless the source says otherwise).
    pub fetches: u64,
    /// Fetches started by a request rather than a fault (prefetch, `request`).
    pub requested_fetches: u64,
    /// Fetch attempts that failed and were retried.
    pub fetch_retries: u64,
    /// Prefetch jobs started (each one or more consecutive units).
    pub prefetch_fetches: u64,
    /// Pages mapped by a prefetch before any fault on them.
    pub prefetched_pages: u64,
    /// Faults on a unit whose prefetch was in flight (it got a fetch of its own).
    pub prefetch_hits: u64,
    /// Time from the pager's start until every page was present (`None`: not yet; with
    /// `--prefetch fill`, "resident at T").
    pub fully_resident_ns: Option<u64>,
    /// Time from the pager's start until the last page of the working set it was given
    /// was present (`None`: not yet, or none given).
    pub working_set_resident_ns: Option<u64>,
    /// Fetches that failed for good (reported through `on_error`).
    pub fetch_errors: u64,
    /// Pages mapped by UFFDIO_COPY (clones: written into the shared page cache).
    pub pages_copied: u64,
    /// Pages found already present on copy (EEXIST): not an error.
    pub eexist: u64,
    /// Bytes mapped.
    pub bytes_copied: u64,
    /// UFFDIO_COPY calls (clones: writes into the shared page cache).
    pub copy_calls: u64,
    /// First fault message of a page → page mapped (includes fetch and added latency).
    pub fault_to_copy: LatencySummary,
    /// Time the source took per fetch (without the added latency).
    pub fetch_time: LatencySummary,
    /// UFFDIO_COPY call time per unit.
    pub copy_time: LatencySummary,
}

/// Shared, lock-light statistics: counters are atomics; histograms sit behind one mutex that
/// only the pager thread takes while it runs (readers take it briefly for a snapshot).
#[derive(Debug)]
pub(crate) struct Stats {
    pub fault_messages: AtomicU64,
    pub duplicate_faults: AtomicU64,
    pub stale_faults: AtomicU64,
    pub faults_after_error: AtomicU64,
    pub unexpected_events: AtomicU64,
    pub fetches: AtomicU64,
    pub requested_fetches: AtomicU64,
    pub fetch_retries: AtomicU64,
    pub prefetch_fetches: AtomicU64,
    pub prefetched_pages: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub fully_resident_ns: AtomicU64,
    pub working_set_resident_ns: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub pages_copied: AtomicU64,
    pub eexist: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub copy_calls: AtomicU64,
    pub hist: Mutex<Histograms>,
}

#[derive(Debug)]
pub(crate) struct Histograms {
    pub fault_to_copy: Latency,
    pub fetch_time: Latency,
    pub copy_time: Latency,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            fault_messages: AtomicU64::new(0),
            duplicate_faults: AtomicU64::new(0),
            stale_faults: AtomicU64::new(0),
            faults_after_error: AtomicU64::new(0),
            unexpected_events: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            requested_fetches: AtomicU64::new(0),
            fetch_retries: AtomicU64::new(0),
            prefetch_fetches: AtomicU64::new(0),
            prefetched_pages: AtomicU64::new(0),
            prefetch_hits: AtomicU64::new(0),
            fully_resident_ns: AtomicU64::new(0),
            working_set_resident_ns: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            pages_copied: AtomicU64::new(0),
            eexist: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            copy_calls: AtomicU64::new(0),
            hist: Mutex::new(Histograms {
                fault_to_copy: Latency::new(),
                fetch_time: Latency::new(),
                copy_time: Latency::new(),
            }),
        }
    }

    pub fn snapshot(&self) -> PagerStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let h = self
            .hist
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        PagerStats {
            fault_messages: g(&self.fault_messages),
            duplicate_faults: g(&self.duplicate_faults),
            stale_faults: g(&self.stale_faults),
            faults_after_error: g(&self.faults_after_error),
            unexpected_events: g(&self.unexpected_events),
            fetches: g(&self.fetches),
            requested_fetches: g(&self.requested_fetches),
            fetch_retries: g(&self.fetch_retries),
            prefetch_fetches: g(&self.prefetch_fetches),
            prefetched_pages: g(&self.prefetched_pages),
            prefetch_hits: g(&self.prefetch_hits),
            fully_resident_ns: Some(g(&self.fully_resident_ns)).filter(|&t| t > 0),
            working_set_resident_ns: Some(g(&self.working_set_resident_ns)).filter(|&t| t > 0),
            fetch_errors: g(&self.fetch_errors),
            pages_copied: g(&self.pages_copied),
            eexist: g(&self.eexist),
            bytes_copied: g(&self.bytes_copied),
            copy_calls: g(&self.copy_calls),
            fault_to_copy: h.fault_to_copy.summary(),
            fetch_time: h.fetch_time.summary(),
            copy_time: h.copy_time.summary(),
        }
    }
}

pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Stores `d` in nanoseconds (at least 1: 0 means "not yet").
pub(crate) fn store_elapsed(a: &AtomicU64, d: Duration) {
    let t = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    a.store(t.max(1), Ordering::Relaxed);
}
