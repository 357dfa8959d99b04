//! `apfvm restore`: a snapshot made into a running guest again, composed in plain sight:
//!
//! ```text
//! Snapshot::open ─► source::open (memory file or NBD, every chunk verified)
//!   ─► EmptyMachine::create (the VM as at boot, RAM mapped)
//!   ─► eager memory loaded (all of it, or the low region of a lazy restore), before the
//!      vCPUs exist: later host writes cost the guest shadow-MMU faults on our hosts
//!   ─► EmptyMachine::load_state (vCPU state, APF MSRs for the driver)
//!   ─► run(machine, Memory::Resident | Memory::Lazy(rest of each RAM region), options,
//!          observer)
//! ```
//!
//! Lazy with a working set in the snapshot (`working-set.bin`, see [`crate::working_set`]):
//! only its must-have pages are loaded first, the rest of it is streamed in recorded order,
//! everything else on demand. `--record-working-set` serves all of RAM on demand and
//! records one.
//!
//! Lazy without one: the low 16 MiB (boot data, counters, the VMM's page tables, the kernel image, its
//! stacks: everything below `WORKLOAD_GPA`, touched at CPL 0 where a fault cannot become an
//! APF anyway) is loaded before the first instruction; workload memory, in every RAM region
//! (below the MMIO hole and above 4 GiB), arrives on demand through userfaultfd: the time to
//! the first instruction does not grow with the guest's size. The driver loads the
//! snapshot's APF MSRs, whose enable path queues a wake-all per enabled vCPU, so tasks asleep
//! at snapshot time retry.

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_abi::WORKLOAD_GPA;
use pager::{FetchLatency, PageSource, Prefetch};

use crate::apf::ApfPolicy;
use crate::config::ApfPath;
use crate::error::{Result, VmmError};
use crate::lazy::{LazyPlan, WorkingSetPlan};
use crate::machine::EmptyMachine;
use crate::report::{RestoreMode, RestoreReport, RunReport};
use crate::run::observer::RunObserver;
use crate::run::{self, ApfOptions, Memory, RunOptions, SnapshotPlan};
use crate::snapshot::format::Snapshot;
use crate::source::{self, SourceOptions};
use crate::working_set::{self, Prepared, WorkingSet, WorkingSetMode, WorkingSetReport};

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
    /// When a fault becomes an APF (`--apf-policy`).
    pub apf_policy: ApfPolicy,
    /// Stop (and leave nothing behind) when this flag is raised (see
    /// [`RunOptions::interrupt`]).
    pub interrupt: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// What a lazy restore does with working sets (`--working-set`, `--record-working-set`).
    pub working_set: WorkingSetMode,
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
            apf_policy: ApfPolicy::default(),
            interrupt: None,
            working_set: WorkingSetMode::Replay,
        }
    }
}

/// Bytes read from the source per request while loading memory eagerly.
const EAGER_BLOCK: u64 = 4 << 20;

/// Loads `ranges` of guest memory from `source` (guest pages, verified per chunk) before
/// any vCPU runs, block by block into `write(gpa, bytes)`: guest RAM, or the clones' shared
/// cache (guest-physical address = cache offset). Blocks of zeros are not written: fresh
/// guest RAM and a sparse cache read as zeros already, and a big guest's untouched memory
/// then costs the host nothing.
pub(crate) fn load_eager(
    source: &dyn PageSource,
    ranges: &[Range<u64>],
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; usize::try_from(EAGER_BLOCK).unwrap_or(0)];
    for range in ranges {
        let mut off = range.start;
        while off < range.end {
            let n = usize::try_from((range.end - off).min(EAGER_BLOCK)).unwrap_or(0);
            source
                .fetch(off / pager::PAGE_SIZE as u64, &mut buf[..n])
                .map_err(|e| VmmError::source(source.describe(), e))?;
            if !crate::memory::is_zero(&buf[..n]) {
                write(off, &buf[..n])?;
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Splits RAM into what a restore loads before the first instruction and what it serves
/// on demand: everything eager, or (lazy) `[0, WORKLOAD_GPA)` eager and the rest of every
/// RAM region lazy.
pub(crate) fn split_ram(ram: &[Range<u64>], lazy: bool) -> (Vec<Range<u64>>, Vec<Range<u64>>) {
    if !lazy {
        return (ram.to_vec(), Vec::new());
    }
    let clip = |r: &Range<u64>, lo: u64, hi: u64| r.start.max(lo)..r.end.min(hi);
    let keep = |r: &Range<u64>| r.start < r.end;
    let eager = ram.iter().map(|r| clip(r, 0, WORKLOAD_GPA)).filter(keep);
    let rest = ram
        .iter()
        .map(|r| clip(r, WORKLOAD_GPA, u64::MAX))
        .filter(keep);
    (eager.collect(), rest.collect())
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
    let record = opts.working_set == WorkingSetMode::Record;
    if record {
        if !opts.lazy || opts.apf.kvm_owns_msrs() {
            return Err(VmmError::Config(
                "--record-working-set needs --lazy and the userspace APF path (or --apf off)"
                    .into(),
            ));
        }
        // Before the guest runs: a recording that cannot be kept is not started.
        WorkingSet::check_writable(&opts.dir)?;
    }
    // From an NBD export only the manifest is needed locally.
    let snap = if opts.source.nbd.is_some() {
        Snapshot::open_manifest(&opts.dir)?
    } else {
        Snapshot::open(&opts.dir)?
    };
    let source = source::open(&snap, &opts.source)?;
    let empty = EmptyMachine::create(&snap, opts.apf)?;
    let ram = empty.ram();
    let prepared = opts.lazy.then(|| {
        let split = split_ram(ram.regions(), true);
        let replay = opts.working_set == WorkingSetMode::Replay;
        working_set::prepare(&snap, ram.regions(), record, replay, split)
    });
    let (eager, lazy) = match &prepared {
        Some(p) => (p.eager.clone(), p.lazy.clone()),
        None => split_ram(ram.regions(), false),
    };
    let eager_bytes = eager.iter().map(|r| r.end - r.start).sum();
    load_eager(&*source, &eager, |gpa, bytes| Ok(ram.write(gpa, bytes)?))?;
    let machine = empty.load_state(&snap)?;
    let source_name = source.describe();
    let memory = if opts.lazy {
        Memory::Lazy(LazyPlan {
            ranges: lazy,
            source,
            latency: opts.fetch_latency,
            prefetch: opts.prefetch,
            working_set: prepared.as_ref().map(plan_of).unwrap_or_default(),
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
            policy: opts.apf_policy,
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
        eager_bytes,
        source: source_name,
    });
    if let Some(p) = prepared {
        report.working_set = Some(finish_working_set(p, &snap, &report)?);
    }
    Ok(report)
}

fn plan_of(p: &Prepared) -> WorkingSetPlan {
    WorkingSetPlan {
        stream: p.stream.clone(),
        replay: p.replay.clone(),
        recorder: p.recorder.clone(),
    }
}

/// After the run: a recording is written into the snapshot directory; the working set
/// recorded or replayed goes into a snapshot this run took (if it fits its memory).
fn finish_working_set(
    p: Prepared,
    snap: &Snapshot,
    report: &RunReport,
) -> Result<WorkingSetReport> {
    let mut out = report.working_set.clone().unwrap_or(p.report);
    let mut carried = p.replayed;
    if let Some(rec) = &p.recorder {
        let ws = rec.working_set(working_set::snapshot_id(&snap.manifest.memory));
        ws.write(&snap.dir)?;
        out.recorded = Some(rec.summary());
        out.pages = ws.entries.len() as u64;
        out.must_have_pages = ws.entries.iter().filter(|e| e.touch.must_have()).count() as u64;
        out.note = Some(format!("recorded into {}", snap.dir.display()));
        carried = Some(ws);
    }
    if let (Some(taken), Some(ws)) = (&report.snapshot, carried) {
        let dir = std::path::Path::new(&taken.dir);
        // Written only if it passes the new snapshot's checks (its pages in its RAM).
        let carry = Snapshot::open_manifest(dir)
            .map_err(VmmError::from)
            .and_then(|s| {
                let memory = &s.manifest.memory;
                let ws = WorkingSet {
                    snapshot_id: working_set::snapshot_id(memory),
                    ..ws
                };
                WorkingSet::decode(&ws.encode(), memory)?.write(dir)?;
                Ok(())
            });
        if let Err(e) = carry {
            tracing::warn!("the working set was not carried into {}: {e}", taken.dir);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lazy_restore_loads_the_low_16_mib_of_ram_and_serves_the_rest_of_every_region() {
        let ram = crate::layout::ram_regions(5 << 30);
        let (eager, lazy) = split_ram(&ram, true);
        assert_eq!(
            eager,
            vec![Range {
                start: 0,
                end: WORKLOAD_GPA
            }]
        );
        assert_eq!(lazy, [WORKLOAD_GPA..3 << 30, 4 << 30..6 << 30]);
        assert_eq!(split_ram(&ram, false), (ram, Vec::new()));
    }
}
