//! What `apfvm demo` and `apfvm bench` share: the workload, the snapshots (one per guest
//! protocol, in a temporary directory), one restore per mode with a measured window, the
//! checks every run must pass, and the medians over repeats.
//!
//! The workload, per vCPU: one scan task over its own cold region (the memory a lazy
//! restore serves on demand) and `tasks_per_vcpu - 1` compute tasks. The snapshot is taken
//! right after the scans' fill pass; the restored guest re-reads every scanned page (its
//! checksum is checked) while the compute tasks count loop iterations.
//!
//! The measure: **compute work** = loop iterations of every compute task in the first
//! `window` after the restore (the VMM samples the guest's counters page at the window's
//! end; `guest_abi::COMPUTE_HOLD_GPA` keeps the compute tasks running at least that long),
//! and **scan time** = when every scan task is done (counters polled every 0.5 ms).

pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::{ApfMode, HaltMode, VmConfig};
use crate::error::{Result, VmmError};
use crate::lazy::SourceOptions;
use crate::report::RunReport;
use crate::restore::{ApfPath, RestoreOptions};
use crate::run::{RunOptions, SnapshotPlan};
use crate::workload::{self, WorkloadParams};

/// How memory arrives and who turns a missing page into an APF.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, clap::ValueEnum,
)]
pub enum Mode {
    /// Eager restore: every page resident before the guest runs.
    #[serde(rename = "eager")]
    #[value(name = "eager")]
    Eager,
    /// Lazy, no APF: a missing page stalls its vCPU (blocked in its own thread).
    #[serde(rename = "off")]
    #[value(name = "off")]
    Off,
    /// Lazy, no APF, KVM's "APF halt" (in-kernel `hlt`: interrupts get in).
    #[serde(rename = "off-halt")]
    #[value(name = "off-halt")]
    OffHalt,
    /// Lazy, userspace APF, guest booted with protocol v1.
    #[serde(rename = "apf-v1")]
    #[value(name = "apf-v1")]
    ApfV1,
    /// Lazy, userspace APF, guest booted with protocol v2.
    #[serde(rename = "apf-v2")]
    #[value(name = "apf-v2")]
    ApfV2,
    /// Lazy, KVM's own in-kernel APF (v2 guest).
    #[serde(rename = "kernel")]
    #[value(name = "kernel")]
    Kernel,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 6] = [
        Mode::Eager,
        Mode::Off,
        Mode::OffHalt,
        Mode::ApfV1,
        Mode::ApfV2,
        Mode::Kernel,
    ];
    /// The modes the issue names (`bench`'s default).
    pub const MAIN: [Mode; 5] = [
        Mode::Eager,
        Mode::Off,
        Mode::ApfV1,
        Mode::ApfV2,
        Mode::Kernel,
    ];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Off => "off",
            Mode::OffHalt => "off-halt",
            Mode::ApfV1 => "apf-v1",
            Mode::ApfV2 => "apf-v2",
            Mode::Kernel => "kernel",
        }
    }

    /// The protocol the snapshot's guest is booted with (it picks it from CPUID at boot).
    pub fn booted(self) -> ApfMode {
        if self == Mode::ApfV1 {
            ApfMode::V1
        } else {
            ApfMode::V2
        }
    }

    /// True for the modes that inject APFs.
    pub fn is_apf(self) -> bool {
        matches!(self, Mode::ApfV1 | Mode::ApfV2 | Mode::Kernel)
    }

    /// Whether the restore is lazy, and who turns a missing page into an APF.
    pub fn restore_path(self) -> (bool, ApfPath) {
        match self {
            Mode::Eager => (false, ApfPath::Userspace),
            Mode::Off => (true, ApfPath::Off),
            Mode::OffHalt => (true, ApfPath::OffHalt),
            Mode::ApfV1 | Mode::ApfV2 => (true, ApfPath::Userspace),
            Mode::Kernel => (true, ApfPath::Kernel),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a lazy (or eager) restore reads guest memory from (`bench --sources`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, clap::ValueEnum,
)]
pub enum Source {
    /// The snapshot's memory file.
    #[serde(rename = "file")]
    #[value(name = "file")]
    File,
    /// An NBD export of that file, served by `qemu-nbd` on a unix socket.
    #[serde(rename = "nbd")]
    #[value(name = "nbd")]
    Nbd,
}

impl Source {
    /// Both, in table order.
    pub const ALL: [Source; 2] = [Source::File, Source::Nbd];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Nbd => "nbd",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The pager's prefetch policy (`bench --prefetch`; [`pager::Prefetch`]).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, clap::ValueEnum,
)]
pub enum PrefetchPolicy {
    /// Faulted chunks only.
    #[serde(rename = "none")]
    #[value(name = "none")]
    None,
    /// Sequential readahead with an adaptive window.
    #[serde(rename = "readahead")]
    #[value(name = "readahead")]
    Readahead,
    /// Background fill of every page not yet present.
    #[serde(rename = "fill")]
    #[value(name = "fill")]
    Fill,
}

impl PrefetchPolicy {
    /// Every policy, in table order.
    pub const ALL: [PrefetchPolicy; 3] = [
        PrefetchPolicy::None,
        PrefetchPolicy::Readahead,
        PrefetchPolicy::Fill,
    ];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            PrefetchPolicy::None => "none",
            PrefetchPolicy::Readahead => "readahead",
            PrefetchPolicy::Fill => "fill",
        }
    }
}

impl std::fmt::Display for PrefetchPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<PrefetchPolicy> for pager::Prefetch {
    fn from(p: PrefetchPolicy) -> Self {
        match p {
            PrefetchPolicy::None => pager::Prefetch::None,
            PrefetchPolicy::Readahead => pager::Prefetch::Readahead,
            PrefetchPolicy::Fill => pager::Prefetch::Fill,
        }
    }
}

/// How a point's memory arrives: a source and a prefetch policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Memory {
    /// The memory file or NBD.
    pub source: Source,
    /// The pager's prefetch policy.
    pub prefetch: PrefetchPolicy,
}

impl Memory {
    /// The plain rows': the memory file, no prefetch.
    pub const FILE: Memory = Memory {
        source: Source::File,
        prefetch: PrefetchPolicy::None,
    };

    /// `file`, `nbd`, `nbd+readahead`, `file+fill`, ...
    pub fn label(self) -> String {
        if self.prefetch == PrefetchPolicy::None {
            self.source.name().to_string()
        } else {
            format!("{}+{}", self.source, self.prefetch)
        }
    }
}

/// Points measured again with other memory (`bench --sources`, `--prefetch`): every pair of
/// a source and a prefetch policy other than the plain rows' (`file`, `none`), at the plan's
/// latencies and modes that are also listed here.
#[derive(Clone, Debug, Default)]
pub struct Variants {
    /// The other memories, in table order.
    pub memories: Vec<Memory>,
    /// At these fetch latencies only.
    pub latencies: Vec<Duration>,
    /// For these modes only.
    pub modes: Vec<Mode>,
}

impl Variants {
    /// `sources` × `prefetch`, less the plain rows' pair.
    pub fn new(
        sources: &[Source],
        prefetch: &[PrefetchPolicy],
        latencies: Vec<Duration>,
        modes: Vec<Mode>,
    ) -> Variants {
        let mut memories = Vec::new();
        for source in sources {
            for p in prefetch {
                let m = Memory {
                    source: *source,
                    prefetch: *p,
                };
                if m != Memory::FILE && !memories.contains(&m) {
                    memories.push(m);
                }
            }
        }
        Variants {
            memories,
            latencies,
            modes,
        }
    }

    /// The memories `mode` at `latency` is measured with: the file first, then the others.
    pub fn memories_for(&self, latency: Duration, mode: Mode) -> Vec<Memory> {
        let mut v = vec![Memory::FILE];
        if self.latencies.contains(&latency) && self.modes.contains(&mode) {
            v.extend(self.memories.iter().copied());
        }
        v
    }

    /// Restores they add to `plan`.
    pub fn runs(&self, plan: &Plan) -> usize {
        let lats = plan
            .latencies
            .iter()
            .filter(|l| self.latencies.contains(l))
            .count();
        let modes = plan.modes.iter().filter(|m| self.modes.contains(m)).count();
        plan.setups.len() * lats * modes * self.memories.len() * plan.repeats
    }

    /// True if some row reads memory from NBD.
    pub fn uses_nbd(&self) -> bool {
        self.memories.iter().any(|m| m.source == Source::Nbd)
    }

    /// The same without the NBD rows.
    #[must_use]
    pub fn without_nbd(&self) -> Variants {
        Variants {
            memories: self
                .memories
                .iter()
                .copied()
                .filter(|m| m.source != Source::Nbd)
                .collect(),
            ..self.clone()
        }
    }
}

/// True if `qemu-nbd --version` runs.
pub fn qemu_nbd_available() -> bool {
    std::process::Command::new("qemu-nbd")
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `qemu-nbd` serving a memory file read-only as export [`crate::lazy::NBD_EXPORT`] on a
/// unix socket; killed (and reaped) when dropped.
#[derive(Debug)]
pub struct NbdServer {
    child: std::process::Child,
    url: String,
}

impl NbdServer {
    /// Starts it and waits (up to 10 s) until it answers a handshake.
    pub fn start(file: &Path, socket: &Path) -> Result<NbdServer> {
        let log_path = socket.with_extension("log");
        let log = std::fs::File::create(&log_path).map_err(|err| VmmError::Os {
            what: "create qemu-nbd's log",
            err,
        })?;
        let child = std::process::Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=8", "--format=raw"])
            .arg(format!("--export-name={}", crate::lazy::NBD_EXPORT))
            .arg(format!("--socket={}", socket.display()))
            .arg(file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| VmmError::Bench(format!("starting qemu-nbd: {e}")))?;
        // From here on, an early return kills it (Drop).
        let mut server = NbdServer {
            child,
            url: format!(
                "nbd+unix:///{}?socket={}",
                crate::lazy::NBD_EXPORT,
                socket.display()
            ),
        };
        let url: pager::NbdUrl = server
            .url
            .parse()
            .map_err(|e: pager::nbd::ParseNbdUrlError| VmmError::Bench(e.to_string()))?;
        let t0 = std::time::Instant::now();
        loop {
            let Err(err) =
                pager::nbd::NbdClient::connect(&url, &pager::nbd::NbdClientConfig::default())
            else {
                return Ok(server);
            };
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || t0.elapsed() > Duration::from_secs(10) {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(VmmError::Bench(format!(
                    "qemu-nbd serving {} on {}: {} ({err}); its stderr: {}",
                    file.display(),
                    socket.display(),
                    exited.map_or_else(|| "no answer within 10 s".into(), |s| s.to_string()),
                    log.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its `--memory-source` URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest's shape: what a snapshot is taken of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Setup {
    /// vCPUs.
    pub vcpus: u32,
    /// Tasks per vCPU: one scan and `tasks_per_vcpu - 1` compute tasks.
    pub tasks_per_vcpu: u32,
    /// Bytes each vCPU's scan walks (cold after a lazy restore).
    pub scan_per_vcpu: u64,
    /// Guest RAM.
    pub mem_size: u64,
}

impl Setup {
    /// The `--workload` spec.
    pub fn workload(&self) -> String {
        let compute = (self.tasks_per_vcpu.saturating_sub(1)) * self.vcpus;
        if compute == 0 {
            format!("scan:{}", self.vcpus)
        } else {
            format!("compute:{compute},scan:{}", self.vcpus)
        }
    }

    fn config(&self, apf: ApfMode) -> Result<VmConfig> {
        let mut tasks = workload::build(
            &self.workload(),
            WorkloadParams {
                vcpus: self.vcpus,
                ram_end: self.mem_size,
                scan_bytes: Some(self.scan_per_vcpu * u64::from(self.vcpus)),
                scan_passes: 2,
                compute_ms: 0,
            },
        )?;
        workload::request_snapshots(&mut tasks);
        Ok(VmConfig {
            vcpus: self.vcpus,
            mem_size: self.mem_size,
            apf,
            guest_image: crate::guest_image::BUNDLED.to_vec(),
            tasks,
            quantum_us: 10_000,
            halt: HaltMode::InKernel,
            echo_console: false,
        })
    }
}

/// Set by SIGINT/SIGTERM: the orchestration stops after the run in progress (and the
/// temporary directory is removed on the way out).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches Ctrl-C so that the snapshots' temporary directory is removed.
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero `sigaction` is a valid starting value; the handler only
        // stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
    }
}

/// True once SIGINT/SIGTERM arrived (after [`catch_interrupts`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(VmmError::Bench("interrupted (Ctrl-C)".into()));
    }
    Ok(())
}

/// The snapshots of a measurement, in a temporary directory removed when this is dropped.
#[derive(Debug)]
pub struct Snapshots {
    // Declared first: dropped (qemu-nbd killed) before the directory is removed.
    servers: BTreeMap<PathBuf, NbdServer>,
    dir: tempfile::TempDir,
    made: BTreeMap<(Setup, u8), PathBuf>,
}

impl Snapshots {
    /// An empty set in a new temporary directory.
    pub fn new() -> Result<Snapshots> {
        let dir = tempfile::Builder::new()
            .prefix("apfvm-bench-")
            .tempdir()
            .map_err(|err| VmmError::Os {
                what: "create a temporary directory",
                err,
            })?;
        Ok(Snapshots {
            servers: BTreeMap::new(),
            dir,
            made: BTreeMap::new(),
        })
    }

    /// Where they are.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `--memory-source` URL of an NBD export of `snapshot`'s memory file: `qemu-nbd`
    /// on a unix socket in the temporary directory, started now if needed, killed when this
    /// is dropped.
    pub fn nbd_url(&mut self, snapshot: &Path) -> Result<String> {
        if let Some(s) = self.servers.get(snapshot) {
            return Ok(s.url().to_string());
        }
        let socket = self
            .dir
            .path()
            .join(format!("nbd-{}.sock", self.servers.len()));
        let server = NbdServer::start(&snapshot.join("memory.raw"), &socket)?;
        let url = server.url().to_string();
        self.servers.insert(snapshot.to_path_buf(), server);
        Ok(url)
    }

    /// The snapshot of `setup` booted with `apf`, taken now if needed.
    pub fn get(&mut self, setup: Setup, apf: ApfMode) -> Result<PathBuf> {
        if let Some(p) = self.made.get(&(setup, apf as u8)) {
            return Ok(p.clone());
        }
        check_interrupted()?;
        let out = self.dir.path().join(format!(
            "snap-{}vcpu-{}tpv-{:?}",
            setup.vcpus, setup.tasks_per_vcpu, apf
        ));
        let cfg = setup.config(apf)?;
        crate::run::run_with(
            &cfg,
            &RunOptions {
                timeout: Some(Duration::from_mins(1)),
                snapshot: Some(SnapshotPlan {
                    out: out.clone(),
                    on_guest_request: true,
                    at: None,
                    on_sigusr1: false,
                }),
                window: None,
            },
        )?;
        self.made.insert((setup, apf as u8), out.clone());
        Ok(out)
    }
}

/// One measured point: a setup, a mode, a fetch latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Point {
    /// The guest.
    pub setup: Setup,
    /// The mode.
    pub mode: Mode,
    /// Added delay per fetch (lazy modes).
    pub fetch_latency: Duration,
}

/// What one restore measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    /// Compute iterations in the window.
    pub compute_work: u64,
    /// Restore → every scan done, ms.
    pub scan_ms: f64,
    /// Missing-page faults (userfaultfd messages; duplicates included).
    pub faults: u64,
    /// Not-present APFs the guest received.
    pub apf_injected: u64,
    /// Faults the engine left synchronous, by reason.
    pub sync_fallbacks: BTreeMap<String, u64>,
    /// uffd message → APF injected (userspace APF only), µs.
    pub inject_latency_us: Option<Percentiles>,
    /// Guest timer ticks over the run (all vCPUs).
    pub timer_ticks: u64,
    /// Restore → guest exit, ms.
    pub elapsed_ms: f64,
    /// VM creation, eager memory and state, ms (time to the first guest instruction).
    pub setup_ms: f64,
    /// Scan tasks whose checksum matched the fill pattern (a mismatch fails the run).
    pub scans_verified: u64,
    /// Pages a prefetch mapped before any fault on them.
    pub prefetched_pages: u64,
    /// Every lazily served page present this long after the pager started, ms (`None`:
    /// not before the guest exited, or eager).
    pub resident_ms: Option<f64>,
    /// Fetches retried or failed for good (a checksum mismatch or an I/O error).
    pub fetch_retries: u64,
}

/// p50 and p99.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

#[allow(clippy::cast_precision_loss)]
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Restores `snapshot` per `point` and runs it to its exit; checks the run (exit status 0,
/// every scan checksum right, scans done) and extracts the sample.
pub fn run_point(snapshot: &Path, point: &Point, window: Duration) -> Result<Sample> {
    run_point_from(snapshot, point, window, &SourceOptions::default())
}

/// [`run_point`] with guest memory from `src` (an NBD export: the sample then checks that
/// the restore read it from there) and its prefetch policy.
pub fn run_point_from(
    snapshot: &Path,
    point: &Point,
    window: Duration,
    src: &SourceOptions,
) -> Result<Sample> {
    check_interrupted()?;
    let (lazy, apf) = point.mode.restore_path();
    let opts = RestoreOptions {
        dir: snapshot.to_path_buf(),
        lazy,
        apf,
        fetch_latency: if point.fetch_latency.is_zero() {
            pager::FetchLatency::None
        } else {
            pager::FetchLatency::Fixed(point.fetch_latency)
        },
        timeout: Some(Duration::from_mins(2)),
        echo_console: false,
        snapshot: None,
        window: Some(window),
        apf_max_outstanding: None,
    };
    let report = crate::restore::restore_with(&opts, src)?;
    let from_nbd = report
        .restore
        .as_ref()
        .is_some_and(|x| x.memory_source.starts_with("NBD"));
    if from_nbd != src.memory_source.is_some() {
        return Err(VmmError::Bench(format!(
            "{} at {:?}: asked for memory from {}, the restore read {}",
            point.mode,
            point.fetch_latency,
            src.memory_source.as_deref().unwrap_or("the memory file"),
            report
                .restore
                .as_ref()
                .map_or("?", |x| x.memory_source.as_str())
        )));
    }
    sample(&report, point)
}

fn sample(r: &RunReport, point: &Point) -> Result<Sample> {
    let what = || {
        format!(
            "{} at {:?} ({} vCPU, {} tasks per vCPU)",
            point.mode, point.fetch_latency, point.setup.vcpus, point.setup.tasks_per_vcpu
        )
    };
    if r.exit_status != 0 {
        return Err(VmmError::Bench(format!(
            "{}: the guest exited with status {} ({})",
            what(),
            r.exit_status,
            crate::report::exit_status_name(r.exit_status)
        )));
    }
    if let Some(t) = r.tasks.iter().find(|t| t.checksum_ok == Some(false)) {
        return Err(VmmError::Bench(format!(
            "{}: task {} read memory whose checksum {:#x} is not the pattern's",
            what(),
            t.index,
            t.checksum
        )));
    }
    let Some(w) = &r.window else {
        return Err(VmmError::Bench(format!("{}: no window measured", what())));
    };
    let Some(scan_us) = w.scans_done_us else {
        return Err(VmmError::Bench(format!(
            "{}: the scans were not seen done",
            what()
        )));
    };
    let lazy = r.restore.as_ref().and_then(|x| x.lazy.as_ref());
    let faults = lazy.map_or(0, |l| l.pager_fault_messages);
    let apf_injected = r.cpus.iter().map(|c| c.counters.not_present).sum();
    let sync_fallbacks = r
        .engine
        .fallback
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    let inject_latency_us = lazy
        .filter(|l| l.fault_to_apf_us.count > 0)
        .map(|l| Percentiles {
            p50: ms(l.fault_to_apf_us.p50) * 1000.0,
            p99: ms(l.fault_to_apf_us.p99) * 1000.0,
        });
    Ok(Sample {
        scans_verified: r
            .tasks
            .iter()
            .filter(|t| t.kind == "scan" && t.checksum_ok == Some(true))
            .count() as u64,
        prefetched_pages: lazy.map_or(0, |l| l.pager_prefetched_pages),
        resident_ms: lazy.and_then(|l| l.resident_at_ms),
        fetch_retries: lazy.map_or(0, |l| l.pager_fetch_retries + l.pager_fetch_errors),
        compute_work: w.compute_work,
        scan_ms: ms(scan_us),
        faults,
        apf_injected,
        sync_fallbacks,
        inject_latency_us,
        timer_ticks: r.cpus.iter().map(|c| c.counters.timer_ticks).sum(),
        elapsed_ms: ms(r.elapsed_us),
        setup_ms: r.restore.as_ref().map_or(0.0, |x| ms(x.setup_us)),
    })
}

/// A point's samples summarized: medians and spread.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// `eager`, `off`, `off-halt`, `apf-v1`, `apf-v2`, `kernel`.
    pub mode: Mode,
    /// Added delay per fetch, µs.
    pub fetch_latency_us: u64,
    /// Tasks per vCPU (one scan, the rest compute).
    pub tasks_per_vcpu: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Where memory came from: `file` (the snapshot's memory file) or `nbd` (`qemu-nbd`
    /// serving that file on a unix socket).
    pub source: Source,
    /// The pager's prefetch policy: `none`, `readahead` or `fill`.
    pub prefetch: PrefetchPolicy,
    /// Median compute iterations in the window.
    pub compute_work: u64,
    /// Smallest of the repeats.
    pub compute_work_min: u64,
    /// Largest of the repeats.
    pub compute_work_max: u64,
    /// Median restore → every scan done, ms.
    pub scan_ms: f64,
    /// Smallest.
    pub scan_ms_min: f64,
    /// Largest.
    pub scan_ms_max: f64,
    /// Median missing-page faults.
    pub faults: u64,
    /// Median APFs injected (not-present the guest received).
    pub apf_injected: u64,
    /// Median synchronous fallbacks (all reasons).
    pub sync_fallbacks: u64,
    /// Synchronous fallbacks by reason, summed over the repeats.
    pub sync_fallbacks_by_reason: BTreeMap<String, u64>,
    /// Medians of the repeats' p50 and p99 (userspace APF only).
    pub inject_latency_us: Option<Percentiles>,
    /// Median guest timer ticks over the run.
    pub timer_ticks: u64,
    /// Median time to the first guest instruction, ms.
    pub setup_ms: f64,
    /// Scan tasks whose checksum was verified (the fewest over the repeats).
    pub scans_verified: u64,
    /// Median pages prefetched before any fault on them.
    pub prefetched_pages: u64,
    /// Median "resident at" over the repeats that got fully resident, ms.
    pub resident_ms: Option<f64>,
    /// Fetches retried or failed, summed over the repeats (0 in a healthy run).
    pub fetch_retries: u64,
    /// Compute work over eager's (memory file) at the same point (median over median).
    pub work_vs_eager: Option<f64>,
    /// Compute work over off's at the same point, with the same source and prefetch.
    pub work_vs_off: Option<f64>,
    /// Repeats.
    pub repeats: usize,
    /// Every repeat.
    pub samples: Vec<Sample>,
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl Row {
    fn new(point: &Point, memory: Memory, samples: Vec<Sample>) -> Row {
        let u = |f: fn(&Sample) -> u64| median_u64(samples.iter().map(f).collect());
        let work: Vec<u64> = samples.iter().map(|s| s.compute_work).collect();
        let scan: Vec<f64> = samples.iter().map(|s| s.scan_ms).collect();
        let mut by_reason = BTreeMap::new();
        for s in &samples {
            for (k, n) in &s.sync_fallbacks {
                *by_reason.entry(k.clone()).or_insert(0) += n;
            }
        }
        let lat: Vec<Percentiles> = samples.iter().filter_map(|s| s.inject_latency_us).collect();
        let resident: Vec<f64> = samples.iter().filter_map(|s| s.resident_ms).collect();
        Row {
            source: memory.source,
            prefetch: memory.prefetch,
            scans_verified: samples.iter().map(|s| s.scans_verified).min().unwrap_or(0),
            prefetched_pages: u(|s| s.prefetched_pages),
            resident_ms: (!resident.is_empty()).then(|| median_f64(resident)),
            fetch_retries: samples.iter().map(|s| s.fetch_retries).sum(),
            mode: point.mode,
            fetch_latency_us: u64::try_from(point.fetch_latency.as_micros()).unwrap_or(u64::MAX),
            tasks_per_vcpu: point.setup.tasks_per_vcpu,
            vcpus: point.setup.vcpus,
            compute_work: median_u64(work.clone()),
            compute_work_min: work.iter().copied().min().unwrap_or(0),
            compute_work_max: work.iter().copied().max().unwrap_or(0),
            scan_ms: median_f64(scan.clone()),
            scan_ms_min: scan.iter().copied().fold(f64::INFINITY, f64::min),
            scan_ms_max: scan.iter().copied().fold(0.0, f64::max),
            faults: u(|s| s.faults),
            apf_injected: u(|s| s.apf_injected),
            sync_fallbacks: u(|s| s.sync_fallbacks.values().sum()),
            sync_fallbacks_by_reason: by_reason,
            inject_latency_us: (!lat.is_empty()).then(|| Percentiles {
                p50: median_f64(lat.iter().map(|p| p.p50).collect()),
                p99: median_f64(lat.iter().map(|p| p.p99).collect()),
            }),
            timer_ticks: u(|s| s.timer_ticks),
            setup_ms: median_f64(samples.iter().map(|s| s.setup_ms).collect()),
            work_vs_eager: None,
            work_vs_off: None,
            repeats: samples.len(),
            samples,
        }
    }
}

/// A measurement plan: setups × latencies × modes, repeated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Guest shapes.
    pub setups: Vec<Setup>,
    /// Fetch latencies.
    pub latencies: Vec<Duration>,
    /// Modes.
    pub modes: Vec<Mode>,
    /// Repeats of every point.
    pub repeats: usize,
    /// The measured window.
    pub window: Duration,
}

impl Plan {
    /// Restores to run.
    pub fn runs(&self) -> usize {
        self.setups.len() * self.latencies.len() * self.modes.len() * self.repeats
    }
}

/// Runs `plan`: snapshots first, then every repeat of every (setup, latency) with its modes
/// back to back (so machine drift hits every mode alike). `progress` is called before each
/// restore with the point and after with its sample.
pub fn execute(
    plan: &Plan,
    snapshots: &mut Snapshots,
    mut progress: impl FnMut(&Point, Option<&Sample>),
) -> Result<Vec<Row>> {
    execute_with(plan, &Variants::default(), snapshots, |p, _, s| {
        progress(p, s);
    })
}

/// [`execute`] plus the rows of `variants` (other sources and prefetch policies), each
/// measured right after the plain row of its point. NBD rows read each snapshot through
/// `qemu-nbd` ([`Snapshots::nbd_url`], started before the first restore). Rows come per
/// (setup, latency): the plain rows in mode order, then each other memory's.
pub fn execute_with(
    plan: &Plan,
    variants: &Variants,
    snapshots: &mut Snapshots,
    mut progress: impl FnMut(&Point, Memory, Option<&Sample>),
) -> Result<Vec<Row>> {
    let urls = take_snapshots(plan, variants, snapshots)?;
    let mut samples: BTreeMap<(Point, Memory), Vec<Sample>> = BTreeMap::new();
    for _ in 0..plan.repeats {
        for setup in &plan.setups {
            for latency in &plan.latencies {
                for mode in &plan.modes {
                    let point = Point {
                        setup: *setup,
                        mode: *mode,
                        fetch_latency: *latency,
                    };
                    let snap = snapshots.get(*setup, mode.booted())?;
                    for memory in variants.memories_for(*latency, *mode) {
                        let src = SourceOptions {
                            memory_source: match memory.source {
                                Source::File => None,
                                Source::Nbd => Some(urls.get(&snap).cloned().ok_or_else(|| {
                                    VmmError::Bench(format!("no NBD server for {}", snap.display()))
                                })?),
                            },
                            prefetch: memory.prefetch.into(),
                            ..SourceOptions::default()
                        };
                        progress(&point, memory, None);
                        let s = run_point_from(&snap, &point, plan.window, &src).map_err(|e| {
                            let at = format!(
                                "{} at {:?} ({} vCPU, {} tasks per vCPU, memory {})",
                                point.mode,
                                point.fetch_latency,
                                point.setup.vcpus,
                                point.setup.tasks_per_vcpu,
                                memory.label()
                            );
                            match e {
                                VmmError::Bench(m) if memory == Memory::FILE => VmmError::Bench(m),
                                VmmError::Bench(m) => VmmError::Bench(format!("{at}: {m}")),
                                e => VmmError::Bench(format!("{at}: {e}")),
                            }
                        })?;
                        progress(&point, memory, Some(&s));
                        samples.entry((point, memory)).or_default().push(s);
                    }
                }
            }
        }
    }
    let mut rows = Vec::new();
    for setup in &plan.setups {
        for latency in &plan.latencies {
            rows.extend(group(plan, variants, *setup, *latency, &mut samples));
        }
    }
    Ok(rows)
}

/// Takes the snapshots of `plan` and starts the NBD servers its variants need; returns
/// their URLs by snapshot.
fn take_snapshots(
    plan: &Plan,
    variants: &Variants,
    snapshots: &mut Snapshots,
) -> Result<BTreeMap<PathBuf, String>> {
    let nbd = |m: &Mode| {
        variants.uses_nbd()
            && variants.modes.contains(m)
            && plan
                .latencies
                .iter()
                .any(|l| variants.latencies.contains(l))
    };
    let mut urls: BTreeMap<PathBuf, String> = BTreeMap::new();
    for setup in &plan.setups {
        for mode in &plan.modes {
            let snap = snapshots.get(*setup, mode.booted())?;
            if nbd(mode) && !urls.contains_key(&snap) {
                check_interrupted()?;
                let url = snapshots.nbd_url(&snap)?;
                urls.insert(snap, url);
            }
        }
    }
    Ok(urls)
}

/// The rows of one (setup, latency): the plain rows in mode order, then each other
/// memory's; with their ratios to eager (memory file) and to off (same memory).
fn group(
    plan: &Plan,
    variants: &Variants,
    setup: Setup,
    latency: Duration,
    samples: &mut BTreeMap<(Point, Memory), Vec<Sample>>,
) -> Vec<Row> {
    let mut row = |mode: Mode, memory: Memory| {
        let point = Point {
            setup,
            mode,
            fetch_latency: latency,
        };
        samples
            .remove(&(point, memory))
            .map(|v| Row::new(&point, memory, v))
    };
    let mut group: Vec<Row> = plan
        .modes
        .iter()
        .filter_map(|m| row(*m, Memory::FILE))
        .collect();
    for memory in &variants.memories {
        for mode in &plan.modes {
            group.extend(row(*mode, *memory));
        }
    }
    let of = |m: Mode, mem: (Source, PrefetchPolicy), g: &[Row]| {
        g.iter()
            .find(|r| r.mode == m && (r.source, r.prefetch) == mem)
            .map(|r| r.compute_work)
    };
    let eager = of(Mode::Eager, (Source::File, PrefetchPolicy::None), &group);
    let offs: Vec<Option<u64>> = group
        .iter()
        .map(|r| of(Mode::Off, (r.source, r.prefetch), &group))
        .collect();
    for (r, off) in group.iter_mut().zip(offs) {
        #[allow(clippy::cast_precision_loss)]
        let ratio = |base: Option<u64>| {
            base.filter(|b| *b > 0)
                .map(|b| r.compute_work as f64 / b as f64)
        };
        r.work_vs_eager = ratio(eager);
        r.work_vs_off = ratio(off);
    }
    group
}

/// Checks what every measurement must show whatever the speed: eager has no fault, `off`
/// injects nothing, every APF mode injected some when there were faults at a non-zero
/// latency, no mode lost a page. Returns the problems found.
pub fn consistency(rows: &[Row]) -> Vec<String> {
    let mut bad = Vec::new();
    for r in rows {
        let at = format!(
            "{} at {} µs, {} vCPU, {} tasks/vCPU, memory {}",
            r.mode,
            r.fetch_latency_us,
            r.vcpus,
            r.tasks_per_vcpu,
            Memory {
                source: r.source,
                prefetch: r.prefetch
            }
            .label()
        );
        let prefetching = r.prefetch != PrefetchPolicy::None;
        match r.mode {
            Mode::Eager if r.faults != 0 => bad.push(format!("{at}: {} faults", r.faults)),
            Mode::Off | Mode::OffHalt if r.apf_injected != 0 => {
                bad.push(format!("{at}: {} APFs injected", r.apf_injected));
            }
            // A prefetch may map a faulted page before its vCPU takes the fault (no APF
            // then), or every page before any fault.
            m if m.is_apf() && !prefetching && r.faults > 0 && r.apf_injected == 0 => {
                bad.push(format!("{at}: {} faults but no APF injected", r.faults));
            }
            m if m != Mode::Eager && r.faults == 0 && !(prefetching && r.prefetched_pages > 0) => {
                bad.push(format!("{at}: no fault"));
            }
            _ => {}
        }
        if r.scans_verified < u64::from(r.vcpus) {
            bad.push(format!(
                "{at}: {} of {} scans verified",
                r.scans_verified, r.vcpus
            ));
        }
        if r.fetch_retries > 0 {
            bad.push(format!(
                "{at}: {} fetches retried or failed (checksum mismatch or I/O error)",
                r.fetch_retries
            ));
        }
    }
    bad
}

/// The machine, for the JSON metadata and the docs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    /// `nproc`.
    pub cpus: usize,
    /// `/proc/cpuinfo` model name.
    pub cpu_model: String,
    /// `uname -r`.
    pub kernel: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model,
            kernel,
        }
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A progress bar on stderr over `total` restores.
pub fn progress_bar(total: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} restores  {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Fails with the words a missing `/dev/kvm` deserves.
pub fn require_kvm() -> Result<()> {
    if crate::kvm_available() {
        Ok(())
    } else {
        Err(VmmError::Bench(format!(
            "SKIPPED: no {} on this machine: apfvm needs KVM to run its guest",
            crate::kvm::vm::KVM_PATH
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_directory_is_removed_when_dropped() {
        let s = Snapshots::new().unwrap();
        let p = s.path().to_path_buf();
        assert!(p.is_dir());
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn workload_has_one_scan_per_vcpu() {
        let setup = Setup {
            vcpus: 2,
            tasks_per_vcpu: 4,
            scan_per_vcpu: 2 << 20,
            mem_size: 48 << 20,
        };
        assert_eq!(setup.workload(), "compute:6,scan:2");
        let cfg = setup.config(ApfMode::V2).unwrap();
        let scans: Vec<u32> = cfg
            .tasks
            .iter()
            .filter(|t| t.kind == guest_abi::TaskKind::Scan as u32)
            .map(|t| t.cpu)
            .collect();
        assert_eq!(scans, [0, 1]);
        assert_eq!(
            Setup {
                tasks_per_vcpu: 1,
                ..setup
            }
            .workload(),
            "scan:2"
        );
    }

    #[test]
    fn rows_take_medians_and_consistency_flags_what_cannot_be() {
        let setup = Setup {
            vcpus: 1,
            tasks_per_vcpu: 2,
            scan_per_vcpu: 1 << 20,
            mem_size: 48 << 20,
        };
        let point = Point {
            setup,
            mode: Mode::Off,
            fetch_latency: Duration::from_millis(1),
        };
        let s = |w: u64, apfs: u64| Sample {
            compute_work: w,
            scan_ms: 1.0,
            faults: 16,
            apf_injected: apfs,
            scans_verified: 1,
            ..Sample::default()
        };
        let r = Row::new(&point, Memory::FILE, vec![s(5, 0), s(1, 0), s(9, 0)]);
        assert_eq!(
            (r.compute_work, r.compute_work_min, r.compute_work_max),
            (5, 1, 9)
        );
        assert!(consistency(&[r]).is_empty());
        let bad = Row::new(&point, Memory::FILE, vec![s(5, 3)]);
        assert_eq!(consistency(&[bad]).len(), 1);
        assert!(utc_now().ends_with('Z'));
    }

    #[test]
    fn variants_cross_sources_and_policies_less_the_plain_pair() {
        let ms = Duration::from_millis;
        let v = Variants::new(
            &Source::ALL,
            &PrefetchPolicy::ALL,
            vec![ms(1)],
            vec![Mode::Off, Mode::ApfV2],
        );
        let labels: Vec<String> = v.memories.iter().map(|m| m.label()).collect();
        assert_eq!(
            labels,
            [
                "file+readahead",
                "file+fill",
                "nbd",
                "nbd+readahead",
                "nbd+fill"
            ]
        );
        assert!(v.uses_nbd() && !v.without_nbd().uses_nbd());
        assert_eq!(v.memories_for(ms(1), Mode::ApfV2).len(), 6);
        assert_eq!(v.memories_for(ms(1), Mode::Eager), [Memory::FILE]);
        assert_eq!(v.memories_for(ms(0), Mode::Off), [Memory::FILE]);
        let setup = Setup {
            vcpus: 1,
            tasks_per_vcpu: 2,
            scan_per_vcpu: 1 << 20,
            mem_size: 48 << 20,
        };
        let plan = Plan {
            setups: vec![setup; 2],
            latencies: vec![ms(0), ms(1)],
            modes: vec![Mode::Eager, Mode::Off, Mode::ApfV2],
            repeats: 3,
            window: ms(100),
        };
        // 2 setups × 1 latency × 2 modes × 5 memories × 3 repeats.
        assert_eq!(v.runs(&plan), 60);
        assert!(
            Variants::new(
                &[Source::File],
                &[PrefetchPolicy::None],
                vec![ms(1)],
                vec![]
            )
            .memories
            .is_empty()
        );
    }

    #[test]
    fn a_prefetched_row_may_have_no_fault_but_must_verify_its_scans() {
        let point = Point {
            setup: Setup {
                vcpus: 1,
                tasks_per_vcpu: 2,
                scan_per_vcpu: 1 << 20,
                mem_size: 48 << 20,
            },
            mode: Mode::ApfV2,
            fetch_latency: Duration::from_millis(1),
        };
        let fill = Memory {
            source: Source::Nbd,
            prefetch: PrefetchPolicy::Fill,
        };
        let s = Sample {
            scans_verified: 1,
            prefetched_pages: 256,
            ..Sample::default()
        };
        assert!(consistency(&[Row::new(&point, fill, vec![s.clone()])]).is_empty());
        assert_eq!(
            consistency(&[Row::new(&point, Memory::FILE, vec![s.clone()])]).len(),
            1
        );
        let unverified = Sample {
            scans_verified: 0,
            ..s
        };
        assert_eq!(
            consistency(&[Row::new(&point, fill, vec![unverified])]).len(),
            1
        );
    }
}
