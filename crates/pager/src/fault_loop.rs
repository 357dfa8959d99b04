//! The fault loop, on the pager thread.
//!
//! ```text
//! uffd message ─► page mapped?  yes ─► stale (counted, UFFDIO_WAKE), not reported
//!                 in flight?    yes ─► join it, report on_fault(duplicate)
//!                 otherwise ─► report on_fault, start the fetch of its unit
//! fetch done ─► hold until done + sampled delay (deadline queue)
//! deadline ─► UFFDIO_COPY (EEXIST = already there) ─► mark present ─► on_page_ready
//! idle fetch slots ─► prefetch jobs (readahead queue / fill cursor), low priority
//! ```
//! The pager thread blocks only in poll(2) on the uffd and its wake eventfd, with a timeout
//! at the next deadline; it never waits for a vCPU or guest memory, and waits for a fetch
//! only when fetching inline (a fast source).

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

use crate::error::PagerError;
use crate::fetch::{Done, FetchPool, Job, fetch};
use crate::latency::LatencySampler;
use crate::observer::{FaultEvent, PagerObserver};
use crate::pager::Shared;
use crate::prefetch::{
    BATCH_UNITS_INLINE, BATCH_UNITS_THREADS, PREFETCH_DEPTH, Prefetch, Readahead,
};
use crate::region::GuestRegion;
use crate::source::{PageSource, SourceError};
use crate::stats::{bump, record};
use crate::uffd::{CopyOutcome, PAGE_SIZE, PAGE_SIZE_U64, Uffd, UffdError, UffdEvent};

/// A fetch in flight (or fetched, waiting for its deadline).
struct InFlight {
    region: usize,
    pages: u64,
    /// Fetched by a prefetch job (still queued, maybe): a fault on it gets its own fetch.
    prefetch: bool,
    /// Pages reported through `on_fault`, with the time of their first message.
    faulted: Vec<(u64, Instant)>,
}

/// A fetched unit waiting for its deadline.
struct Ready {
    at: Instant,
    first: u64,
    buf: Vec<u8>,
    prefetch: bool,
}

impl PartialEq for Ready {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.first == other.first
    }
}
impl Eq for Ready {}
impl PartialOrd for Ready {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ready {
    // Earliest deadline first in a max-heap.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .at
            .cmp(&self.at)
            .then_with(|| other.first.cmp(&self.first))
    }
}

pub(crate) struct FaultLoop {
    uffd: Uffd,
    shared: Arc<Shared>,
    observer: Arc<dyn PagerObserver>,
    sampler: LatencySampler,
    unit_pages: u64,
    page_count: u64,
    retries: u32,
    source: Arc<dyn PageSource>,
    pool: FetchPool,
    /// Keyed by the unit's first page.
    inflight: HashMap<u64, InFlight>,
    /// Pages whose fetch failed for good.
    failed: HashSet<u64>,
    ready: BinaryHeap<Ready>,
    spare: Vec<Vec<u8>>,
    prefetch: Prefetch,
    readahead: Readahead,
    /// Readahead: units queued for prefetch (region, first page).
    queued: VecDeque<(usize, u64)>,
    /// Fill: the next page to look at (region, page).
    fill_cursor: (usize, u64),
    /// Prefetch jobs submitted and not yet mapped.
    prefetch_jobs: usize,
    /// Pages mapped so far, and the number that makes the guest fully resident.
    resident_pages: u64,
    target_pages: u64,
    started: Instant,
}

impl FaultLoop {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        uffd: Uffd,
        shared: Arc<Shared>,
        observer: Arc<dyn PagerObserver>,
        source: Arc<dyn PageSource>,
        pool: FetchPool,
        sampler: LatencySampler,
        retries: u32,
        prefetch: Prefetch,
    ) -> Self {
        let page_count = source.page_count();
        let target_pages = shared
            .regions
            .iter()
            .map(|r| r.end_page().min(page_count).saturating_sub(r.first_page()))
            .sum();
        let fill_cursor = (0, shared.regions.first().map_or(0, GuestRegion::first_page));
        Self {
            uffd,
            shared,
            observer,
            sampler,
            unit_pages: source.unit_pages(),
            page_count: source.page_count(),
            retries,
            source,
            pool,
            inflight: HashMap::new(),
            failed: HashSet::new(),
            ready: BinaryHeap::new(),
            spare: Vec::new(),
            prefetch,
            readahead: Readahead::new(),
            queued: VecDeque::new(),
            fill_cursor,
            prefetch_jobs: 0,
            resident_pages: 0,
            target_pages,
            started: Instant::now(),
        }
    }

    pub fn run(mut self) {
        let mut events = Vec::with_capacity(64);
        while !self.shared.stop.load(Ordering::Acquire) {
            self.pump_prefetch();
            // Inline prefetch work that can start now: poll without waiting (a job held in
            // the deadline queue is waited for like any other).
            let busy =
                !self.pool.has_threads() && self.prefetch_jobs == 0 && self.prefetch_pending();
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                self.ready
                    .peek()
                    .map(|r| r.at.saturating_duration_since(Instant::now()))
            }
            .map(|d| Timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            let (uffd_ready, wake_ready) = {
                let mut fds = [
                    PollFd::new(&self.uffd, PollFlags::IN),
                    PollFd::new(&self.shared.wake, PollFlags::IN),
                ];
                match poll(&mut fds, timeout.as_ref()) {
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(errno) => {
                        self.fatal(UffdError::Os {
                            what: "poll",
                            errno,
                        });
                        break;
                    }
                }
                (!fds[0].revents().is_empty(), !fds[1].revents().is_empty())
            };
            if wake_ready {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(&self.shared.wake, &mut b);
            }
            while let Some(done) = self.pool.try_done() {
                self.on_done(done);
            }
            self.take_requests();
            if uffd_ready {
                loop {
                    events.clear();
                    match self.uffd.read_events(&mut events, 64) {
                        Ok(0) => break,
                        Ok(_) => {
                            let at = Instant::now();
                            for &e in &events {
                                self.on_event(e, at);
                            }
                        }
                        Err(e) => {
                            self.fatal(e);
                            return self.finish();
                        }
                    }
                }
            }
            self.map_due();
        }
        self.finish();
    }

    fn finish(mut self) {
        self.pool.shutdown();
        // `self.uffd` closes here: blocked threads are woken, the regions unregistered.
    }

    /// The loop cannot go on: report, then keep the userfaultfd open (closing it would let
    /// a faulting vCPU run on a zero page) until the VMM stops the pager.
    fn fatal(&self, e: UffdError) {
        tracing::error!(error = %e, "pager: userfaultfd failed");
        self.observer.on_error(PagerError::Uffd(e));
        while !self.shared.stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(&self.shared.wake, PollFlags::IN)];
            let _ = poll(&mut fds, None);
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&self.shared.wake, &mut b);
        }
    }

    fn on_event(&mut self, event: UffdEvent, at: Instant) {
        let UffdEvent::PageFault {
            address,
            flags,
            thread_id,
        } = event
        else {
            bump(&self.shared.stats.unexpected_events, 1);
            tracing::warn!(?event, "pager: unexpected userfaultfd event");
            return;
        };
        let stats = &self.shared.stats;
        bump(&stats.fault_messages, 1);
        let address = address & !(PAGE_SIZE_U64 - 1);
        let Some((ri, gpa)) = self
            .shared
            .regions
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.gpa_of_host(address).map(|g| (i, g)))
        else {
            bump(&stats.unexpected_events, 1);
            tracing::warn!(address, "pager: fault outside every region");
            return;
        };
        let page = gpa / PAGE_SIZE_U64;
        let region = self.shared.regions[ri];
        if self.shared.resident.get(ri, &region, page) {
            // Queued before the copy that already woke its thread; wake again to be sure.
            bump(&stats.stale_faults, 1);
            let _ = self.uffd.wake(region.host_of_page(page), PAGE_SIZE);
            return;
        }
        if self.failed.contains(&page) {
            bump(&stats.faults_after_error, 1);
            return;
        }
        let (first, pages) = self.unit_of(page, &region);
        let event = |duplicate| FaultEvent {
            gpa,
            host_addr: address,
            thread_id,
            at,
            write: UffdEvent::is_write(flags),
            duplicate,
        };
        tracing::trace!(gpa, thread_id, "pager: fault");
        if let Some(f) = self.inflight.get_mut(&first) {
            let duplicate = f.faulted.iter().any(|&(p, _)| p == page);
            if duplicate {
                bump(&stats.duplicate_faults, 1);
            } else {
                f.faulted.push((page, at));
            }
            // A fault on a prefetched unit: it jumps ahead with a fetch of its own (the
            // prefetch job may still wait in the low-priority queue).
            let boost = std::mem::take(&mut f.prefetch);
            let pages = f.pages;
            self.observer.on_fault(&event(duplicate));
            if boost {
                bump(&stats.prefetch_hits, 1);
                self.start_fetch(first, pages, false);
            }
            if !duplicate {
                self.readahead_after(ri, first);
            }
        } else {
            if page >= self.page_count {
                self.fail(
                    page,
                    page..page + 1,
                    vec![gpa],
                    SourceError::OutOfRange {
                        page,
                        page_count: self.page_count,
                    },
                );
                return;
            }
            self.inflight.insert(
                first,
                InFlight {
                    region: ri,
                    pages,
                    prefetch: false,
                    faulted: vec![(page, at)],
                },
            );
            // Report first (the VMM's kick is the latency-critical step), then fetch: with
            // inline fetching and no latency the page is mapped inside `start_fetch`, and
            // `on_page_ready` must follow `on_fault`.
            self.observer.on_fault(&event(false));
            self.start_fetch(first, pages, false);
            self.readahead_after(ri, first);
        }
    }

    /// The aligned fetch unit holding `page`, clipped to its region and to the source.
    fn unit_of(&self, page: u64, region: &GuestRegion) -> (u64, u64) {
        let start = page / self.unit_pages * self.unit_pages;
        let first = start.max(region.first_page());
        let end = (start + self.unit_pages)
            .min(region.end_page())
            .min(self.page_count.max(page + 1));
        (first, end - first)
    }

    fn take_requests(&mut self) {
        let gpas = std::mem::take(
            &mut *self
                .shared
                .requests
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for gpa in gpas {
            let Some((ri, region)) = self.shared.region_of_gpa(gpa) else {
                continue;
            };
            let region = *region;
            let page = gpa / PAGE_SIZE_U64;
            if page >= self.page_count
                || self.shared.resident.get(ri, &region, page)
                || self.failed.contains(&page)
            {
                continue;
            }
            let (first, pages) = self.unit_of(page, &region);
            if self.inflight.contains_key(&first) {
                continue;
            }
            self.inflight.insert(
                first,
                InFlight {
                    region: ri,
                    pages,
                    prefetch: false,
                    faulted: Vec::new(),
                },
            );
            bump(&self.shared.stats.requested_fetches, 1);
            self.start_fetch(first, pages, false);
        }
    }

    /// Starts the fetch of `pages` pages from `first` (one unit, or several consecutive
    /// units of one region for a prefetch job).
    fn start_fetch(&mut self, first: u64, pages: u64, prefetch: bool) {
        bump(&self.shared.stats.fetches, 1);
        let len = usize::try_from(pages).expect("unit fits") * PAGE_SIZE;
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        let job = Job {
            first,
            buf,
            delay: self.sampler.sample(),
            prefetch,
        };
        // Without fetch threads (or, impossibly, with none left), fetch right here.
        let Some(job) = self.pool.submit(job, prefetch) else {
            return;
        };
        let done = fetch(&*self.source, job, self.retries, &self.shared.stats);
        self.on_done(done);
    }

    fn on_done(&mut self, done: Done) {
        record(
            &mut self
                .shared
                .stats
                .hist
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fetch_time,
            done.fetch_time,
        );
        match done.result {
            Ok(buf) => {
                let at = Instant::now() + done.delay;
                if done.delay.is_zero() {
                    self.map_job(done.first, buf, done.prefetch);
                } else {
                    self.ready.push(Ready {
                        at,
                        first: done.first,
                        buf,
                        prefetch: done.prefetch,
                    });
                }
            }
            Err(e) => {
                if done.prefetch {
                    self.prefetch_jobs -= 1;
                }
                // Every unit of the job fails (a fault's job is one unit).
                let mut faulted = Vec::new();
                let end = done.first + done.pages;
                let mut u = done.first;
                while u < end {
                    let Some(f) = self.inflight.remove(&u) else {
                        u += 1;
                        continue;
                    };
                    faulted.extend(f.faulted.iter().map(|&(p, _)| p * PAGE_SIZE_U64));
                    u += f.pages.max(1);
                }
                self.fail(done.first, done.first..end, faulted, e);
            }
        }
    }

    /// Maps a finished job unit by unit (a prefetch job holds several) and returns its
    /// buffer to the spares.
    fn map_job(&mut self, first: u64, buf: Vec<u8>, prefetch: bool) {
        if prefetch {
            self.prefetch_jobs -= 1;
        }
        let mut off = 0;
        let mut u = first;
        while off < buf.len() {
            let Some((_, region)) = self.shared.region_of_gpa(u * PAGE_SIZE_U64) else {
                break;
            };
            let region = *region;
            let (_, pages) = self.unit_of(u, &region);
            let len = usize::try_from(pages).expect("unit fits") * PAGE_SIZE;
            let len = len.min(buf.len() - off);
            // A unit no longer in flight was mapped by a fault's own fetch, or failed.
            self.map(u, &buf[off..off + len]);
            off += len;
            u += pages;
        }
        self.spare.push(buf);
    }

    /// A fetch failed for good: report it; its pages are never fetched again.
    fn fail(&mut self, first: u64, pages: Range<u64>, faulted: Vec<u64>, e: SourceError) {
        bump(&self.shared.stats.fetch_errors, 1);
        self.inflight.remove(&first);
        // The VM is being stopped: prefetch no more (a source that is down would only keep
        // the fetch threads waiting).
        self.queued.clear();
        self.prefetch = Prefetch::None;
        self.failed.extend(pages);
        let err = PagerError::Fetch {
            what: self.source.describe(),
            faulted,
            source: e,
        };
        tracing::error!(error = %err, "pager: fetch failed");
        self.observer.on_error(err);
    }

    fn map_due(&mut self) {
        let now = Instant::now();
        while self.ready.peek().is_some_and(|r| r.at <= now) {
            let r = self.ready.pop().expect("peeked");
            self.map_job(r.first, r.buf, r.prefetch);
        }
    }

    /// UFFDIO_COPY of a fetched unit, then report its faulted pages ready.
    fn map(&mut self, first: u64, buf: &[u8]) {
        let Some(f) = self.inflight.remove(&first) else {
            return;
        };
        let region = self.shared.regions[f.region];
        let host = region.host_of_page(first);
        let stats = &self.shared.stats;
        let t0 = Instant::now();
        let mut off = 0;
        let (mut copied, mut existed, mut calls) = (0u64, 0u64, 0u64);
        while off < buf.len() {
            calls += 1;
            match self.uffd.copy(host + off, &buf[off..]) {
                Ok(CopyOutcome::Copied) => {
                    copied += ((buf.len() - off) / PAGE_SIZE) as u64;
                    off = buf.len();
                }
                Ok(CopyOutcome::Partial(n)) => {
                    copied += (n / PAGE_SIZE) as u64;
                    off += n;
                }
                Ok(CopyOutcome::Exists) => {
                    // Already present: wake anyone who raced with whoever mapped it.
                    existed += 1;
                    let _ = self.uffd.wake(host + off, PAGE_SIZE);
                    off += PAGE_SIZE;
                }
                Err(e) => {
                    let page = first + (off / PAGE_SIZE) as u64;
                    self.failed.extend(first..first + f.pages);
                    bump(&stats.fetch_errors, 1);
                    let err = PagerError::Map {
                        page,
                        gpa: page * PAGE_SIZE_U64,
                        source: e,
                    };
                    tracing::error!(error = %err, "pager: mapping failed");
                    self.observer.on_error(err);
                    return;
                }
            }
        }
        let done_at = Instant::now();
        for p in first..first + f.pages {
            if !self.shared.resident.get(f.region, &region, p) {
                self.shared.resident.set(f.region, &region, p);
                self.resident_pages += 1;
            }
        }
        if f.prefetch {
            bump(&stats.prefetched_pages, f.pages);
        }
        if self.resident_pages >= self.target_pages
            && stats.fully_resident_ns.load(Ordering::Relaxed) == 0
        {
            let t = u64::try_from((done_at - self.started).as_nanos()).unwrap_or(u64::MAX);
            stats.fully_resident_ns.store(t.max(1), Ordering::Relaxed);
            tracing::info!(after = ?done_at - self.started, "pager: guest memory fully resident");
        }
        bump(&stats.copy_calls, calls);
        bump(&stats.pages_copied, copied);
        bump(&stats.eexist, existed);
        bump(&stats.bytes_copied, copied * PAGE_SIZE_U64);
        {
            let mut h = stats.hist.lock().unwrap_or_else(PoisonError::into_inner);
            record(&mut h.copy_time, done_at - t0);
            for &(_, at) in &f.faulted {
                record(&mut h.fault_to_copy, done_at - at);
            }
        }
        for &(page, _) in &f.faulted {
            self.observer.on_page_ready(page * PAGE_SIZE_U64, done_at);
        }
    }

    /// True when a unit may be prefetched: inside the source, not present, not in flight,
    /// never failed.
    fn eligible(&self, ri: usize, region: &GuestRegion, first: u64) -> bool {
        first < self.page_count
            && !self.shared.resident.get(ri, region, first)
            && !self.inflight.contains_key(&first)
            && !self.failed.contains(&first)
    }

    /// Readahead: a fault on the unit at `first` moves the window and queues what follows.
    fn readahead_after(&mut self, ri: usize, first: u64) {
        if self.prefetch != Prefetch::Readahead {
            return;
        }
        let (sequential, units) = self.readahead.on_fault(first / self.unit_pages);
        if !sequential {
            self.queued.clear();
        }
        let region = self.shared.regions[ri];
        for u in units {
            let p = u * self.unit_pages;
            if !region.contains_page(p) || p >= self.page_count {
                break;
            }
            self.queued.push_back((ri, p));
        }
    }

    fn prefetch_pending(&self) -> bool {
        match self.prefetch {
            Prefetch::None => false,
            Prefetch::Readahead => !self.queued.is_empty(),
            Prefetch::Fill => self.fill_cursor.0 < self.shared.regions.len(),
        }
    }

    /// The next prefetch job: up to `batch` consecutive eligible units of one region.
    #[allow(clippy::type_complexity)]
    fn next_prefetch(&mut self, batch: u64) -> Option<(usize, u64, Vec<(u64, u64)>)> {
        let mut units: Vec<(u64, u64)> = Vec::new();
        let mut region_index = 0;
        match self.prefetch {
            Prefetch::None => return None,
            Prefetch::Readahead => {
                while let Some(&(ri, p)) = self.queued.front() {
                    let region = self.shared.regions[ri];
                    let (first, pages) = self.unit_of(p, &region);
                    let contiguous = units
                        .last()
                        .is_none_or(|&(f, n)| ri == region_index && f + n == first);
                    if !contiguous || units.len() as u64 >= batch {
                        break;
                    }
                    self.queued.pop_front();
                    if self.eligible(ri, &region, first) {
                        region_index = ri;
                        units.push((first, pages));
                    } else if !units.is_empty() {
                        break;
                    }
                }
            }
            Prefetch::Fill => {
                while let Some(region) = self.shared.regions.get(self.fill_cursor.0).copied() {
                    let ri = self.fill_cursor.0;
                    let p = self.fill_cursor.1;
                    if p >= region.end_page() || p >= self.page_count {
                        if !units.is_empty() {
                            break;
                        }
                        self.fill_cursor.0 += 1;
                        if let Some(next) = self.shared.regions.get(self.fill_cursor.0) {
                            self.fill_cursor.1 = next.first_page();
                        }
                        continue;
                    }
                    let (first, pages) = self.unit_of(p, &region);
                    if self.eligible(ri, &region, first) {
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

    /// Submits prefetch jobs while there are free prefetch slots.
    fn pump_prefetch(&mut self) {
        if self.prefetch == Prefetch::None {
            return;
        }
        let threads = self.pool.has_threads();
        let (depth, batch) = if threads {
            (PREFETCH_DEPTH, BATCH_UNITS_THREADS)
        } else {
            (1, BATCH_UNITS_INLINE)
        };
        while self.prefetch_jobs < depth {
            let Some((ri, first, units)) = self.next_prefetch(batch) else {
                break;
            };
            let mut pages = 0;
            for &(f, n) in &units {
                self.inflight.insert(
                    f,
                    InFlight {
                        region: ri,
                        pages: n,
                        prefetch: true,
                        faulted: Vec::new(),
                    },
                );
                pages += n;
            }
            self.prefetch_jobs += 1;
            bump(&self.shared.stats.prefetch_fetches, 1);
            self.start_fetch(first, pages, true);
            if !threads {
                break; // inline: one job per turn, so faults are read in between
            }
        }
    }
}
