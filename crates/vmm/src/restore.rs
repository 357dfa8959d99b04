//! `apfvm restore`: recreate the VM a snapshot describes and run it to its exit.
//!
//! - The VM is created as at boot (same CPUID/APF features, MSR filter, in-kernel irqchip),
//!   always with `KVM_CAP_X86_DISABLE_EXITS(HLT)` ([`HaltMode::NoExit`]): with an in-kernel
//!   LAPIC, KVM would otherwise fault a missing userfaultfd page in a kworker and the fault
//!   would no longer name the vCPU thread (host-facts.md, "the trap"). Eager restores use it
//!   too, so the two modes differ only in how memory arrives.
//! - Eager: the whole memory file is read and every chunk verified before any vCPU runs; a
//!   mismatch is refused naming the chunk and its guest pages.
//! - Lazy: see [`crate::lazy`]. The low 16 MiB (boot data, counters, the VMM's page tables,
//!   the kernel image, its stacks: everything below `WORKLOAD_GPA`, touched at CPL 0 where a
//!   fault cannot be turned into an APF anyway) is loaded eagerly; workload memory arrives on
//!   demand through userfaultfd.
//! - vCPU state, irqchip and the engine's MSRs are loaded; `Engine::restore` re-runs the
//!   enable path, so each enabled vCPU gets a wake-all at its first delivery window and tasks
//!   asleep at snapshot time retry.
//! - Memory source ([`restore_with`]): the memory file, or an NBD export of it (then only
//!   the manifest is needed locally; eager memory is read through the same verified source).
//!   See docs/remote-memory.md.
//! - Guest counters: the report counts from the restore (the VMM reads the counters page
//!   of the snapshot before starting and subtracts it; guest memory is not modified).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_abi::{COUNTERS_GPA, Counters, TaskSpec, WORKLOAD_GPA};

use crate::config::{ApfMode, HaltMode, VmConfig};
use crate::error::{Result, VmmError};
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm;
use crate::lazy::{self, FetchLatency, LazyReport, LazyStats, SourceOptions};
use crate::memory::GuestRam;
use crate::report::RunReport;
use crate::run::{self, Extras, Machine, RunOptions, SnapshotPlan};
use crate::snapshot::Snapshot;

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
    /// Stop the VM and fail after this long.
    pub timeout: Option<Duration>,
    /// Echo the guest console.
    pub echo_console: bool,
    /// Take another snapshot of the restored guest.
    pub snapshot: Option<SnapshotPlan>,
    /// Measure a window from the start (see `RunOptions::window`).
    pub window: Option<Duration>,
    /// The engine's limit of outstanding APFs per vCPU (`None`: Linux's 64).
    pub apf_max_outstanding: Option<usize>,
}

/// `apfvm restore --apf`: who turns a missing page into an asynchronous page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApfPath {
    /// apfvm, from userspace (uffd message → kick → apf-host engine → inject).
    Userspace,
    /// Nobody: every missing page stalls its vCPU (the VMM never injects). `hlt` stays in
    /// the guest (`--hlt no-exit`), so the fault is taken on the vCPU thread, which sleeps in
    /// the kernel's userfaultfd handling until the page lands: no interrupt gets in.
    Off,
    /// Nobody injects, but the VM is made as for `Kernel` except that the APF MSRs stay
    /// filtered to the VMM (KVM never sees the guest's enable): in-kernel `hlt` and LAPIC, so
    /// KVM takes the fault in a kworker and parks the vCPU in its "APF halt", which lets
    /// interrupts in (host-facts.md, "the trap").
    OffHalt,
    /// KVM's own in-kernel APF on the same userfaultfd memory: no MSR filter (KVM owns the
    /// APF MSRs; the snapshot's values are written into KVM), in-kernel `hlt` (KVM's path
    /// needs its "APF halt"), faults taken by KVM's kworkers. Only a v2 guest gets APFs.
    Kernel,
}

impl std::fmt::Display for ApfPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApfPath::Userspace => "on (userspace)",
            ApfPath::Off => "off",
            ApfPath::OffHalt => "off (KVM's APF halt)",
            ApfPath::Kernel => "kernel (KVM's own)",
        })
    }
}

/// What `apfvm restore` adds to the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    /// The snapshot.
    pub dir: String,
    /// `eager` or `lazy`.
    pub mode: String,
    /// Who turned missing pages into APFs.
    pub apf: ApfPath,
    /// The APF protocol the snapshot's guest was booted with.
    pub booted_apf: ApfMode,
    /// `--fetch-latency`, as given.
    pub fetch_latency: String,
    /// Time to create the VM, load eager memory (read + verify) and state, µs.
    pub setup_us: u64,
    /// Bytes loaded before the first entry.
    pub eager_bytes: u64,
    /// Where guest memory came from (the memory file, or an NBD export).
    pub memory_source: String,
    /// Lazy restore: faults, APFs, latencies.
    pub lazy: Option<LazyReport>,
}

impl RestoreReport {
    /// Text lines for the summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "   restore: {} from {} (APF {}, booted {:?}, fetch latency {}), set-up {:.1} ms, {} MiB loaded eagerly; counters count from the restore",
            self.mode,
            self.dir,
            self.apf,
            self.booted_apf,
            self.fetch_latency,
            Duration::from_micros(self.setup_us).as_secs_f64() * 1000.0,
            self.eager_bytes >> 20
        );
        if let Some(l) = &self.lazy {
            s.push_str(&l.summary());
        }
        s
    }
}

/// `--apf kernel`: writes the snapshot's APF MSRs into KVM, `_INT` before `_EN` as a guest
/// writes them; the host-initiated `_EN` write runs KVM's enable path, which queues its own
/// wake-all.
fn load_kvm_apf_msrs(vcpus: &[Vcpu], saved: &apf_host::SavedState) -> Result<()> {
    for (v, saved) in vcpus.iter().zip(&saved.vcpus) {
        let mut msrs = Vec::new();
        if saved.async_pf_int != 0 {
            msrs.push((apf_abi::msr::MSR_KVM_ASYNC_PF_INT, saved.async_pf_int));
        }
        if saved.async_pf_en != 0 {
            msrs.push((apf_abi::msr::MSR_KVM_ASYNC_PF_EN, saved.async_pf_en));
        }
        if !msrs.is_empty() {
            v.set_msrs(&msrs)?;
        }
    }
    Ok(())
}

/// Lazy restore: the pager starts once the vCPUs' shared state exists; a new snapshot reads
/// never-fetched pages from this one; the report gets the lazy section.
#[allow(clippy::too_many_arguments)]
fn attach_pager(
    extras: &mut Extras,
    snap: &Snapshot,
    ram: &Arc<GuestRam>,
    opts: &RestoreOptions,
    start: u64,
    end: u64,
    base: RestoreReport,
    (source, prefetch): (Arc<dyn pager::PageSource>, pager::Prefetch),
) {
    let lazy_cfg = lazy::LazyConfig {
        snapshot: snap.clone(),
        start,
        end,
        apf: opts.apf == ApfPath::Userspace,
        latency: opts.fetch_latency,
        source: Arc::clone(&source),
        prefetch,
    };
    let stats = LazyStats::new();
    extras.capture = Some(lazy::capture_hook(
        snap,
        source,
        Arc::clone(ram),
        Arc::clone(&stats),
        start,
    ));
    let stats2 = Arc::clone(&stats);
    let ram2 = Arc::clone(ram);
    extras.attach = Some(Box::new(move |shared| {
        lazy::start(lazy_cfg, &ram2, shared, &stats2)
    }));
    extras.restore_report = Some(Box::new(move |shared| {
        let mut r = base.clone();
        r.lazy = Some(stats.report(shared));
        r
    }));
}

/// Loads guest memory `[0, eager_end)` before any vCPU runs: from the memory file, or
/// through the (verified) remote source, 4 MiB at a time.
fn load_eager(
    snap: &Snapshot,
    src: &SourceOptions,
    source: &dyn pager::PageSource,
    ram: &GuestRam,
    eager_end: u64,
) -> Result<()> {
    if src.memory_source.is_some() {
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < eager_end {
            let n = usize::try_from((eager_end - off).min(4 << 20)).unwrap_or(0);
            source
                .fetch(off / 4096, &mut buf[..n])
                .map_err(|e| VmmError::Pager(format!("{}: {e}", source.describe())))?;
            ram.write(off, &buf[..n])?;
            off += n as u64;
        }
        return Ok(());
    }
    snap.read_memory(0, eager_end, |off, bytes| {
        ram.write(off, bytes)
            .map_err(|e| crate::snapshot::SnapshotError::Io {
                path: snap.memory_path(),
                err: std::io::Error::other(e.to_string()),
            })
    })?;
    Ok(())
}

/// Restores the snapshot in `opts.dir` and runs the guest to its exit.
pub fn restore(opts: &RestoreOptions) -> Result<RunReport> {
    restore_with(opts, &SourceOptions::default())
}

/// [`restore`] with guest memory from `src` (an NBD export instead of the memory file:
/// the snapshot directory then needs only its manifest) and a prefetch policy.
pub fn restore_with(opts: &RestoreOptions, src: &SourceOptions) -> Result<RunReport> {
    let t0 = Instant::now();
    let snap = if src.memory_source.is_some() {
        Snapshot::open_manifest(&opts.dir)?
    } else {
        Snapshot::open(&opts.dir)?
    };
    let m = &snap.manifest;
    let cfg = VmConfig {
        vcpus: m.config.vcpus,
        mem_size: m.config.mem_size,
        apf: m.config.apf,
        guest_image: Vec::new(),
        tasks: m.config.tasks.iter().map(TaskSpec::from).collect(),
        quantum_us: m.config.quantum_us,
        // Userspace APF needs faults taken on the vCPU thread (see the module doc); KVM's
        // own APF needs its in-kernel halt.
        halt: if matches!(opts.apf, ApfPath::Kernel | ApfPath::OffHalt) {
            HaltMode::InKernel
        } else {
            HaltMode::NoExit
        },
        echo_console: opts.echo_console,
    };
    let kernel_apf = opts.apf == ApfPath::Kernel;
    if kernel_apf && opts.snapshot.is_some() {
        return Err(VmmError::Config(
            "--apf kernel cannot take a new snapshot (KVM owns the APF MSRs then)".into(),
        ));
    }
    run::validate_machine(&cfg)?;
    let kvm = vm::open_kvm()?;
    let ram = Arc::new(GuestRam::new(cfg.mem_size)?);
    let vm_fd = Arc::new(vm::create_with(&kvm, cfg.halt, !kernel_apf)?);
    ram.register(&vm_fd)?;
    let eager_end = if opts.lazy {
        WORKLOAD_GPA.min(cfg.mem_size)
    } else {
        cfg.mem_size
    };
    let source = lazy::open_source(&snap, src)?;
    load_eager(&snap, src, &*source, &ram, eager_end)?;
    vm::set_irqchips(&vm_fd, &m.vm.irqchips)?;
    let vcpus = m
        .vcpus
        .iter()
        .map(|s| Vcpu::restore(&kvm, &vm_fd, cfg.vcpus, cfg.apf, s))
        .collect::<Result<Vec<_>>>()?;
    if kernel_apf {
        load_kvm_apf_msrs(&vcpus, &m.engine)?;
    }
    let baseline: Counters = ram.read_obj(COUNTERS_GPA)?;
    let setup_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    tracing::info!(dir = %opts.dir.display(), lazy = opts.lazy, setup_us, "restored");

    let mut extras = Extras {
        // With KVM's own APF the engine never sees an MSR: leave it empty.
        engine: (!kernel_apf).then(|| m.engine.clone()),
        baseline: Some(baseline),
        max_outstanding: opts.apf_max_outstanding,
        ..Extras::default()
    };
    let base = RestoreReport {
        dir: opts.dir.display().to_string(),
        mode: if opts.lazy { "lazy" } else { "eager" }.into(),
        apf: opts.apf,
        booted_apf: m.config.apf,
        fetch_latency: opts.fetch_latency.to_string(),
        setup_us,
        eager_bytes: eager_end,
        memory_source: source.describe(),
        lazy: None,
    };
    if opts.lazy {
        attach_pager(
            &mut extras,
            &snap,
            &ram,
            opts,
            eager_end,
            cfg.mem_size,
            base,
            (source, src.prefetch),
        );
    } else {
        extras.restore_report = Some(Box::new(move |_| base.clone()));
    }
    let machine = Machine {
        vcpus,
        vm: vm_fd,
        ram,
        kvm,
        tsc_khz: m.config.tsc_khz,
    };
    let run_opts = RunOptions {
        timeout: opts.timeout,
        snapshot: opts.snapshot.clone(),
        window: opts.window,
    };
    run::execute(&cfg, machine, &run_opts, extras).map_err(|e| match e {
        VmmError::Timeout { after, console } => VmmError::Timeout { after, console },
        other => other,
    })
}
