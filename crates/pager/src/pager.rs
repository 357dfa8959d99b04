//! The pager: its configuration, start and stop, and a handle for other threads. The fault
//! loop itself is in `fault_loop.rs`, the fetch threads in `fetch.rs`.
//!
//! Two kinds: [`Pager::start`] serves one guest's private memory (pages copied in with
//! `UFFDIO_COPY`); [`Pager::start_shared`] fills a [`PageCache`] that clones of one
//! snapshot map copy-on-write, each clone attached with [`PagerHandle::attach`] (its own
//! userfaultfd and observer), every chunk fetched once for all of them.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rustix::event::{EventfdFlags, eventfd};

use crate::cache::PageCache;
use crate::error::PagerError;
use crate::fault_loop::FaultLoop;
use crate::fetch::FetchPool;
use crate::fill::Fill;
use crate::guests::{Attachment, Guest, same_layout};
use crate::latency::{FetchLatency, LatencySampler};
use crate::observer::PagerObserver;
use crate::prefetch::Prefetch;
use crate::region::{GuestRegion, ResidentMap, validate};
use crate::shared::Shared;
use crate::source::PageSource;
use crate::stats::{PagerStats, Stats};
use crate::uffd::{Uffd, UffdError};

/// How the pager fetches.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Delay added to every fetch (delays the page only).
    pub latency: FetchLatency,
    /// Seed of the latency sampler.
    pub seed: u64,
    /// Fetch threads, for several source fetches in flight. `Some(0)` fetches on the pager
    /// thread itself; `None` (the default) does that for a source whose
    /// [`PageSource::is_fast`] is true (memory, a local file: it saves two thread hand-offs
    /// per fault, about half of the fault → copy time) and uses
    /// [`PagerConfig::DEFAULT_FETCH_THREADS`] threads for any other source (remote). Added
    /// latency never occupies a thread either way: delays overlap in the deadline queue.
    pub fetch_threads: Option<usize>,
    /// A failed fetch (I/O error, checksum mismatch) is retried this many times before it is
    /// reported through `on_error`.
    pub fetch_retries: u32,
    /// What to fetch besides faulted pages (see [`Prefetch`]).
    pub prefetch: Prefetch,
    /// A working set to stream before the prefetch policy's pages: guest-physical
    /// addresses in the order they are wanted (pages outside the regions are skipped).
    /// Time until its last page is present: [`PagerStats::working_set_resident_ns`].
    pub working_set: Vec<u64>,
}

impl Default for PagerConfig {
    fn default() -> Self {
        Self {
            latency: FetchLatency::None,
            seed: 0x5eed_0fa9,
            fetch_threads: None,
            fetch_retries: 1,
            prefetch: Prefetch::None,
            working_set: Vec::new(),
        }
    }
}

impl PagerConfig {
    /// Fetch threads used for a source that is not [`PageSource::is_fast`].
    pub const DEFAULT_FETCH_THREADS: usize = 4;

    /// The number of fetch threads for `source` (0: fetch on the pager thread).
    pub fn fetch_threads_for(&self, source: &dyn PageSource) -> usize {
        self.fetch_threads.unwrap_or(if source.is_fast() {
            0
        } else {
            Self::DEFAULT_FETCH_THREADS
        })
    }
}

/// A cheap, cloneable handle to a running pager, for other threads (vCPUs).
#[derive(Debug, Clone)]
pub struct PagerHandle {
    shared: Arc<Shared>,
}

impl PagerHandle {
    /// True once the page holding `gpa` is mapped (or when `gpa` is outside every region:
    /// that memory is not demand-paged). A vCPU kicked for a fault can check this before
    /// asking for an APF: the page may have landed meanwhile.
    pub fn is_resident(&self, gpa: u64) -> bool {
        self.shared.is_resident(gpa)
    }

    /// Asks the pager to fetch and map the page holding `gpa` if it is not present or in
    /// flight (prefault / prefetch). Not reported through `on_fault`; returns at once.
    pub fn request(&self, gpa: u64) {
        self.request_many(std::iter::once(gpa));
    }

    /// [`PagerHandle::request`] for several pages at once.
    pub fn request_many(&self, gpas: impl IntoIterator<Item = u64>) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(gpas);
        self.shared.wake();
    }

    /// A snapshot of the counters and latency histograms.
    pub fn stats(&self) -> PagerStats {
        self.shared.stats.snapshot()
    }

    /// Pages mapped so far (for a shared-cache pager: written into the cache), over all
    /// regions.
    pub fn resident_pages(&self) -> u64 {
        (0..self.shared.regions.len())
            .map(|i| self.shared.resident.count(i))
            .sum()
    }

    /// Attaches a clone to a shared-cache pager ([`Pager::start_shared`]): `regions` (its
    /// own mappings of the cache, private, untouched in the served layout) are registered
    /// with a new userfaultfd, and its faults are served from then on, each reported to
    /// `observer` (as are the pager's failures, the same error to every clone). Messages
    /// queue in the userfaultfd until the pager thread takes the clone in, so its vCPUs may
    /// run as soon as this returns.
    pub fn attach(
        &self,
        regions: Vec<GuestRegion>,
        observer: Arc<dyn PagerObserver>,
    ) -> Result<Attachment, PagerError> {
        if !self.shared.takes_clones {
            return Err(PagerError::NotShared);
        }
        validate(&regions)?;
        if !same_layout(&regions, &self.shared.regions) {
            return Err(PagerError::Region(
                "a clone's regions must cover the shared cache's layout, in order".into(),
            ));
        }
        let uffd = Uffd::new()?;
        register(&uffd, &regions)?;
        let guest = Arc::new(Guest::new(uffd, regions, observer));
        let attachment = Attachment::new(&guest, Arc::clone(&self.shared));
        self.shared
            .attached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(guest);
        self.shared.wake();
        Ok(attachment)
    }
}

/// Registers every region with `uffd` (MISSING mode).
fn register(uffd: &Uffd, regions: &[GuestRegion]) -> Result<(), PagerError> {
    for r in regions {
        // SAFETY: every `GuestRegion` was built with `GuestRegion::new`, whose contract is
        // `Uffd::register`'s.
        unsafe { uffd.register(r.host_addr(), r.len()) }?;
    }
    Ok(())
}

/// Demand-pages guest memory: owns the userfaultfd and runs the fault loop on its own thread.
///
/// Dropping it stops it like [`Pager::stop`].
#[derive(Debug)]
pub struct Pager {
    shared: Arc<Shared>,
    source: Arc<dyn PageSource>,
    thread: Option<JoinHandle<()>>,
}

impl Pager {
    /// Creates a userfaultfd, registers `regions` in MISSING mode and starts serving faults
    /// on them from `source`.
    pub fn start(
        regions: Vec<GuestRegion>,
        source: Arc<dyn PageSource>,
        observer: Arc<dyn PagerObserver>,
        config: &PagerConfig,
    ) -> Result<Self, PagerError> {
        Self::start_with_uffd(Uffd::new()?, regions, source, observer, config)
    }

    /// Like [`Pager::start`] with a userfaultfd the caller created.
    pub fn start_with_uffd(
        uffd: Uffd,
        regions: Vec<GuestRegion>,
        source: Arc<dyn PageSource>,
        observer: Arc<dyn PagerObserver>,
        config: &PagerConfig,
    ) -> Result<Self, PagerError> {
        validate(&regions)?;
        register(&uffd, &regions)?;
        let guest = Arc::new(Guest::new(uffd, regions.clone(), observer));
        Self::launch(regions, vec![guest], Fill::Copy, source, config)
    }

    /// A pager that fills `cache` instead of a guest's memory: the guest-physical `layout`
    /// (page-aligned ranges; guest page `p` lies at offset `p * 4096` of the cache) is served
    /// from `source` to every clone attached with [`PagerHandle::attach`], each chunk fetched
    /// once and written into the cache, whoever faulted on it.
    pub fn start_shared(
        cache: Arc<PageCache>,
        layout: &[Range<u64>],
        source: Arc<dyn PageSource>,
        config: &PagerConfig,
    ) -> Result<Self, PagerError> {
        let regions = layout
            .iter()
            .map(|r| {
                let len = usize::try_from(r.end.saturating_sub(r.start)).unwrap_or(usize::MAX);
                GuestRegion::layout(r.start, len)
            })
            .collect::<Vec<_>>();
        validate(&regions)?;
        if let Some(r) = layout.iter().find(|r| r.end > cache.len()) {
            return Err(PagerError::Region(format!(
                "range {r:#x?} lies past the end of the {}-byte cache",
                cache.len()
            )));
        }
        Self::launch(regions, Vec::new(), Fill::Cache(cache), source, config)
    }

    fn launch(
        regions: Vec<GuestRegion>,
        guests: Vec<Arc<Guest>>,
        fill: Fill,
        source: Arc<dyn PageSource>,
        config: &PagerConfig,
    ) -> Result<Self, PagerError> {
        let unit_pages = source.unit_pages();
        if unit_pages == 0 {
            return Err(PagerError::Region(format!(
                "source {} has a fetch unit of 0 pages",
                source.describe()
            )));
        }
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|errno| {
            UffdError::Os {
                what: "eventfd",
                errno,
            }
        })?;
        let shared = Arc::new(Shared {
            resident: ResidentMap::new(&regions),
            regions,
            takes_clones: matches!(fill, Fill::Cache(_)),
            attached: Mutex::new(Vec::new()),
            stats: Stats::new(),
            stop: AtomicBool::new(false),
            wake,
            requests: Mutex::new(Vec::new()),
        });

        let fetch_threads = config.fetch_threads_for(&*source);
        let pool = FetchPool::start(fetch_threads, &source, &shared, config.fetch_retries)?;
        tracing::debug!(
            regions = shared.regions.len(),
            source = %source.describe(),
            latency = %config.latency,
            fetch_threads,
            prefetch = %config.prefetch,
            "pager started"
        );
        let fault_loop = FaultLoop::new(
            guests,
            fill,
            Arc::clone(&shared),
            Arc::clone(&source),
            pool,
            LatencySampler::new(config.latency, config.seed),
            config.fetch_retries,
            config.prefetch,
            &config.working_set,
        );
        let thread = std::thread::Builder::new()
            .name("pager".into())
            .spawn(move || fault_loop.run())
            .map_err(PagerError::Spawn)?;
        Ok(Self {
            shared,
            source,
            thread: Some(thread),
        })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> PagerHandle {
        PagerHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// See [`PagerHandle::is_resident`].
    pub fn is_resident(&self, gpa: u64) -> bool {
        self.shared.is_resident(gpa)
    }

    /// See [`PagerHandle::request`].
    pub fn request(&self, gpa: u64) {
        self.handle().request(gpa);
    }

    /// A snapshot of the counters and latency histograms.
    pub fn stats(&self) -> PagerStats {
        self.shared.stats.snapshot()
    }

    /// Stops the fault loop, joins its threads (a fetch in progress is finished first) and
    /// closes the userfaultfd, returning the final statistics.
    ///
    /// Closing the userfaultfd unregisters the regions and wakes every thread still blocked
    /// on a missing page: such a thread then sees ordinary anonymous memory (**a zero
    /// page**). So stop the pager only once the vCPUs are stopped, or once every page is
    /// present (all is well then).
    pub fn stop(mut self) -> PagerStats {
        self.stop_inner();
        self.shared.stats.snapshot()
    }

    fn stop_inner(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.stop.store(true, Ordering::Release);
            // Fetch threads waiting for a server that is away give up (they are joined).
            self.source.cancel();
            self.shared.wake();
            if t.join().is_err() {
                tracing::error!("the pager thread panicked");
            }
            tracing::debug!("pager stopped");
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
