//! One run of a machine: the APF driver, the memory backend, a thread per vCPU, the wait for
//! the guest's exit status (or its death, a timeout, a pause for a snapshot), the report.
//!
//! ```text
//! Machine (booted or restored) ─► run(machine, Memory::Resident | Memory::Lazy(plan), options, observer)
//!     ApfService (engine MSRs of a restored guest loaded) ─► Shared (stop/pause, console, kickers)
//!     Memory::Lazy: LazyMemory::start(plan) with the pager's events going to the APF driver
//!     threads::run_threads ─► Outcome ─► snapshot (if paused) ─► RunReport ─► pager stopped
//! ```

pub mod observer;
pub mod snapshot;
pub mod threads;
pub mod vcpu_loop;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apf_abi::PvFeatures;
use apf_host::{EngineConfig, RamMap, SavedState};
use guest_abi::{COUNTERS_GPA, COUNTERS_MAGIC, Counters};
use pager::PagerObserver;

use crate::apf::{ApfPolicy, ApfService, DriverConfig};
use crate::config::VmConfig;
use crate::console::Console;
use crate::error::{Result, VmmError};
use crate::kick::{self, Kicker};
use crate::kvm::cpuid;
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::Vm;
use crate::lazy::{ClonePlan, LazyMemory, LazyPlan};
use crate::machine::Machine;
use crate::report::{self, RunReport, SnapshotReport};
use observer::RunObserver;
use threads::{Outcome, Watch};
use vcpu_loop::Shared;

/// When and where to take a snapshot of the running guest.
#[derive(Clone, Debug, Default)]
pub struct SnapshotPlan {
    /// The snapshot directory to create (must not exist).
    pub out: PathBuf,
    /// Pause at the guest's first "snapshot me" (port 0xf5).
    pub on_guest_request: bool,
    /// Pause this long after the start.
    pub at: Option<Duration>,
    /// Pause when this flag is raised (the CLI raises it on SIGUSR1).
    pub on_flag: Option<Arc<AtomicBool>>,
}

/// What the APF driver does with faults.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApfOptions {
    /// Turn missing-page faults of vCPU threads into APFs (lazy memory, `--apf on`).
    pub faults_to_apf: bool,
    /// The engine's limit of outstanding APFs per vCPU (`None`: Linux's 64).
    pub max_outstanding: Option<usize>,
    /// When a fault becomes an APF (`--apf-policy`; adaptive by default).
    pub policy: ApfPolicy,
}

/// What a run does besides running the guest to its exit.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop the VM and fail after this long.
    pub timeout: Option<Duration>,
    /// Take a snapshot (the run then ends instead of running to the guest's exit).
    pub snapshot: Option<SnapshotPlan>,
    /// Echo the guest console to stdout as it arrives.
    pub echo_console: bool,
    /// The APF driver.
    pub apf: ApfOptions,
    /// Stop the VM (and remove a snapshot being written) when this flag is raised: the CLI
    /// raises it on SIGINT and SIGTERM.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// How guest memory is provided.
#[derive(Debug)]
pub enum Memory {
    /// Every page is in RAM before the first instruction (booted, or eagerly restored).
    Resident,
    /// Part of RAM arrives on demand.
    Lazy(LazyPlan),
    /// Part of RAM arrives on demand into the page cache this clone shares with others.
    Clone(ClonePlan),
}

/// The APF driver for this machine (the MSRs of a restored guest loaded) and what every
/// vCPU thread shares.
fn shared_state(
    cfg: &VmConfig,
    vm: &Arc<Vm>,
    vcpus: usize,
    apf_state: Option<&SavedState>,
    memory: &Memory,
    opts: &RunOptions,
) -> Result<Shared> {
    let kickers: Vec<Kicker> = (0..vcpus).map(|_| Kicker::new()).collect();
    let mut engine = EngineConfig::new(
        PvFeatures(cpuid::pv_features(cfg.apf)),
        vcpus,
        // The RAM regions: an APF area in the MMIO hole or past the end is #GP.
        RamMap::new(vm.ram().regions().iter().cloned()),
    );
    if let Some(limit) = opts.apf.max_outstanding {
        engine.max_outstanding_per_vcpu = limit.max(1);
    }
    let apf = ApfService::new(
        DriverConfig {
            engine,
            faults_to_apf: opts.apf.faults_to_apf,
            lazy: match memory {
                Memory::Resident => Vec::new(),
                Memory::Lazy(plan) => plan.ranges.clone(),
                Memory::Clone(plan) => plan.lazy.ranges.clone(),
            },
            policy: opts.apf.policy,
        },
        Arc::clone(vm),
        kickers.clone(),
    )?;
    if let Some(saved) = apf_state {
        apf.restore(saved)?;
    }
    let mut shared = Shared::new(
        kickers,
        apf,
        Console::new(opts.echo_console),
        opts.snapshot.as_ref().is_some_and(|p| p.on_guest_request),
    );
    if let Memory::Lazy(plan) = memory {
        shared.recorder.clone_from(&plan.working_set.recorder);
        shared.replay.clone_from(&plan.working_set.replay);
    }
    Ok(shared)
}

/// The run's failure, if it ended in one: a failure outside the vCPU threads (the pager)
/// first, then the VMM's, the guest's death, an interrupt, the timeout.
fn failure(shared: &Shared, out: &mut Outcome, opts: &RunOptions) -> Option<VmmError> {
    if let Some(e) = shared.take_failure().or_else(|| out.error.take()) {
        return Some(e);
    }
    if let Some(f) = out.fault.take() {
        return Some(VmmError::GuestFault(f));
    }
    if out.interrupted {
        return Some(VmmError::Interrupted);
    }
    out.timed_out.then(|| VmmError::Timeout {
        after: opts.timeout.unwrap_or_default(),
        console: tail(&shared.console.text(), 2000),
    })
}

/// A machine while it runs: what its vCPU threads share and its memory backend. It owns
/// the teardown order: the pager stops in [`Session::report`], after the vCPU threads have
/// ended and a snapshot has been written (closing the userfaultfd earlier would turn missing
/// pages into zero pages); the VM and its RAM go last, when the last `Arc` holding them goes.
struct Session {
    cfg: VmConfig,
    tsc_khz: u32,
    restored: bool,
    vm: Arc<Vm>,
    shared: Arc<Shared>,
    lazy: Option<LazyMemory>,
    /// The guest's counters at the start: a restored guest's count from there.
    baseline: Option<Counters>,
}

impl Session {
    /// Sets `machine` up to run with `memory`; returns its vCPUs for their threads.
    fn start(machine: Machine, memory: Memory, opts: &RunOptions) -> Result<(Session, Vec<Vcpu>)> {
        let Machine {
            config: cfg,
            tsc_khz,
            vcpus,
            vm,
            apf_state,
            restored,
            ..
        } = machine;
        let shared = Arc::new(shared_state(
            &cfg,
            &vm,
            vcpus.len(),
            apf_state.as_ref(),
            &memory,
            opts,
        )?);
        let lazy = match memory {
            Memory::Resident => None,
            Memory::Lazy(plan) => Some(LazyMemory::start(
                plan,
                vm.ram(),
                Arc::clone(&shared) as Arc<dyn PagerObserver>,
            )?),
            Memory::Clone(plan) => Some(LazyMemory::attach(
                plan,
                vm.ram(),
                Arc::clone(&shared) as Arc<dyn PagerObserver>,
            )?),
        };
        // Read, never written: guest memory is the snapshot's.
        let baseline = vm
            .ram()
            .read_obj::<Counters>(COUNTERS_GPA)
            .ok()
            .filter(|c| c.magic == COUNTERS_MAGIC);
        let session = Session {
            cfg,
            tsc_khz,
            restored,
            vm,
            shared,
            lazy,
            baseline,
        };
        Ok((session, vcpus))
    }

    /// How the run ended: the guest's exit status, or the snapshot it was paused for.
    fn conclude(&self, out: &Outcome, opts: &RunOptions) -> Result<(u32, Option<SnapshotReport>)> {
        match (out.exit_code, opts.snapshot.as_ref()) {
            (Some(status), Some(p)) => Err(VmmError::ExitedBeforeSnapshot {
                status,
                dir: p.out.clone(),
            }),
            (Some(status), None) => Ok((status, None)),
            (None, Some(p)) if out.paused => {
                let paused = snapshot::Paused {
                    config: &self.cfg,
                    tsc_khz: self.tsc_khz,
                    vcpus: &out.vcpus,
                    vm: &self.vm,
                    apf: self.shared.apf.save(),
                };
                let trigger = self.shared.pause_trigger().unwrap_or_default();
                let report = write_snapshot(&p.out, &trigger, &paused, self.lazy.as_ref(), opts)?;
                Ok((0, Some(report)))
            }
            (None, _) => Err(VmmError::Pause(
                "the vCPUs stopped without an exit status".into(),
            )),
        }
    }

    /// The report; stops the pager.
    fn report(self, exit_status: u32, out: Outcome, elapsed: Duration) -> Result<RunReport> {
        let counters: Counters = self.vm.ram().read_obj(COUNTERS_GPA)?;
        let (tasks, cpus) =
            report::guest_view(&self.cfg, &counters, self.baseline.as_ref(), self.tsc_khz);
        let working_set = self.lazy.as_ref().and_then(LazyMemory::working_set_report);
        let lazy = self.lazy.map(|l| {
            let report = l.report();
            l.stop();
            report
        });
        Ok(RunReport {
            exit_status,
            protocol: self.cfg.apf,
            vcpus: self.cfg.vcpus,
            mem_size: self.cfg.mem_size,
            elapsed_us: micros(elapsed),
            tsc_khz: self.tsc_khz,
            guest_counters_valid: counters.magic == COUNTERS_MAGIC,
            counters_since_restore: self.restored && self.baseline.is_some(),
            tasks,
            cpus,
            apf: self.shared.apf.report(),
            vmm: out.stats,
            lazy,
            console: self.shared.console.text(),
            snapshot: None,
            restore: None,
            working_set,
        })
    }
}

/// Runs `machine` with `memory` to its end and reports. `observer` watches from this thread.
pub fn run(
    machine: Machine,
    memory: Memory,
    opts: &RunOptions,
    observer: &mut dyn RunObserver,
) -> Result<RunReport> {
    kick::install_handler()?;
    let plan = opts.snapshot.as_ref();
    if let Some(p) = plan
        && p.out.exists()
    {
        return Err(VmmError::Config(format!(
            "{} already exists; apfvm never overwrites a snapshot",
            p.out.display()
        )));
    }
    let (session, vcpus) = Session::start(machine, memory, opts)?;
    let ram = Arc::clone(session.vm.ram());
    observer.start(&ram)?;
    let start = Instant::now();
    let watch = Watch {
        // A limit too far away to represent is no limit.
        deadline: opts.timeout.and_then(|t| start.checked_add(t)),
        pause_at: plan.and_then(|p| p.at).and_then(|t| start.checked_add(t)),
        pause_flag: plan.and_then(|p| p.on_flag.as_deref()),
        interrupt: opts.interrupt.as_deref(),
    };
    let mut out = threads::run_threads(vcpus, &session.shared, &watch, observer, &ram, start)?;
    let elapsed = start.elapsed();
    observer.finish(&ram, elapsed);
    if let Some(e) = failure(&session.shared, &mut out, opts) {
        return Err(e);
    }
    let (exit_status, snapshot) = session.conclude(&out, opts)?;
    let mut report = session.report(exit_status, out, elapsed)?;
    report.snapshot = snapshot;
    Ok(report)
}

/// Writes the snapshot of the paused VM into `out`, reading lazily served memory that never
/// arrived from its source.
fn write_snapshot(
    out: &std::path::Path,
    trigger: &str,
    paused: &snapshot::Paused<'_>,
    lazy: Option<&LazyMemory>,
    opts: &RunOptions,
) -> Result<SnapshotReport> {
    let t0 = Instant::now();
    let interrupted = || {
        opts.interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    };
    let ram = paused.vm.ram();
    let bytes = match lazy {
        Some(l) => snapshot::take(
            out,
            trigger,
            paused,
            &|gpa, buf| l.read_for_snapshot(gpa, buf),
            &interrupted,
        )?,
        None => snapshot::take(
            out,
            trigger,
            paused,
            &|gpa, buf| Ok(ram.read(gpa, buf)?),
            &interrupted,
        )?,
    };
    Ok(SnapshotReport {
        dir: out.display().to_string(),
        trigger: trigger.to_string(),
        memory_bytes: bytes,
        write_us: micros(t0.elapsed()),
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}
