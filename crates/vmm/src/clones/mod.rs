//! Many guests from one snapshot (`apfvm restore DIR --lazy --clones N`), sharing one host
//! page cache, composed in plain sight:
//!
//! ```text
//! Snapshot::open ─► capacity check (MemAvailable) ─► source::open, counted
//!   ─► PageCache (a memfd up to the end of guest RAM, offset = guest-physical address)
//!   ─► the eager low 16 MiB loaded into it once
//!   ─► Pager::start_shared (the workload memory: each chunk fetched once, written into the
//!      cache, the clones that faulted on it woken)
//!   ─► per clone: RAM = a private (copy-on-write) mapping of the cache ─► EmptyMachine
//!      ─► load_state ─► a thread: run(machine, Memory::Clone(attach to the pager), …)
//!   ─► every clone ended ─► host memory measured (smaps of each clone's RAM, the cache's
//!      pages) ─► pager stopped ─► ClonesReport
//! ```
//!
//! A clone's reads map the cache's pages (one copy for all), its writes are its own. Each
//! clone has its own VM, vCPU threads, APF driver and userfaultfd: userspace APF works per
//! clone as in a single restore, and a chunk in flight for one clone is joined by another,
//! never fetched twice. A clone that dies ends alone; a source that fails stops every clone
//! with the same error (the pager reports it to all).

mod capacity;
mod counted;
mod report;

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use pager::{PageCache, PageSource, Pager, PagerConfig};

use crate::config::ApfPath;
use crate::error::{Result, VmmError};
use crate::host_memory::{self, MappingUsage};
use crate::layout;
use crate::lazy::{ClonePlan, LazyPlan};
use crate::machine::{EmptyMachine, Machine};
use crate::memory::GuestRam;
use crate::restore::{RestoreOptions, load_eager, split_ram};
use crate::run::observer::RunObserver;
use crate::run::{self, ApfOptions, Memory, RunOptions};
use crate::snapshot::format::Snapshot;
use crate::source;

pub use capacity::{check as check_capacity, worst_case_bytes};
pub use counted::Counted;
pub use report::{CloneEntry, CloneTotals, ClonesReport, GuestMemoryUse};

/// How to restore clones: `restore` (lazy; no new snapshot) for each of `clones` guests.
#[derive(Clone, Debug)]
pub struct CloneOptions {
    /// The restore every clone makes; `lazy` must be set, `snapshot` not.
    pub restore: RestoreOptions,
    /// How many clones (at least 1; as many as the host can hold at worst).
    pub clones: u32,
}

/// Makes the observer of clone `i` (runs on that clone's thread).
pub type ObserverFactory<'a> = &'a (dyn Fn(usize) -> Box<dyn RunObserver + Send> + Sync);

/// A clone made, not running yet.
struct Made {
    machine: Machine,
    ram: Arc<GuestRam>,
}

fn refuse(opts: &CloneOptions) -> Result<()> {
    let r = &opts.restore;
    if !r.lazy {
        return Err(VmmError::Config(
            "--clones needs --lazy: clones share the page cache that lazy memory fills".into(),
        ));
    }
    if r.snapshot.is_some() {
        return Err(VmmError::Config(
            "--clones cannot take a new snapshot (--snapshot-out)".into(),
        ));
    }
    Ok(())
}

/// Restores `opts.clones` clones of the snapshot in `opts.restore.dir`, sharing one page
/// cache, runs them all to their end and reports. Refused before anything runs when the
/// options or the host cannot hold them. A clone's failure is in its entry; the report
/// comes back whatever the clones did.
pub fn restore_clones(opts: &CloneOptions, observers: ObserverFactory<'_>) -> Result<ClonesReport> {
    let t0 = Instant::now();
    refuse(opts)?;
    let r = &opts.restore;
    let snap = if r.source.nbd.is_some() {
        Snapshot::open_manifest(&r.dir)?
    } else {
        Snapshot::open(&r.dir)?
    };
    let mem_size = snap.manifest.config.mem_size;
    check_capacity(opts.clones, mem_size, host_memory::mem_available()?)
        .map_err(VmmError::Config)?;
    let counted = Arc::new(Counted::new(source::open(&snap, &r.source)?));
    let source: Arc<dyn PageSource> = Arc::clone(&counted) as _;
    let regions = layout::ram_regions(mem_size);
    let (cache, lazy) = shared_cache(&regions, &source, r)?;
    let pager = Pager::start_shared(
        Arc::clone(&cache),
        &lazy.ranges,
        Arc::clone(&source),
        &PagerConfig {
            latency: r.fetch_latency,
            prefetch: r.prefetch,
            ..PagerConfig::default()
        },
    )?;
    let made = (0..opts.clones)
        .map(|_| make(&snap, r.apf, &cache, &regions))
        .collect::<Result<Vec<_>>>()?;
    let rams: Vec<Arc<GuestRam>> = made.iter().map(|m| Arc::clone(&m.ram)).collect();
    let run_opts = RunOptions {
        timeout: r.timeout,
        snapshot: None,
        echo_console: false,
        apf: ApfOptions {
            faults_to_apf: r.apf == ApfPath::Userspace,
            max_outstanding: r.apf_max_outstanding,
            policy: r.apf_policy,
        },
        interrupt: r.interrupt.clone(),
    };
    let plan = ClonePlan {
        lazy,
        pager: pager.handle(),
    };
    let setup_us = micros(t0);
    tracing::info!(clones = opts.clones, setup_us, "clones made, starting them");
    let ended = run_all(made, &plan, &run_opts, observers, t0);
    let wall_us = ended.iter().map(|e| e.1).max().unwrap_or(0);
    // Every clone has ended; their RAM is still mapped (held here): measure it now.
    let usage = rams
        .iter()
        .map(|ram| host_memory::ram_usage(ram))
        .collect::<Result<Vec<_>>>()?;
    let cache_bytes = cache.resident_bytes().map_err(|err| VmmError::Os {
        what: "measuring the shared page cache",
        err,
    })?;
    let pager_stats = pager.stop();
    let clones: Vec<CloneEntry> = ended
        .into_iter()
        .zip(&usage)
        .enumerate()
        .map(|(i, ((result, done_us), &memory))| CloneEntry::new(i, result, done_us, memory))
        .collect();
    let total = usage.iter().fold(MappingUsage::default(), |a, &b| a + b);
    Ok(ClonesReport {
        dir: r.dir.display().to_string(),
        source: source.describe(),
        apf_path: r.apf,
        fetch_latency: r.fetch_latency.to_string(),
        prefetch: r.prefetch,
        mem_size,
        setup_us,
        totals: CloneTotals {
            clones: clones.len(),
            exited_ok: clones.iter().filter(|c| c.exit_status == Some(0)).count(),
            failed: clones.iter().filter(|c| c.error.is_some()).count(),
            source_bytes_fetched: counted.bytes(),
            guest_memory: GuestMemoryUse {
                pss_bytes: total.pss_bytes,
                rss_bytes: total.rss_bytes,
                private_bytes: total.anonymous_bytes,
                cache_bytes,
                host_bytes: cache_bytes + total.anonymous_bytes,
            },
            wall_us,
            pager: pager_stats,
        },
        clones,
    })
}

/// The clones' page cache for RAM `regions`, the eager low 16 MiB loaded into it from
/// `source`, and the plan for the rest of every region (served on demand into the cache).
fn shared_cache(
    regions: &[Range<u64>],
    source: &Arc<dyn PageSource>,
    r: &RestoreOptions,
) -> Result<(Arc<PageCache>, LazyPlan)> {
    // Cache offset = guest-physical address: the cache reaches the end of the highest RAM
    // region; the MMIO hole below 4 GiB is never written and takes no memory.
    let end = regions.last().map_or(0, |r| r.end);
    let cache = Arc::new(PageCache::new(end).map_err(pager::PagerError::from)?);
    let (eager, lazy) = split_ram(regions, true);
    load_eager(&**source, &eager, |gpa, bytes| {
        cache.write_at(gpa, bytes).map_err(|err| VmmError::Os {
            what: "writing the shared page cache",
            err,
        })
    })?;
    let lazy = LazyPlan {
        working_set: crate::lazy::WorkingSetPlan::default(),
        ranges: lazy,
        source: Arc::clone(source),
        latency: r.fetch_latency,
        prefetch: r.prefetch,
    };
    Ok((cache, lazy))
}

/// One clone: its RAM (`regions`) a private mapping of the cache, its VM restored up to
/// the first instruction.
fn make(snap: &Snapshot, apf: ApfPath, cache: &PageCache, regions: &[Range<u64>]) -> Result<Made> {
    let file = cache.file().try_clone().map_err(|err| VmmError::Os {
        what: "duplicating the shared page cache's fd",
        err,
    })?;
    let ram = Arc::new(GuestRam::private_file(&Arc::new(file), regions)?);
    let machine = EmptyMachine::create_on(snap, apf, Arc::clone(&ram))?.load_state(snap)?;
    Ok(Made { machine, ram })
}

/// Runs every clone on its own thread to its end: per clone, its report or error and when
/// it ended (µs after `t0`).
fn run_all(
    made: Vec<Made>,
    plan: &ClonePlan,
    opts: &RunOptions,
    observers: ObserverFactory<'_>,
    t0: Instant,
) -> Vec<(std::result::Result<crate::RunReport, String>, u64)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = made
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let plan = plan.clone();
                std::thread::Builder::new()
                    .name(format!("clone{i}"))
                    .spawn_scoped(scope, move || {
                        let _span = tracing::info_span!("clone", index = i).entered();
                        let mut observer = observers(i);
                        let r = run::run(m.machine, Memory::Clone(plan), opts, &mut *observer);
                        if let Err(e) = &r {
                            tracing::info!(clone = i, error = %e, "clone ended in an error");
                        }
                        (r.map_err(|e| e.to_string()), micros(t0))
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| (Err("its thread panicked".into()), micros(t0))),
                Err(e) => (Err(format!("spawning its thread: {e}")), micros(t0)),
            })
            .collect()
    })
}

fn micros(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}
