//! One run of a guest: build the machine (boot it, or restore it from a snapshot), start a
//! thread per vCPU, wait for the guest's exit status (or its death, a timeout, or a pause for
//! a snapshot), collect the counters.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, mpsc};
use std::time::{Duration, Instant};

use apf_abi::PvFeatures;
use guest_abi::{
    ABI_VERSION, BOOT_INFO_GPA, BOOT_MAGIC, BootInfo, COUNTERS_GPA, Counters, MAX_CPUS, MAX_TASKS,
    TaskSpec,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::apf::Apf;
use crate::config::VmConfig;
use crate::console::Console;
use crate::cpuid;
use crate::error::{Result, VmmError};
use crate::exit::GuestFault;
use crate::kick::{self, Kicker};
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm;
use crate::layout;
use crate::loader;
use crate::memory::GuestRam;
use crate::report::{RunReport, SnapshotReport};
use crate::snapshot::take;
use crate::vcpu_loop::{Shared, VcpuEnd, VcpuStats, run_vcpu};

/// Checks a configuration before anything touches KVM.
pub fn validate(cfg: &VmConfig) -> Result<loader::KernelImage> {
    validate_machine(cfg)?;
    Ok(loader::parse(&cfg.guest_image)?)
}

/// The checks that do not involve the guest image (also applied to a restored config).
pub fn validate_machine(cfg: &VmConfig) -> Result<()> {
    if cfg.vcpus == 0 || cfg.vcpus as usize > MAX_CPUS {
        return Err(VmmError::Config(format!(
            "--vcpus {} must be between 1 and {MAX_CPUS}",
            cfg.vcpus
        )));
    }
    layout::check_ram_size(cfg.mem_size)?;
    if cfg.tasks.len() > MAX_TASKS {
        return Err(VmmError::Config(format!(
            "{} tasks: at most {MAX_TASKS}",
            cfg.tasks.len()
        )));
    }
    for (i, t) in cfg.tasks.iter().enumerate() {
        if t.cpu >= cfg.vcpus {
            return Err(VmmError::Config(format!(
                "task {i} is assigned to vCPU {} of {}",
                t.cpu, cfg.vcpus
            )));
        }
    }
    Ok(())
}

fn boot_info(cfg: &VmConfig, tsc_khz: u32) -> BootInfo {
    let mut tasks = [TaskSpec::default(); MAX_TASKS];
    tasks[..cfg.tasks.len()].copy_from_slice(&cfg.tasks);
    BootInfo {
        magic: BOOT_MAGIC,
        version: ABI_VERSION,
        cpu_count: cfg.vcpus,
        ram_size: cfg.mem_size,
        tsc_khz: u64::from(tsc_khz),
        quantum_us: cfg.quantum_us,
        task_count: u32::try_from(cfg.tasks.len()).unwrap_or(0),
        tasks,
    }
}

/// When and where to take a snapshot of the running guest.
#[derive(Clone, Debug, Default)]
pub struct SnapshotPlan {
    /// The snapshot directory to create (must not exist).
    pub out: PathBuf,
    /// Pause at the guest's first "snapshot me" (port 0xf5).
    pub on_guest_request: bool,
    /// Pause this long after the start.
    pub at: Option<Duration>,
    /// Pause when the process receives SIGUSR1.
    pub on_sigusr1: bool,
}

/// What a run does besides running the guest to its exit.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop the VM and fail after this long.
    pub timeout: Option<Duration>,
    /// Take a snapshot (the VM then ends instead of running to its exit).
    pub snapshot: Option<SnapshotPlan>,
    /// Measure a window of this length from the start: compute tasks are held running
    /// (guest_abi::COMPUTE_HOLD_GPA) until it ends, their work is sampled at its end, and
    /// the moment every scan task is done is polled (the report's `window`).
    pub window: Option<Duration>,
}

/// Polls the guest's counters page from the main thread during a measured window.
#[derive(Debug)]
struct WindowSampler {
    ram: Arc<GuestRam>,
    window: Duration,
    compute: Vec<usize>,
    scans: Vec<usize>,
    baseline: Vec<u64>,
    at_window: Option<Vec<u64>>,
    scans_done: Option<Duration>,
}

/// How often the window's sampler reads the counters page.
const SAMPLE_POLL: Duration = Duration::from_micros(500);

impl WindowSampler {
    fn new(
        cfg: &VmConfig,
        ram: &Arc<GuestRam>,
        window: Duration,
        baseline: Option<&Counters>,
    ) -> Result<Self> {
        let of = |k: guest_abi::TaskKind| -> Vec<usize> {
            cfg.tasks
                .iter()
                .enumerate()
                .filter(|(_, t)| t.kind == k as u32)
                .map(|(i, _)| i)
                .collect()
        };
        ram.write_u64(guest_abi::COMPUTE_HOLD_GPA, 1)?;
        Ok(WindowSampler {
            ram: Arc::clone(ram),
            window,
            compute: of(guest_abi::TaskKind::Compute),
            scans: of(guest_abi::TaskKind::Scan),
            baseline: (0..MAX_TASKS)
                .map(|i| baseline.map_or(0, |b| b.tasks[i].work))
                .collect(),
            at_window: None,
            scans_done: None,
        })
    }

    fn done(&self) -> bool {
        self.at_window.is_some() && self.scans_done.is_some()
    }

    /// Reads the counters; records the window's end and the scans' completion when due.
    fn poll(&mut self, elapsed: Duration) {
        if self.done() {
            return;
        }
        let Ok(c) = self.ram.read_obj::<Counters>(COUNTERS_GPA) else {
            return;
        };
        if self.scans_done.is_none()
            && self
                .scans
                .iter()
                .all(|&i| c.tasks[i].state == guest_abi::task_state::DONE)
        {
            self.scans_done = Some(elapsed);
        }
        if self.at_window.is_none() && elapsed >= self.window {
            self.at_window = Some(c.tasks.iter().map(|t| t.work).collect());
            // Let the compute tasks end once the other tasks are done.
            let _ = self.ram.write_u64(guest_abi::COMPUTE_HOLD_GPA, 0);
        }
    }

    fn report(&mut self, elapsed: Duration) -> crate::report::WindowReport {
        let ended_early = self.at_window.is_none();
        // A last look: the scans may have finished (and the guest exited) between two polls;
        // their time is then the exit's (at most one poll period late).
        self.poll(elapsed.max(self.window));
        let work = self.at_window.clone().unwrap_or_default();
        let task_work: Vec<u64> = work
            .iter()
            .zip(&self.baseline)
            .map(|(w, b)| w.saturating_sub(*b))
            .collect();
        crate::report::WindowReport {
            window_us: u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX),
            compute_work: self
                .compute
                .iter()
                .map(|&i| task_work.get(i).copied().unwrap_or(0))
                .sum(),
            task_work: task_work
                .into_iter()
                .take(self.compute.len() + self.scans.len())
                .collect(),
            scans_done_us: self
                .scans_done
                .map(|d| u64::try_from(d.min(elapsed).as_micros()).unwrap_or(u64::MAX)),
            guest_ended_before_window: ended_early,
        }
    }
}

/// A created VM with its memory and vCPUs, not running yet.
#[derive(Debug)]
pub struct Machine {
    /// vCPUs, in index order (declared first: dropped before the VM).
    pub vcpus: Vec<Vcpu>,
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The KVM system fd.
    pub kvm: Kvm,
    /// TSC frequency given to the guest.
    pub tsc_khz: u32,
}

/// Boots the guest and runs it to its exit. `timeout`: stop the VM and fail after this long.
pub fn run(cfg: &VmConfig, timeout: Option<Duration>) -> Result<RunReport> {
    run_with(
        cfg,
        &RunOptions {
            timeout,
            snapshot: None,
            window: None,
        },
    )
}

/// Boots the guest and runs it to its exit, or until it is paused for the snapshot planned
/// in `opts` (the report's `snapshot` then says where it is).
pub fn run_with(cfg: &VmConfig, opts: &RunOptions) -> Result<RunReport> {
    let machine = boot(cfg)?;
    execute(cfg, machine, opts, Extras::default())
}

/// Creates the VM and loads the guest per `cfg`.
fn boot(cfg: &VmConfig) -> Result<Machine> {
    let image = validate(cfg)?;
    let kvm = vm::open_kvm()?;
    let ram = Arc::new(GuestRam::new(cfg.mem_size)?);
    let vm_fd = Arc::new(vm::create(&kvm, cfg.halt)?);
    ram.register(&vm_fd)?;
    layout::write_boot_tables(&ram)?;
    image.load(&ram)?;
    let mut vcpus = Vec::new();
    for index in 0..cfg.vcpus {
        vcpus.push(Vcpu::create(
            &kvm,
            &vm_fd,
            index,
            cfg.vcpus,
            cfg.apf,
            image.entry,
        )?);
    }
    let tsc_khz = vcpus[0].tsc_khz()?;
    ram.write_obj(BOOT_INFO_GPA, &boot_info(cfg, tsc_khz))?;
    tracing::info!(vcpus = cfg.vcpus, mem = cfg.mem_size, apf = ?cfg.apf, entry = format_args!("{:#x}", image.entry), tsc_khz, "booting");
    Ok(Machine {
        vcpus,
        vm: vm_fd,
        ram,
        kvm,
        tsc_khz,
    })
}

/// Builds the restore section of the report at the end of a run.
pub(crate) type ReportHook = Box<dyn Fn(&Shared) -> crate::report::RestoreReport>;

/// Hooks a restore adds to a run.
#[derive(Default)]
pub(crate) struct Extras {
    /// Engine state to load before the first entry (its enable path queues a wake-all per
    /// enabled vCPU).
    pub engine: Option<apf_host::SavedState>,
    /// The guest counters found in the snapshot: the report counts from them.
    pub baseline: Option<Counters>,
    /// Called once `Shared` exists and before the vCPUs start (the lazy pager is started
    /// here); what it returns lives until the vCPUs and the snapshot are done.
    #[allow(clippy::type_complexity)]
    pub attach: Option<Box<dyn FnOnce(&Arc<Shared>) -> Result<Box<dyn std::any::Any>>>>,
    /// How a snapshot reads guest memory (default: through the mapping).
    pub capture: Option<take::CaptureHook>,
    /// Extra report section.
    pub restore_report: Option<ReportHook>,
    /// The engine's limit of outstanding APFs per vCPU (`None`: its default, 64).
    pub max_outstanding: Option<usize>,
}

impl std::fmt::Debug for Extras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extras")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// Runs a built machine to its end and reports.
#[allow(clippy::too_many_lines)] // one sequence: start, run, classify the end, snapshot, report
pub(crate) fn execute(
    cfg: &VmConfig,
    machine: Machine,
    opts: &RunOptions,
    mut extras: Extras,
) -> Result<RunReport> {
    kick::install_handler()?;
    if let Some(p) = &opts.snapshot
        && p.out.exists()
    {
        return Err(VmmError::Config(format!(
            "{} already exists; apfvm never overwrites a snapshot",
            p.out.display()
        )));
    }
    let Machine {
        vcpus,
        vm: vm_fd,
        ram,
        kvm: _kvm,
        tsc_khz,
    } = machine;
    let kickers: Vec<Kicker> = (0..cfg.vcpus).map(|_| Kicker::new()).collect();
    let features = PvFeatures(cpuid::pv_features(cfg.apf));
    let apf = Apf::new(
        features,
        Arc::clone(&ram),
        Arc::clone(&vm_fd),
        kickers.clone(),
        extras.max_outstanding,
    )?;
    if let Some(saved) = &extras.engine {
        apf.restore(saved)?;
    }
    let plan = opts.snapshot.as_ref();
    let shared = Arc::new(Shared::new(
        kickers,
        apf,
        Console::new(cfg.echo_console),
        plan.is_some_and(|p| p.on_guest_request),
    ));
    if plan.is_some_and(|p| p.on_sigusr1) {
        install_sigusr1()?;
    }
    let mut sampler = opts
        .window
        .map(|w| WindowSampler::new(cfg, &ram, w, extras.baseline.as_ref()))
        .transpose()?;
    // Lives until the vCPUs are gone and the snapshot (if any) is written.
    let attached = match extras.attach.take() {
        Some(f) => Some(f(&shared)?),
        None => None,
    };

    let start = Instant::now();
    let mut out = run_threads(
        vcpus,
        &shared,
        opts.timeout.map(|t| start + t),
        plan.and_then(|p| p.at).map(|t| start + t),
        plan.is_some_and(|p| p.on_sigusr1),
        sampler.as_mut(),
        start,
    )?;
    let elapsed = start.elapsed();
    out.stats.sort_by_key(|s| s.index);
    out.vcpus.sort_by_key(Vcpu::index);

    if let Some(why) = shared
        .failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        return Err(VmmError::Pager(why));
    }
    if let Some(e) = out.error {
        return Err(e);
    }
    if let Some(f) = out.fault {
        return Err(VmmError::GuestFault(f));
    }
    if out.timed_out {
        return Err(VmmError::Timeout {
            after: opts.timeout.unwrap_or_default(),
            console: tail(&shared.console.text(), 2000),
        });
    }
    let counters: Counters = ram.read_obj(COUNTERS_GPA)?;
    let (exit_status, snapshot) = match out.exit_code {
        Some(code) => {
            if let Some(p) = plan {
                return Err(VmmError::Config(format!(
                    "the guest exited (status {code}) before a snapshot was taken for {}",
                    p.out.display()
                )));
            }
            (code, None)
        }
        None if out.paused => {
            let Some(p) = plan else {
                return Err(VmmError::Config("paused without a snapshot plan".into()));
            };
            let trigger = shared
                .pause_trigger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_default();
            let t0 = Instant::now();
            let bytes = take::take(
                &p.out,
                cfg,
                tsc_khz,
                &trigger,
                &out.vcpus,
                &vm_fd,
                &ram,
                &shared,
                extras.capture.as_ref(),
            )?;
            let write_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            (
                0,
                Some(SnapshotReport {
                    dir: p.out.display().to_string(),
                    trigger,
                    memory_bytes: bytes,
                    write_us,
                }),
            )
        }
        None => {
            return Err(VmmError::Config(
                "the VM stopped without an exit status".into(),
            ));
        }
    };
    let mut report = RunReport::new(
        cfg,
        exit_status,
        elapsed,
        tsc_khz,
        &counters,
        extras.baseline.as_ref(),
        &shared,
        out.stats,
    );
    report.snapshot = snapshot;
    report.window = sampler.as_mut().map(|s| s.report(elapsed));
    if let Some(f) = &extras.restore_report {
        report.restore = Some(f(&shared));
    }
    // Teardown order: the pager (it serves guest RAM), then the VM (its memory slots point
    // into RAM), then RAM.
    drop(attached);
    drop(shared);
    drop(vm_fd);
    drop(ram);
    Ok(report)
}

static SIGUSR1: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    SIGUSR1.store(true, Ordering::SeqCst);
}

fn install_sigusr1() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: an all-zero `sigaction` is a valid starting value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is initialised and the handler only stores to an atomic.
        if unsafe { libc::sigaction(libc::SIGUSR1, &raw const sa, std::ptr::null_mut()) } != 0 {
            result = Err(VmmError::Os {
                what: "sigaction(SIGUSR1)",
                err: std::io::Error::last_os_error(),
            });
        }
    });
    SIGUSR1.store(false, Ordering::SeqCst);
    result
}

/// How the vCPU threads ended, together.
#[derive(Debug, Default)]
struct Outcome {
    exit_code: Option<u32>,
    fault: Option<GuestFault>,
    error: Option<VmmError>,
    timed_out: bool,
    paused: bool,
    stats: Vec<VcpuStats>,
    vcpus: Vec<Vcpu>,
}

/// Runs one thread per vCPU until all have ended; the first to end (exit status, death)
/// stops the others, and so does the deadline. A pause (guest request, `snapshot_at`,
/// SIGUSR1) ends every thread with its vCPU handed back whole.
fn run_threads(
    vcpus: Vec<Vcpu>,
    shared: &Shared,
    deadline: Option<Instant>,
    snapshot_at: Option<Instant>,
    watch_sigusr1: bool,
    mut sampler: Option<&mut WindowSampler>,
    start: Instant,
) -> Result<Outcome> {
    let (tx, rx) = mpsc::channel();
    let mut out = Outcome::default();
    let count = vcpus.len();
    std::thread::scope(|s| -> Result<()> {
        for vcpu in vcpus {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn_scoped(s, move || {
                    let (end, st, vcpu) = run_vcpu(vcpu, shared);
                    if !matches!(end, VcpuEnd::Paused) {
                        // The VM ends with the first vCPU that ends.
                        shared.stop_all();
                    }
                    let _ = tx.send((end, st, vcpu));
                })
                .map_err(|err| VmmError::Os {
                    what: "spawn vCPU thread",
                    err,
                })?;
        }
        drop(tx);
        let mut received = 0;
        let mut snapshot_at = snapshot_at;
        while received < count {
            let now = Instant::now();
            if let Some(at) = snapshot_at
                && now >= at
            {
                shared.request_pause("--at".into());
                snapshot_at = None;
            }
            if watch_sigusr1 && SIGUSR1.swap(false, Ordering::SeqCst) {
                shared.request_pause("SIGUSR1".into());
            }
            let mut wake = deadline;
            if let Some(at) = snapshot_at {
                wake = Some(wake.map_or(at, |d| d.min(at)));
            }
            if watch_sigusr1 {
                let poll = now + Duration::from_millis(20);
                wake = Some(wake.map_or(poll, |d| d.min(poll)));
            }
            if let Some(s) = sampler.as_deref_mut() {
                s.poll(now.saturating_duration_since(start));
                if !s.done() {
                    let poll = now + SAMPLE_POLL;
                    wake = Some(wake.map_or(poll, |d| d.min(poll)));
                }
            }
            let next = match wake {
                Some(d) => rx.recv_timeout(d.saturating_duration_since(now)),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match next {
                Ok((end, st, vcpu)) => {
                    received += 1;
                    out.stats.push(st);
                    out.vcpus.push(vcpu);
                    match end {
                        VcpuEnd::Done(code) => {
                            out.exit_code.get_or_insert(code);
                        }
                        VcpuEnd::Paused => out.paused = true,
                        VcpuEnd::Stopped => {}
                        VcpuEnd::Fatal(f) => {
                            out.fault.get_or_insert(f);
                        }
                        VcpuEnd::Error(e) => {
                            out.error.get_or_insert(e);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        out.timed_out = true;
                        shared.stop_all();
                        // Collect the others as they stop.
                        while let Ok((_, st, vcpu)) = rx.recv() {
                            out.stats.push(st);
                            out.vcpus.push(vcpu);
                        }
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
        Ok(())
    })?;
    // A pause only counts when every vCPU paused (none stopped or died meanwhile).
    if out.paused && (out.exit_code.is_some() || out.fault.is_some() || out.error.is_some()) {
        out.paused = false;
    }
    Ok(out)
}

fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}
