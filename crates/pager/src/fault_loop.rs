//! The fault loop, on the pager thread.
//!
//! ```text
//! uffd message ─► page mapped?  yes ─► stale (counted, UFFDIO_WAKE), not reported
//!                 in flight?    yes ─► join it, report on_fault(duplicate)
//!                 otherwise ─► report on_fault, start the fetch of its unit
//! fetch done ─► hold until done + sampled delay (deadline queue)
//! deadline ─► UFFDIO_COPY (EEXIST = already there) ─► mark present ─► on_page_ready
//! ```
//! The pager thread blocks only in poll(2) on the uffd and its wake eventfd, with a timeout
//! at the next deadline; it never waits for a vCPU or guest memory, and waits for a fetch
//! only when fetching inline (a fast source).

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

use crate::error::PagerError;
use crate::fetch::{Done, FetchPool, Job, fetch};
use crate::latency::LatencySampler;
use crate::observer::{FaultEvent, PagerObserver};
use crate::pager::Shared;
use crate::region::GuestRegion;
use crate::source::{PageSource, SourceError};
use crate::stats::{bump, record};
use crate::uffd::{CopyOutcome, PAGE_SIZE, PAGE_SIZE_U64, Uffd, UffdError, UffdEvent};

/// A fetch in flight (or fetched, waiting for its deadline).
struct InFlight {
    region: usize,
    pages: u64,
    /// Pages reported through `on_fault`, with the time of their first message.
    faulted: Vec<(u64, Instant)>,
}

/// A fetched unit waiting for its deadline.
struct Ready {
    at: Instant,
    first: u64,
    buf: Vec<u8>,
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
}

impl FaultLoop {
    pub fn new(
        uffd: Uffd,
        shared: Arc<Shared>,
        observer: Arc<dyn PagerObserver>,
        source: Arc<dyn PageSource>,
        pool: FetchPool,
        sampler: LatencySampler,
        retries: u32,
    ) -> Self {
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
        }
    }

    pub fn run(mut self) {
        let mut events = Vec::with_capacity(64);
        while !self.shared.stop.load(Ordering::Acquire) {
            let timeout = self.ready.peek().map(|r| {
                let d = r.at.saturating_duration_since(Instant::now());
                Timespec {
                    tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(d.subsec_nanos()),
                }
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
            self.observer.on_fault(&event(duplicate));
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
                    faulted: vec![(page, at)],
                },
            );
            // Report first (the VMM's kick is the latency-critical step), then fetch: with
            // inline fetching and no latency the page is mapped inside `start_fetch`, and
            // `on_page_ready` must follow `on_fault`.
            self.observer.on_fault(&event(false));
            self.start_fetch(first, pages);
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
                    faulted: Vec::new(),
                },
            );
            bump(&self.shared.stats.requested_fetches, 1);
            self.start_fetch(first, pages);
        }
    }

    fn start_fetch(&mut self, first: u64, pages: u64) {
        bump(&self.shared.stats.fetches, 1);
        let len = usize::try_from(pages).expect("unit fits") * PAGE_SIZE;
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.resize(len, 0);
        let job = Job {
            first,
            buf,
            delay: self.sampler.sample(),
        };
        // Without fetch threads (or, impossibly, with none left), fetch right here.
        let Some(job) = self.pool.submit(job) else {
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
                    self.map(done.first, buf);
                } else {
                    self.ready.push(Ready {
                        at,
                        first: done.first,
                        buf,
                    });
                }
            }
            Err(e) => {
                let (pages, faulted) = match self.inflight.get(&done.first) {
                    Some(f) => (
                        done.first..done.first + f.pages,
                        f.faulted.iter().map(|&(p, _)| p * PAGE_SIZE_U64).collect(),
                    ),
                    None => (e.page()..e.page() + 1, Vec::new()),
                };
                self.fail(done.first, pages, faulted, e);
            }
        }
    }

    /// A fetch failed for good: report it; its pages are never fetched again.
    fn fail(&mut self, first: u64, pages: Range<u64>, faulted: Vec<u64>, e: SourceError) {
        bump(&self.shared.stats.fetch_errors, 1);
        self.inflight.remove(&first);
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
            self.map(r.first, r.buf);
        }
    }

    /// UFFDIO_COPY of a fetched unit, then report its faulted pages ready.
    fn map(&mut self, first: u64, buf: Vec<u8>) {
        let Some(f) = self.inflight.remove(&first) else {
            self.spare.push(buf);
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
                    self.spare.push(buf);
                    return;
                }
            }
        }
        let done_at = Instant::now();
        for p in first..first + f.pages {
            self.shared.resident.set(f.region, &region, p);
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
        self.spare.push(buf);
    }
}
