//! The fault loop, on the pager thread.
//!
//! ```text
//! uffd message of guest g ─► page present?  yes ─► stale (counted, UFFDIO_WAKE), not reported
//!                            in flight?     yes ─► join it, report on_fault(duplicate) to g
//!                            otherwise ─► report on_fault to g, start the fetch of its unit
//! fetch done ─► hold until done + sampled delay (deadline queue)
//! deadline ─► fill (fill.rs: UFFDIO_COPY, or cache write + UFFDIO_WAKE of the guests that
//!             faulted) ─► mark present ─► on_page_ready to each guest, per faulted page
//! idle fetch slots ─► prefetch jobs (readahead queue / fill cursor), low priority
//! ```
//! The guests (`guests.rs`): one, or the clones of a shared-cache pager, each with its own
//! uffd. "Present": mapped in the one guest, or in the shared cache. A failure goes to the
//! one guest, or the same error to every clone (none can be served that page).
//!
//! The pager thread blocks only in poll(2) on the uffds and its wake eventfd, with a timeout
//! at the next deadline; it never waits for a vCPU or guest memory, and waits for a fetch
//! only when fetching inline (a fast source).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use std::time::Instant;

use rustix::event::Timespec;

use crate::deadline::{Deadlines, Fetched};
use crate::error::PagerError;
use crate::fetch::{Done, FetchPool, Job, fetch};
use crate::fill::Fill;
use crate::guests::{Guest, poll_guests};
use crate::latency::LatencySampler;
use crate::observer::{FaultEvent, PagerObserver};
use crate::prefetch::{Planner, Prefetch};
use crate::region::GuestRegion;
use crate::shared::Shared;
use crate::source::{PageSource, SourceError};
use crate::stats::{bump, store_elapsed};
use crate::uffd::{PAGE_SIZE, PAGE_SIZE_U64, UffdError, UffdEvent};
use crate::working_set::WorkingSetQueue;

/// A fetch in flight (or fetched, waiting for its deadline).
struct InFlight {
    region: usize,
    pages: u64,
    /// Fetched by a prefetch job (still queued, maybe): a fault on it gets its own fetch.
    prefetch: bool,
    /// Pages reported through `on_fault`: (guest, page, time of its first message).
    faulted: Vec<(usize, u64, Instant)>,
}

pub(crate) struct FaultLoop {
    /// The guests served; a guest's index never changes.
    guests: Vec<Arc<Guest>>,
    fill: Fill,
    /// A shared-cache pager's first failure, for clones that attach after it.
    failure: Option<Arc<PagerError>>,
    shared: Arc<Shared>,
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
        guests: Vec<Arc<Guest>>,
        fill: Fill,
        shared: Arc<Shared>,
        source: Arc<dyn PageSource>,
        pool: FetchPool,
        sampler: LatencySampler,
        retries: u32,
        prefetch: Prefetch,
        working_set: &[u64],
    ) -> Self {
        let page_count = source.page_count();
        let unit_pages = source.unit_pages();
        let target_pages = shared
            .regions
            .iter()
            .map(|r| r.end_page().min(page_count).saturating_sub(r.first_page()))
            .sum();
        let unit_of = |page, r: &GuestRegion| r.unit_of(unit_pages, page_count, page);
        let ws = WorkingSetQueue::new(working_set, &shared.regions, unit_of);
        let planner = Planner::new(prefetch, &shared.regions, ws);
        Self {
            guests,
            fill,
            failure: None,
            shared,
            sampler,
            unit_pages,
            page_count,
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
                && self.prefetch_jobs < self.planner.limits(false).0
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
            let (ready, wake_ready) = match poll_guests(&self.guests, &self.shared.wake, timeout) {
                Ok(r) => r,
                Err(errno) => {
                    self.fatal(UffdError::Os {
                        what: "poll",
                        errno,
                    });
                    break;
                }
            };
            if wake_ready {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(&self.shared.wake, &mut b);
            }
            self.adopt_attached();
            while let Some(done) = self.pool.try_done() {
                self.on_done(done);
            }
            self.take_requests();
            for g in ready {
                loop {
                    events.clear();
                    match self.guests[g].uffd.read_events(&mut events, 64) {
                        Ok(0) => break,
                        Ok(_) => {
                            let at = Instant::now();
                            for &e in &events {
                                self.on_event(g, e, at);
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
        // The guests' uffds close here (an attachment dropped later closes its guest's):
        // blocked threads are woken, the regions unregistered.
    }

    /// Takes in the guests attached since the last turn; a pager that failed already tells
    /// them at once.
    fn adopt_attached(&mut self) {
        let new = std::mem::take(
            &mut *self
                .shared
                .attached
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for guest in new {
            self.guests.push(guest);
            if let Some(e) = self.failure.clone() {
                self.notify(self.guests.len() - 1, |o| o.on_error(PagerError::Shared(e)));
            }
        }
    }

    /// Tells guest `g`'s observer, unless it is detached.
    fn notify(&self, g: usize, f: impl FnOnce(&dyn PagerObserver)) {
        if let Some(o) = self.guests[g].observer() {
            f(&*o);
        }
    }

    /// Reports a failure: to the only guest, or the same error to every clone.
    fn report_error(&mut self, err: PagerError) {
        if matches!(self.fill, Fill::Copy) {
            self.notify(0, |o| o.on_error(err));
            return;
        }
        let e = Arc::clone(self.failure.get_or_insert_with(|| Arc::new(err)));
        for g in 0..self.guests.len() {
            self.notify(g, |o| o.on_error(PagerError::Shared(Arc::clone(&e))));
        }
    }

    /// The loop cannot go on: report, then keep the userfaultfds open (closing one would
    /// let a faulting vCPU run on a zero page) until the VMM stops the pager.
    fn fatal(&mut self, e: UffdError) {
        tracing::error!(error = %e, "pager: userfaultfd failed");
        self.report_error(PagerError::Uffd(e));
        self.shared.wait_for_stop();
    }

    fn on_event(&mut self, g: usize, event: UffdEvent, at: Instant) {
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
        let Some((ri, gpa)) = self.guests[g].locate(address) else {
            bump(&stats.unexpected_events, 1);
            tracing::warn!(address, "pager: fault outside every region");
            return;
        };
        let page = gpa / PAGE_SIZE_U64;
        let region = self.shared.regions[ri];
        if self.shared.resident.get(ri, &region, page) {
            // Queued before the fill that already woke its thread (or, from a clone, before
            // the cache write its retry will find); wake it to be sure.
            bump(&stats.stale_faults, 1);
            let guest = &self.guests[g];
            let _ = guest
                .uffd
                .wake(guest.regions[ri].host_of_page(page), PAGE_SIZE);
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
            // A clone's first fault on a page another clone is waiting for is its own.
            let duplicate = f.faulted.iter().any(|&(fg, p, _)| fg == g && p == page);
            if duplicate {
                bump(&stats.duplicate_faults, 1);
            } else {
                f.faulted.push((g, page, at));
            }
            // A fault on a prefetched unit: it jumps ahead with a fetch of its own (the
            // prefetch job may still wait in the low-priority queue).
            let boost = std::mem::take(&mut f.prefetch);
            let pages = f.pages;
            self.notify(g, |o| o.on_fault(&event(duplicate)));
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
                    faulted: vec![(g, page, at)],
                },
            );
            // Report first (the VMM's kick is the latency-critical step), then fetch: with
            // inline fetching and no latency the page is mapped inside `start_fetch`, and
            // `on_page_ready` must follow `on_fault`.
            self.notify(g, |o| o.on_fault(&event(false)));
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
        region.unit_of(self.unit_pages, self.page_count, page)
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
                    faulted.extend(f.faulted.iter().map(|&(_, p, _)| p * PAGE_SIZE_U64));
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
        self.report_error(err);
    }

    fn map_due(&mut self) {
        let now = Instant::now();
        while let Some(r) = self.ready.pop_due(now) {
            self.map_job(r.first, r.buf, r.prefetch);
        }
    }

    /// Fills a fetched unit in (fill.rs), then reports its faulted pages ready.
    fn map(&mut self, first: u64, buf: &[u8]) {
        let Some(f) = self.inflight.remove(&first) else {
            return;
        };
        let region = self.shared.regions[f.region];
        let t0 = Instant::now();
        let faulted = f.faulted.iter().map(|&(g, _, _)| g);
        let mapped = match self.fill.map(&self.guests, f.region, first, buf, faulted) {
            Ok(m) => m,
            Err(err) => {
                self.failed.extend(first..first + f.pages);
                bump(&self.shared.stats.fetch_errors, 1);
                tracing::error!(error = %err, "pager: mapping failed");
                self.report_error(err);
                return;
            }
        };
        let stats = &self.shared.stats;
        let done_at = Instant::now();
        for p in first..first + f.pages {
            if !self.shared.resident.get(f.region, &region, p) {
                self.shared.resident.set(f.region, &region, p);
                self.resident_pages += 1;
            }
        }
        if self.planner.mapped(first) {
            store_elapsed(&stats.working_set_resident_ns, done_at - self.started);
        }
        if f.prefetch {
            bump(&stats.prefetched_pages, f.pages);
        }
        if self.resident_pages >= self.target_pages
            && stats.fully_resident_ns.load(Ordering::Relaxed) == 0
        {
            store_elapsed(&stats.fully_resident_ns, done_at - self.started);
            tracing::info!(after = ?done_at - self.started, "pager: guest memory fully resident");
        }
        bump(&stats.copy_calls, mapped.calls);
        bump(&stats.pages_copied, mapped.pages);
        bump(&stats.eexist, mapped.existed);
        bump(&stats.bytes_copied, mapped.pages * PAGE_SIZE_U64);
        {
            let mut h = stats.hist.lock().unwrap_or_else(PoisonError::into_inner);
            h.copy_time.record(done_at - t0);
            for &(_, _, at) in &f.faulted {
                h.fault_to_copy.record(done_at - at);
            }
        }
        for &(g, page, _) in &f.faulted {
            self.notify(g, |o| o.on_page_ready(page * PAGE_SIZE_U64, done_at));
        }
    }

    /// Submits prefetch jobs while there are free prefetch slots.
    fn pump_prefetch(&mut self) {
        let threads = self.pool.has_threads();
        while self.prefetch_jobs < self.planner.limits(threads).0 {
            let batch = self.planner.limits(threads).1;
            let (unit_pages, page_count) = (self.unit_pages, self.page_count);
            let (shared, inflight, failed) = (&self.shared, &self.inflight, &self.failed);
            let eligible = |ri: usize, region: &GuestRegion, first: u64| {
                first < page_count
                    && !shared.resident.get(ri, region, first)
                    && !inflight.contains_key(&first)
                    && !failed.contains(&first)
            };
            let unit_of = |page, region: &GuestRegion| region.unit_of(unit_pages, page_count, page);
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
