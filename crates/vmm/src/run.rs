//! One run of a guest: build the machine, start a thread per vCPU, wait for the guest's exit
//! status (or its death, or a timeout), collect the counters.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use apf_abi::PvFeatures;
use guest_abi::{
    ABI_VERSION, BOOT_INFO_GPA, BOOT_MAGIC, BootInfo, COUNTERS_GPA, Counters, MAX_CPUS, MAX_TASKS,
    TaskSpec,
};

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
use crate::report::RunReport;
use crate::vcpu_loop::{Shared, VcpuEnd, VcpuStats, run_vcpu};

/// Checks a configuration before anything touches KVM.
pub fn validate(cfg: &VmConfig) -> Result<loader::KernelImage> {
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
    Ok(loader::parse(&cfg.guest_image)?)
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

/// Boots the guest and runs it to its exit. `timeout`: stop the VM and fail after this long.
pub fn run(cfg: &VmConfig, timeout: Option<Duration>) -> Result<RunReport> {
    let image = validate(cfg)?;
    let kvm = vm::open_kvm()?;
    kick::install_handler()?;
    // RAM before the VM: locals drop in reverse order, so the VM (and its memory slots) goes
    // first.
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

    let kickers: Vec<Kicker> = (0..cfg.vcpus).map(|_| Kicker::new()).collect();
    let features = PvFeatures(cpuid::pv_features(cfg.apf));
    let shared = Shared {
        stop: AtomicBool::new(false),
        kickers: kickers.clone(),
        apf: Apf::new(features, Arc::clone(&ram), Arc::clone(&vm_fd), kickers)?,
        console: Console::new(cfg.echo_console),
    };
    tracing::info!(vcpus = cfg.vcpus, mem = cfg.mem_size, apf = ?cfg.apf, entry = format_args!("{:#x}", image.entry), tsc_khz, "booting");

    let start = Instant::now();
    let mut out = run_threads(vcpus, &shared, timeout.map(|t| start + t))?;
    let elapsed = start.elapsed();
    out.stats.sort_by_key(|s| s.index);

    if let Some(e) = out.error {
        return Err(e);
    }
    if let Some(f) = out.fault {
        return Err(VmmError::GuestFault(f));
    }
    if out.timed_out {
        return Err(VmmError::Timeout {
            after: timeout.unwrap_or_default(),
            console: tail(&shared.console.text(), 2000),
        });
    }
    let Some(exit_status) = out.exit_code else {
        return Err(VmmError::Config(
            "the VM stopped without an exit status".into(),
        ));
    };
    let counters: Counters = ram.read_obj(COUNTERS_GPA)?;
    Ok(RunReport::new(
        cfg,
        exit_status,
        elapsed,
        tsc_khz,
        &counters,
        &shared,
        out.stats,
    ))
}

/// How the vCPU threads ended, together.
#[derive(Debug, Default)]
struct Outcome {
    exit_code: Option<u32>,
    fault: Option<GuestFault>,
    error: Option<VmmError>,
    timed_out: bool,
    stats: Vec<VcpuStats>,
}

/// Runs one thread per vCPU until all have ended; the first to end (exit status, death)
/// stops the others, and so does the deadline.
fn run_threads(vcpus: Vec<Vcpu>, shared: &Shared, deadline: Option<Instant>) -> Result<Outcome> {
    let (tx, rx) = mpsc::channel();
    let mut out = Outcome::default();
    std::thread::scope(|s| -> Result<()> {
        for vcpu in vcpus {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn_scoped(s, move || {
                    let end = run_vcpu(vcpu, shared);
                    // The VM ends with the first vCPU that ends.
                    shared.stop_all();
                    let _ = tx.send(end);
                })
                .map_err(|err| VmmError::Os {
                    what: "spawn vCPU thread",
                    err,
                })?;
        }
        drop(tx);
        loop {
            let next = match deadline {
                Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match next {
                Ok((end, st)) => {
                    out.stats.push(st);
                    match end {
                        VcpuEnd::Done(code) => {
                            out.exit_code.get_or_insert(code);
                        }
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
                    out.timed_out = true;
                    shared.stop_all();
                    // Collect the others as they stop.
                    while let Ok((_, st)) = rx.recv() {
                        out.stats.push(st);
                    }
                    return Ok(());
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    })?;
    Ok(out)
}

fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}
