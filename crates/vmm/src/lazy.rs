//! Lazy restore: workload memory mapped empty, registered with userfaultfd through
//! `crates/pager`, served from the snapshot's memory file or an NBD export of it
//! ([`open_source`]; each 64 KiB chunk verified against the manifest's CRC before it is
//! mapped), prefetched per `--prefetch`, each fetch delayed by
//! `--fetch-latency`. The pager's callbacks feed the APF path in [`crate::apf`]:
//! `on_fault` → find the vCPU by thread id → mailbox + kick; `on_page_ready` →
//! `Engine::page_arrived` + kick the vCPUs with a delivery pending; `on_error` → stop the
//! VM with the error, which names the guest page (never wrong memory, never a hang).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pager::{
    FaultEvent, FileSource, GuestRegion, NbdSource, NbdSourceConfig, PageSource, Pager,
    PagerConfig, PagerError, PagerHandle, PagerObserver, Prefetch, VerifiedSource,
};

use crate::apf::LatencyUs;
use crate::error::{Result, VmmError};
use crate::memory::GuestRam;
use crate::snapshot::Snapshot;
use crate::vcpu_loop::Shared;

pub use pager::FetchLatency;

/// Where guest memory comes from, and how it is prefetched (`restore --memory-source`,
/// `--source-deadline`, `--prefetch`).
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// An NBD export of the snapshot's memory file (`nbd://HOST[:PORT]/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`); `None`: the snapshot's own memory file.
    pub memory_source: Option<String>,
    /// A server unreachable this long ends the VM with an error.
    pub deadline: Duration,
    /// Prefetch policy of the pager (lazy restores).
    pub prefetch: Prefetch,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            memory_source: None,
            deadline: Duration::from_secs(10),
            prefetch: Prefetch::None,
        }
    }
}

/// The export name `apfvm snapshot` suggests to serve a snapshot's memory under.
pub const NBD_EXPORT: &str = "mem";

/// The `qemu-nbd` command that serves the memory of the snapshot in `dir` on a unix socket
/// in that directory, and the matching `--memory-source` URL.
pub fn qemu_nbd_command(dir: &std::path::Path) -> (String, String) {
    let sock = dir.join("nbd.sock");
    (
        format!(
            "qemu-nbd --read-only --persistent --shared=8 --format=raw --export-name={NBD_EXPORT} --socket={} {}",
            sock.display(),
            dir.join("memory.raw").display()
        ),
        format!("nbd+unix:///{NBD_EXPORT}?socket={}", sock.display()),
    )
}

/// The snapshot's memory as a page source, every 64 KiB chunk verified against the
/// manifest: its memory file, or the NBD export `opts.memory_source` (whose size must be
/// the snapshot's memory size).
pub fn open_source(snapshot: &Snapshot, opts: &SourceOptions) -> Result<Arc<dyn PageSource>> {
    let m = &snapshot.manifest.memory;
    let chunk = usize::try_from(m.chunk_size).unwrap_or(0);
    let verified = |s: Box<dyn PageSource>| -> Result<Arc<dyn PageSource>> {
        Ok(Arc::new(
            VerifiedSource::new(s, chunk, m.crc32.clone())
                .map_err(|e| VmmError::Pager(e.to_string()))?,
        ))
    };
    let Some(url) = &opts.memory_source else {
        let file = FileSource::open(snapshot.memory_path())
            .map_err(|e| VmmError::Pager(format!("{}: {e}", snapshot.memory_path().display())))?;
        return verified(Box::new(file));
    };
    let url: pager::NbdUrl = url
        .parse()
        .map_err(|e: pager::nbd::ParseNbdUrlError| VmmError::Config(e.to_string()))?;
    let mut cfg = NbdSourceConfig {
        deadline: opts.deadline,
        max_connections: PagerConfig::DEFAULT_FETCH_THREADS,
        ..NbdSourceConfig::default()
    };
    // A server that stops answering counts as gone after this long (then reconnects).
    cfg.client.io_timeout =
        Some((opts.deadline / 2).clamp(Duration::from_millis(100), Duration::from_secs(2)));
    let nbd = NbdSource::connect(url.clone(), cfg)
        .map_err(|e| VmmError::Pager(format!("memory source {url}: {e}")))?;
    if nbd.size() != m.size {
        return Err(VmmError::Pager(format!(
            "memory source {url}: the export has {} bytes, the snapshot's memory {} (another file is served?)",
            nbd.size(),
            m.size
        )));
    }
    verified(Box::new(nbd))
}

/// What to serve lazily, and how.
#[derive(Debug, Clone)]
pub struct LazyConfig {
    /// The snapshot (its memory file and chunk checksums).
    pub snapshot: Snapshot,
    /// First guest-physical byte served lazily (chunk aligned).
    pub start: u64,
    /// End of the lazily served range.
    pub end: u64,
    /// `--apf on`.
    pub apf: bool,
    /// Added delay per fetch.
    pub latency: FetchLatency,
    /// The memory, verified per chunk ([`open_source`]).
    pub source: Arc<dyn PageSource>,
    /// Prefetch policy.
    pub prefetch: Prefetch,
}

/// The pager's view, kept for the report.
#[derive(Debug, Default)]
pub struct LazyStats {
    handle: Mutex<Option<PagerHandle>>,
    served_bytes: Mutex<u64>,
    source: Mutex<String>,
    prefetch: Mutex<Prefetch>,
}

impl LazyStats {
    /// Empty.
    pub fn new() -> Arc<LazyStats> {
        Arc::new(LazyStats::default())
    }

    /// The report section, read at the end of the run.
    pub fn report(&self, shared: &Shared) -> LazyReport {
        let fp = shared.apf.fault_path();
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let pager = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(PagerHandle::stats)
            .unwrap_or_default();
        let resident = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, PagerHandle::resident_pages);
        LazyReport {
            lazy_bytes: *self
                .served_bytes
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            apf_on: fp.apf_on.load(Ordering::Relaxed),
            vcpu_faults: g(&fp.vcpu_faults),
            duplicate_faults: g(&fp.duplicate_faults),
            other_thread_faults: g(&fp.other_thread_faults),
            apf_off_faults: g(&fp.apf_off_faults),
            fault_kicks: g(&fp.fault_kicks),
            faults_to_engine: g(&fp.faults_to_engine),
            stale_faults: g(&fp.stale_faults),
            superseded_faults: g(&fp.superseded_faults),
            same_page_sync: g(&fp.same_page_sync),
            sync_waits: g(&fp.sync_waits),
            pages_ready: g(&fp.pages_ready),
            ready_kicks: g(&fp.ready_kicks),
            resident_pages: resident,
            fault_to_apf_us: fp.fault_to_apf.summary(),
            fetch_us: fp.fetch.summary(),
            ready_delivery_us: fp.ready_delivery.summary(),
            pager_fault_messages: pager.fault_messages,
            pager_fetches: pager.fetches,
            pager_pages_copied: pager.pages_copied,
            pager_eexist: pager.eexist,
            pager_fetch_errors: pager.fetch_errors,
            pager_source_fetch_us: us(&pager.fetch_time),
            pager_fault_to_copy_us: us(&pager.fault_to_copy),
            pager_fetch_retries: pager.fetch_retries,
            pager_prefetch_fetches: pager.prefetch_fetches,
            pager_prefetched_pages: pager.prefetched_pages,
            #[allow(clippy::cast_precision_loss)]
            resident_at_ms: pager.fully_resident_ns.map(|ns| ns as f64 / 1e6),
            source: self
                .source
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            prefetch: self
                .prefetch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .to_string(),
        }
    }
}

fn us(s: &pager::LatencySummary) -> LatencyUs {
    LatencyUs {
        count: s.count,
        p50: s.p50_ns / 1000,
        p90: s.p90_ns / 1000,
        p99: s.p99_ns / 1000,
        max: s.max_ns / 1000,
        mean: s.mean_ns / 1000,
    }
}

/// Counters and latencies of a lazy restore.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LazyReport {
    /// Bytes of guest memory served on demand.
    pub lazy_bytes: u64,
    /// `--apf on`.
    pub apf_on: bool,
    /// Fault messages naming a vCPU thread.
    pub vcpu_faults: u64,
    /// Of those, for a page whose fetch was already in flight.
    pub duplicate_faults: u64,
    /// Fault messages from other threads (the VMM reading memory).
    pub other_thread_faults: u64,
    /// Faults left to stall their vCPU because `--apf off`.
    pub apf_off_faults: u64,
    /// Kicks sent for faults.
    pub fault_kicks: u64,
    /// Faults a vCPU thread handed to the engine (→ injected or synchronous by reason).
    pub faults_to_engine: u64,
    /// Faults whose page arrived before the vCPU took them (dropped: the access retries).
    pub stale_faults: u64,
    /// Faults superseded by a later one of the same vCPU.
    pub superseded_faults: u64,
    /// Faults left synchronous because their vCPU already held a token for the page.
    pub same_page_sync: u64,
    /// Messages not kicked because their vCPU was already waiting for that page
    /// synchronously (the engine answered `Sync`).
    pub sync_waits: u64,
    /// Pages the pager reported mapped.
    pub pages_ready: u64,
    /// Kicks sent so a vCPU takes a page ready.
    pub ready_kicks: u64,
    /// Pages resident at the end (lazily served range).
    pub resident_pages: u64,
    /// uffd message → "page not present" injected.
    pub fault_to_apf_us: LatencyUs,
    /// First fault on a page → page mapped (fetch + added latency + copy).
    pub fetch_us: LatencyUs,
    /// Page mapped → its page ready handed out at a delivery window.
    pub ready_delivery_us: LatencyUs,
    /// The pager's own counters.
    pub pager_fault_messages: u64,
    /// Fetches (units of one 64 KiB chunk).
    pub pager_fetches: u64,
    /// Pages mapped by UFFDIO_COPY.
    pub pager_pages_copied: u64,
    /// UFFDIO_COPY that found the page already there.
    pub pager_eexist: u64,
    /// Fetches that failed for good.
    pub pager_fetch_errors: u64,
    /// Time the source took per fetch, without the added latency.
    pub pager_source_fetch_us: LatencyUs,
    /// The pager's first fault → copy.
    pub pager_fault_to_copy_us: LatencyUs,
    /// Failed fetches retried (a checksum mismatch or I/O error is retried once).
    pub pager_fetch_retries: u64,
    /// Prefetch jobs (`--prefetch`).
    pub pager_prefetch_fetches: u64,
    /// Pages mapped by a prefetch before any fault on them.
    pub pager_prefetched_pages: u64,
    /// Every lazily served page present this long after the pager started ("resident at
    /// T"; `None`: not before the guest exited).
    pub resident_at_ms: Option<f64>,
    /// Where the memory came from.
    pub source: String,
    /// `--prefetch`.
    pub prefetch: String,
}

impl LazyReport {
    /// Text lines for the summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "   lazy: {} KiB on demand; vCPU faults {} (dup {}, other threads {}), kicks {}, to engine {}, stale {}, same-page sync {}, sync waits {}, apf-off stalls {}; pages ready {} ({} resident), ready kicks {}",
            self.lazy_bytes >> 10,
            self.vcpu_faults,
            self.duplicate_faults,
            self.other_thread_faults,
            self.fault_kicks,
            self.faults_to_engine,
            self.stale_faults,
            self.same_page_sync,
            self.sync_waits,
            self.apf_off_faults,
            self.pages_ready,
            self.resident_pages,
            self.ready_kicks
        );
        let _ = writeln!(
            s,
            "   lazy: uffd message → APF injected: {}",
            self.fault_to_apf_us
        );
        let _ = writeln!(s, "   lazy: first fault → page mapped:   {}", self.fetch_us);
        let _ = writeln!(
            s,
            "   lazy: page mapped → ready handed out: {}",
            self.ready_delivery_us
        );
        let _ = writeln!(
            s,
            "   pager: {} messages, {} fetches, {} pages copied ({} EEXIST), {} errors; source fetch {}",
            self.pager_fault_messages,
            self.pager_fetches,
            self.pager_pages_copied,
            self.pager_eexist,
            self.pager_fetch_errors,
            self.pager_source_fetch_us
        );
        let _ = writeln!(
            s,
            "   memory: {}; prefetch {}: {} jobs, {} pages before any fault; {} fetch retries; {}",
            self.source,
            self.prefetch,
            self.pager_prefetch_fetches,
            self.pager_prefetched_pages,
            self.pager_fetch_retries,
            match self.resident_at_ms {
                Some(ms) => format!("resident at {ms:.1} ms"),
                None => "not fully resident at exit".into(),
            }
        );
        s
    }
}

/// A snapshot of a lazily restored guest: pages the pager never mapped are read from the
/// snapshot's memory file (chunk verified), the others from guest RAM, so taking it does not
/// fault the whole memory in through the pager (and its fetch latency).
pub fn capture_hook(
    snapshot: &Snapshot,
    source: Arc<dyn PageSource>,
    ram: Arc<GuestRam>,
    stats: Arc<LazyStats>,
    start: u64,
) -> crate::snapshot::take::CaptureHook {
    let (chunk, mem_size) = (
        snapshot.manifest.memory.chunk_size,
        snapshot.manifest.memory.size,
    );
    Box::new(move |gpa, buf| {
        let handle = stats
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(handle) = handle else {
            return ram.read(gpa, buf);
        };
        let end = gpa + buf.len() as u64;
        let mut at = gpa;
        while at < end {
            let chunk_start = at - at % chunk;
            let piece_end = (chunk_start + chunk).min(end);
            let out = &mut buf[usize::try_from(at - gpa).unwrap_or(0)
                ..usize::try_from(piece_end - gpa).unwrap_or(0)];
            let resident =
                at < start || (at..piece_end).step_by(4096).all(|p| handle.is_resident(p));
            if resident {
                ram.read(at, out)?;
            } else {
                let mut file =
                    vec![0u8; usize::try_from(chunk.min(mem_size - chunk_start)).unwrap_or(0)];
                source
                    .fetch(chunk_start / 4096, &mut file)
                    .map_err(|e| VmmError::Pager(e.to_string()))?;
                let off = usize::try_from(at - chunk_start).unwrap_or(0);
                for (i, page) in out.chunks_mut(4096).enumerate() {
                    let p = at + 4096 * i as u64;
                    if handle.is_resident(p) {
                        ram.read(p, page)?;
                    } else {
                        let o = off + 4096 * i;
                        page.copy_from_slice(&file[o..o + page.len()]);
                    }
                }
            }
            at = piece_end;
        }
        Ok(())
    })
}

/// Forwards the pager's events to the APF path.
struct Observer {
    shared: Arc<Shared>,
}

impl PagerObserver for Observer {
    fn on_fault(&self, e: &FaultEvent) {
        self.shared
            .apf
            .note_fault(e.thread_id, e.gpa, e.at, e.duplicate);
    }

    fn on_page_ready(&self, gpa: u64, at: Instant) {
        self.shared.apf.page_ready(gpa, at);
    }

    fn on_error(&self, error: PagerError) {
        // The pager's errors name the guest page (and the chunk, for a checksum mismatch).
        self.shared.fail(format!(
            "{error}: the VM was stopped rather than given wrong memory"
        ));
    }
}

/// Registers `[cfg.start, cfg.end)` of `ram` with a new pager and starts it. The returned
/// value keeps it running; drop it only after the vCPUs have stopped.
#[allow(clippy::needless_pass_by_value)] // consumed by the boxed attach hook
pub fn start(
    cfg: LazyConfig,
    ram: &GuestRam,
    shared: &Arc<Shared>,
    stats: &Arc<LazyStats>,
) -> Result<Box<dyn std::any::Any>> {
    shared
        .apf
        .fault_path()
        .apf_on
        .store(cfg.apf, Ordering::Relaxed);
    let source = Arc::clone(&cfg.source);
    let len = usize::try_from(cfg.end - cfg.start)
        .map_err(|_| VmmError::Pager("lazy range too large".into()))?;
    let host = ram.host_ptr(cfg.start, len)?;
    // SAFETY: `host` is the start of `len` bytes of guest RAM: a private anonymous mapping
    // owned by `ram`, which outlives the pager (the caller drops the returned pager before
    // the RAM, after the vCPUs stopped). Nothing in the VMM treats guest RAM as typed Rust
    // values, and the observer never touches guest memory (it only kicks and updates the
    // engine; area words are read by vCPU threads).
    let region = unsafe { GuestRegion::new(cfg.start, host, len) };
    *stats.source.lock().unwrap_or_else(PoisonError::into_inner) = source.describe();
    *stats
        .prefetch
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = cfg.prefetch;
    let pager = Pager::start(
        vec![region],
        source,
        Arc::new(Observer {
            shared: Arc::clone(shared),
        }),
        &PagerConfig {
            latency: cfg.latency,
            prefetch: cfg.prefetch,
            ..PagerConfig::default()
        },
    )
    .map_err(|e| VmmError::Pager(e.to_string()))?;
    *stats.handle.lock().unwrap_or_else(PoisonError::into_inner) = Some(pager.handle());
    *stats
        .served_bytes
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = cfg.end - cfg.start;
    tracing::info!(
        start = format_args!("{:#x}", cfg.start),
        end = format_args!("{:#x}", cfg.end),
        latency = %cfg.latency,
        apf = cfg.apf,
        "lazy memory served by the pager"
    );
    Ok(Box::new(pager))
}
