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

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

use crate::deadline::{Deadlines, Fetched};
use crate::error::PagerError;
use crate::fetch::{Done, FetchPool, Job, fetch};
use crate::latency::LatencySampler;
use crate::observer::{FaultEvent, PagerObserver};
use crate::prefetch::{BATCH_UNITS_INLINE, BATCH_UNITS_THREADS, PREFETCH_DEPTH, Planner, Prefetch};
use crate::region::GuestRegion;
use crate::shared::Shared;
use crate::source::{PageSource, SourceError};
use crate::stats::bump;
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

/// The aligned unit of `unit_pages` holding `page`, clipped to `region` and to a source of
/// `page_count` pages: `(first page, pages)`.
fn unit_of(unit_pages: u64, page_count: u64, page: u64, region: &GuestRegion) -> (u64, u64) {
    let start = page / unit_pages * unit_pages;
    let first = start.max(region.first_page());
    let end = (start + unit_pages)
        .min(region.end_page())
        .min(page_count.max(page + 1));
    (first, end - first)
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
    ready: Deadlines,
    spare: Vec<Vec<u8>>,
    /// What to prefetch next.
    planner: Planner,
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
        let planner = Planner::new(prefetch, &shared.regions);
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
            ready: Deadlines::default(),
            spare: Vec::new(),
            planner,
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
            let busy = !self.pool.has_threads()
                && self.prefetch_jobs == 0
                && self.planner.pending(self.shared.regions.len());
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                self.ready
                    .next()
                    .map(|at| at.saturating_duration_since(Instant::now()))
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
                self.planner.on_fault(
                    ri,
                    first,
                    self.unit_pages,
                    &self.shared.regions[ri],
                    self.page_count,
                );
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
            self.planner.on_fault(
                ri,
                first,
                self.unit_pages,
                &self.shared.regions[ri],
                self.page_count,
            );
        }
    }

    /// The aligned fetch unit holding `page`, clipped to its region and to the source.
    fn unit_of(&self, page: u64, region: &GuestRegion) -> (u64, u64) {
        unit_of(self.unit_pages, self.page_count, page, region)
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
        self.shared
            .stats
            .hist
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fetch_time
            .record(done.fetch_time);
        match done.result {
            Ok(buf) => {
                let at = Instant::now() + done.delay;
                if done.delay.is_zero() {
                    self.map_job(done.first, buf, done.prefetch);
                } else {
                    self.ready.push(Fetched {
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
        self.planner.stop();
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
        while let Some(r) = self.ready.pop_due(now) {
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
            h.copy_time.record(done_at - t0);
            for &(_, at) in &f.faulted {
                h.fault_to_copy.record(done_at - at);
            }
        }
        for &(page, _) in &f.faulted {
            self.observer.on_page_ready(page * PAGE_SIZE_U64, done_at);
        }
    }

    /// Submits prefetch jobs while there are free prefetch slots.
    fn pump_prefetch(&mut self) {
        if self.planner.policy() == Prefetch::None {
            return;
        }
        let threads = self.pool.has_threads();
        let (depth, batch) = if threads {
            (PREFETCH_DEPTH, BATCH_UNITS_THREADS)
        } else {
            (1, BATCH_UNITS_INLINE)
        };
        while self.prefetch_jobs < depth {
            let (unit_pages, page_count) = (self.unit_pages, self.page_count);
            let (shared, inflight, failed) = (&self.shared, &self.inflight, &self.failed);
            let eligible = |ri: usize, region: &GuestRegion, first: u64| {
                first < page_count
                    && !shared.resident.get(ri, region, first)
                    && !inflight.contains_key(&first)
                    && !failed.contains(&first)
            };
            let unit_of =
                |page, region: &GuestRegion| unit_of(unit_pages, page_count, page, region);
            let Some((ri, first, units)) =
                self.planner
                    .next(batch, &shared.regions, page_count, unit_of, eligible)
            else {
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
