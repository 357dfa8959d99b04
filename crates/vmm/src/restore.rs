//! `apfvm restore`: a snapshot made into a running guest again, composed in plain sight:
//!
//! ```text
//! Snapshot::open ─► source::open (memory file or NBD, every chunk verified)
//!   ─► EmptyMachine::create (the VM as at boot, RAM mapped)
//!   ─► eager memory loaded (all of it, or the low region of a lazy restore), before the
//!      vCPUs exist: later host writes cost the guest shadow-MMU faults on our hosts
//!   ─► EmptyMachine::load_state (irqchip and vCPU state, APF MSRs for the driver)
//!   ─► run(machine, Memory::Resident | Memory::Lazy(rest of RAM), options, observer)
//! ```
//!
//! Lazy: the low 16 MiB (boot data, counters, the VMM's page tables, the kernel image, its
//! stacks: everything below `WORKLOAD_GPA`, touched at CPL 0 where a fault cannot become an
//! APF anyway) is loaded before the first instruction; workload memory arrives on demand
//! through userfaultfd. The driver loads the snapshot's APF MSRs, whose enable path queues a
//! wake-all per enabled vCPU, so tasks asleep at snapshot time retry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_abi::WORKLOAD_GPA;
use pager::{FetchLatency, PageSource, Prefetch};

use crate::config::ApfPath;
use crate::error::{Result, VmmError};
use crate::lazy::LazyPlan;
use crate::machine::EmptyMachine;
use crate::report::{RestoreMode, RestoreReport, RunReport};
use crate::run::observer::RunObserver;
use crate::run::{self, ApfOptions, Memory, RunOptions, SnapshotPlan};
use crate::snapshot::format::Snapshot;
use crate::source::{self, SourceOptions};

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Serve workload memory on demand (userfaultfd) instead of reading it all first.
    pub lazy: bool,
    /// Who turns missing-page faults into APFs.
    pub apf: ApfPath,
    /// Delay added to each page fetch (lazy only).
    pub fetch_latency: FetchLatency,
    /// Prefetch policy of the pager (lazy only).
    pub prefetch: Prefetch,
    /// Where guest memory is read from.
    pub source: SourceOptions,
    /// Stop the VM and fail after this long.
    pub timeout: Option<Duration>,
    /// Echo the guest console.
    pub echo_console: bool,
    /// Take another snapshot of the restored guest.
    pub snapshot: Option<SnapshotPlan>,
    /// The engine's limit of outstanding APFs per vCPU (`None`: Linux's 64).
    pub apf_max_outstanding: Option<usize>,
    /// Stop (and leave nothing behind) when this flag is raised (see
    /// [`RunOptions::interrupt`]).
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl RestoreOptions {
    /// Options for restoring `dir`: eager, userspace APF path, memory from the snapshot's
    /// file, no added latency, no prefetch, no timeout, console not echoed.
    pub fn new(dir: impl Into<PathBuf>) -> RestoreOptions {
        RestoreOptions {
            dir: dir.into(),
            lazy: false,
            apf: ApfPath::Userspace,
            fetch_latency: FetchLatency::None,
            prefetch: Prefetch::None,
            source: SourceOptions::default(),
            timeout: None,
            echo_console: false,
            snapshot: None,
            apf_max_outstanding: None,
            interrupt: None,
        }
    }
}

/// Bytes read from the source per request while loading memory eagerly.
const EAGER_BLOCK: u64 = 4 << 20;

/// Loads `[0, end)` of guest memory from `source` (verified per chunk) before any vCPU
/// runs, block by block into `write(gpa, bytes)`: guest RAM, or the clones' shared cache.
pub(crate) fn load_eager(
    source: &dyn PageSource,
    end: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; usize::try_from(EAGER_BLOCK).unwrap_or(0)];
    let mut off = 0;
    while off < end {
        let n = usize::try_from((end - off).min(EAGER_BLOCK)).unwrap_or(0);
        source
            .fetch(off / pager::PAGE_SIZE as u64, &mut buf[..n])
            .map_err(|e| VmmError::source(source.describe(), e))?;
        write(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Restores the snapshot in `opts.dir` and runs the guest to its end; `observer` watches
/// the run.
pub fn restore(opts: &RestoreOptions, observer: &mut dyn RunObserver) -> Result<RunReport> {
    let t0 = Instant::now();
    if opts.apf.kvm_owns_msrs() && opts.snapshot.is_some() {
        return Err(VmmError::Config(
            "--apf kernel cannot take a new snapshot (KVM owns the APF MSRs then)".into(),
        ));
    }
    // From an NBD export only the manifest is needed locally.
    let snap = if opts.source.nbd.is_some() {
        Snapshot::open_manifest(&opts.dir)?
    } else {
        Snapshot::open(&opts.dir)?
    };
    let source = source::open(&snap, &opts.source)?;
    let mem_size = snap.manifest.config.mem_size;
    let eager_end = if opts.lazy {
        WORKLOAD_GPA.min(mem_size)
    } else {
        mem_size
    };
    let empty = EmptyMachine::create(&snap, opts.apf)?;
    let ram = empty.ram();
    load_eager(&*source, eager_end, |gpa, bytes| Ok(ram.write(gpa, bytes)?))?;
    let machine = empty.load_state(&snap)?;
    let source_name = source.describe();
    let memory = if opts.lazy {
        Memory::Lazy(LazyPlan {
            range: eager_end..mem_size,
            source,
            latency: opts.fetch_latency,
            prefetch: opts.prefetch,
        })
    } else {
        Memory::Resident
    };
    let setup_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    tracing::info!(dir = %opts.dir.display(), lazy = opts.lazy, setup_us, "restored");
    let run_opts = RunOptions {
        timeout: opts.timeout,
        snapshot: opts.snapshot.clone(),
        echo_console: opts.echo_console,
        apf: ApfOptions {
            faults_to_apf: opts.lazy && opts.apf == ApfPath::Userspace,
            max_outstanding: opts.apf_max_outstanding,
        },
        interrupt: opts.interrupt.clone(),
    };
    let mut report = run::run(machine, memory, &run_opts, observer)?;
    report.restore = Some(RestoreReport {
        dir: opts.dir.display().to_string(),
        mode: if opts.lazy {
            RestoreMode::Lazy
        } else {
            RestoreMode::Eager
        },
        apf_path: opts.apf,
        setup_us,
        eager_bytes: eager_end,
        source: source_name,
    });
    Ok(report)
}
