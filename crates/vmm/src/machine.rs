//! A VM made and not running yet: booted from a guest image, or recreated from a snapshot
//! in two steps ([`EmptyMachine`]: the VM and its RAM, memory loaded, then the vCPU and
//! device state).

use std::sync::Arc;

use apf_host::SavedState;
use guest_abi::{
    ABI_VERSION, BOOT_INFO_GPA, BOOT_MAGIC, BootInfo, MAX_CPUS, MAX_RAM_REGIONS, MAX_TASKS,
    RamRegion, TaskSpec,
};
use kvm_ioctls::Kvm;

use crate::config::{ApfPath, VmConfig};
use crate::error::{Result, VmmError};
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::{self, Vm};
use crate::layout;
use crate::loader;
use crate::memory::GuestRam;
use crate::snapshot::format::Snapshot;

/// A created VM with its memory and vCPUs, not running yet.
#[derive(Debug)]
pub struct Machine {
    /// What it is.
    pub config: VmConfig,
    /// TSC frequency given to the guest (kHz).
    pub tsc_khz: u32,
    /// The vCPUs, in index order.
    pub(crate) vcpus: Vec<Vcpu>,
    /// The VM and its guest RAM.
    pub(crate) vm: Arc<Vm>,
    /// The APF MSRs to load into the driver before the first entry (a restored guest's);
    /// `None` when KVM owns them (`--apf kernel`) or the guest just boots.
    pub(crate) apf_state: Option<SavedState>,
    /// Recreated from a snapshot (the report counts the guest's counters from the start).
    pub(crate) restored: bool,
    /// The KVM system fd, kept open for the VM's life.
    _kvm: Kvm,
}

/// A VM recreated from a snapshot up to its memory: the VM with the snapshot's features and
/// its RAM mapped, no vCPU yet. Guest memory the restore loads before the first instruction
/// goes in now ([`EmptyMachine::ram`]), before [`EmptyMachine::load_state`] creates the
/// vCPUs: on our hosts, memory the VMM writes after the vCPUs exist costs the guest a storm of
/// shadow-MMU faults (25 ms for 48 MiB, measured: docs/host.md).
#[derive(Debug)]
pub struct EmptyMachine {
    config: VmConfig,
    apf: ApfPath,
    vm: Arc<Vm>,
    kvm: Kvm,
}

impl EmptyMachine {
    /// Creates the VM `snapshot`'s manifest describes, with the same CPUID and APF features,
    /// for the APF path `apf`: `hlt` handling and the MSR filter follow it
    /// ([`ApfPath::halt`], [`ApfPath::kvm_owns_msrs`]). Guest RAM is mapped and empty.
    pub fn create(snapshot: &Snapshot, apf: ApfPath) -> Result<EmptyMachine> {
        Self::create_with(snapshot, apf, |kvm, size| Ok(Arc::new(new_ram(kvm, size)?)))
    }

    /// [`EmptyMachine::create`] on RAM the caller mapped (the regions of the snapshot's
    /// memory size, [`layout::ram_regions`]): a clone's private mapping of the shared page
    /// cache.
    pub fn create_on(
        snapshot: &Snapshot,
        apf: ApfPath,
        ram: Arc<GuestRam>,
    ) -> Result<EmptyMachine> {
        Self::create_with(snapshot, apf, |kvm, size| {
            check_reachable(kvm, size)?;
            let regions = layout::ram_regions(size);
            if ram.regions() != regions.as_slice() {
                return Err(VmmError::Config(format!(
                    "RAM regions {:#x?} for a snapshot of {} (regions {regions:#x?})",
                    ram.regions(),
                    layout::human_size(size)
                )));
            }
            Ok(ram)
        })
    }

    /// The VM of `snapshot` (its configuration validated first) on the RAM `ram` gives for
    /// its memory size.
    fn create_with(
        snapshot: &Snapshot,
        apf: ApfPath,
        ram: impl FnOnce(&Kvm, u64) -> Result<Arc<GuestRam>>,
    ) -> Result<EmptyMachine> {
        let m = &snapshot.manifest;
        let config = VmConfig {
            vcpus: m.config.vcpus,
            mem_size: m.config.mem_size,
            apf: m.config.apf,
            guest_image: Vec::new(),
            tasks: m.config.tasks.iter().map(TaskSpec::from).collect(),
            quantum_us: m.config.quantum_us,
            halt: apf.halt(),
        };
        validate(&config)?;
        let kvm = vm::open_kvm()?;
        let ram = ram(&kvm, config.mem_size)?;
        let vm = Arc::new(Vm::create(&kvm, config.halt, !apf.kvm_owns_msrs(), ram)?);
        Ok(EmptyMachine {
            config,
            apf,
            vm,
            kvm,
        })
    }

    /// Guest RAM, to load memory into.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vm.ram()
    }

    /// Loads the rest of `snapshot`: every vCPU's state (its LAPIC included; a PIC or IOAPIC
    /// state of a snapshot from an older build is ignored: the guest uses neither), the APF
    /// MSRs. With `ApfPath::Kernel` KVM owns those: the snapshot's values are written into
    /// KVM (`_INT` before `_EN`, as a guest writes them; KVM's enable path queues its own
    /// wake-all); otherwise the driver loads them at the start of the run.
    pub fn load_state(self, snapshot: &Snapshot) -> Result<Machine> {
        let m = &snapshot.manifest;
        let EmptyMachine {
            config,
            apf,
            vm,
            kvm,
        } = self;
        let vcpus = m
            .vcpus
            .iter()
            .map(|s| Vcpu::restore(&kvm, vm.fd(), config.vcpus, config.apf, s))
            .collect::<Result<Vec<_>>>()?;
        let apf_state = if apf.kvm_owns_msrs() {
            for (v, saved) in vcpus.iter().zip(&m.engine.vcpus) {
                let msrs: Vec<(u32, u64)> = [
                    (apf_abi::msr::MSR_KVM_ASYNC_PF_INT, saved.async_pf_int),
                    (apf_abi::msr::MSR_KVM_ASYNC_PF_EN, saved.async_pf_en),
                ]
                .into_iter()
                .filter(|&(_, value)| value != 0)
                .collect();
                if !msrs.is_empty() {
                    v.set_msrs(&msrs)?;
                }
            }
            None
        } else {
            Some(m.engine.clone())
        };
        Ok(Machine {
            config,
            tsc_khz: m.config.tsc_khz,
            vcpus,
            vm,
            apf_state,
            restored: true,
            _kvm: kvm,
        })
    }
}

/// Checks the parts of a configuration that do not involve the guest image (also applied to
/// a restored one).
pub fn validate(cfg: &VmConfig) -> Result<()> {
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
    if let Some((i, t)) = cfg
        .tasks
        .iter()
        .enumerate()
        .find(|(_, t)| t.cpu >= cfg.vcpus)
    {
        return Err(VmmError::Config(format!(
            "task {i} is assigned to vCPU {} of {}",
            t.cpu, cfg.vcpus
        )));
    }
    Ok(())
}

/// The guest-physical address width KVM gives guests (CPUID 0x8000_0008 EAX[7:0]); `None`
/// when KVM does not say.
fn guest_phys_bits(kvm: &Kvm) -> Option<u32> {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()?;
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| e.eax & 0xff)
        .filter(|&bits| bits != 0)
}

/// Guest RAM of `size` bytes in its regions, refused clearly when the host cannot give it:
/// RAM the guest's physical address width cannot reach, or a mapping the host refuses.
fn new_ram(kvm: &Kvm, size: u64) -> Result<GuestRam> {
    check_reachable(kvm, size)?;
    Ok(GuestRam::new(&layout::ram_regions(size))?)
}

/// Refuses RAM of `size` bytes that would end beyond the guest-physical addresses this
/// host's KVM offers.
fn check_reachable(kvm: &Kvm, size: u64) -> Result<()> {
    let end = layout::ram_end(size);
    if let Some(bits) = guest_phys_bits(kvm)
        && end > 1u64.checked_shl(bits).unwrap_or(u64::MAX)
    {
        return Err(VmmError::Config(format!(
            "memory size {}: RAM would end at {end:#x}, beyond the {bits}-bit guest-physical \
             addresses this host's KVM offers",
            layout::human_size(size)
        )));
    }
    Ok(())
}

fn boot_info(cfg: &VmConfig, tsc_khz: u32) -> BootInfo {
    let mut tasks = [TaskSpec::default(); MAX_TASKS];
    tasks[..cfg.tasks.len()].copy_from_slice(&cfg.tasks);
    let regions = layout::ram_regions(cfg.mem_size);
    let mut ram_regions = [RamRegion::default(); MAX_RAM_REGIONS];
    for (slot, r) in ram_regions.iter_mut().zip(&regions) {
        *slot = RamRegion {
            start: r.start,
            size: r.end - r.start,
        };
    }
    BootInfo {
        magic: BOOT_MAGIC,
        version: ABI_VERSION,
        cpu_count: cfg.vcpus,
        ram_size: cfg.mem_size,
        tsc_khz: u64::from(tsc_khz),
        quantum_us: cfg.quantum_us,
        task_count: u32::try_from(cfg.tasks.len()).unwrap_or(0),
        tasks,
        ram_region_count: u32::try_from(regions.len().min(MAX_RAM_REGIONS)).unwrap_or(0),
        reserved: 0,
        ram_regions,
    }
}

impl Machine {
    /// Creates the VM and loads the guest per `cfg`: boot tables, the kernel image, the
    /// boot information; every vCPU at the entry point.
    pub fn boot(cfg: &VmConfig) -> Result<Machine> {
        validate(cfg)?;
        let image = loader::parse(&cfg.guest_image)?;
        let kvm = vm::open_kvm()?;
        let vm = Arc::new(Vm::create(
            &kvm,
            cfg.halt,
            true,
            Arc::new(new_ram(&kvm, cfg.mem_size)?),
        )?);
        let ram = vm.ram();
        layout::write_boot_tables(ram)?;
        image.load(ram)?;
        let vcpus = (0..cfg.vcpus)
            .map(|index| Vcpu::create(&kvm, vm.fd(), index, cfg.vcpus, cfg.apf, image.entry))
            .collect::<Result<Vec<_>>>()?;
        let tsc_khz = vcpus[0].tsc_khz()?;
        ram.write_obj(BOOT_INFO_GPA, &boot_info(cfg, tsc_khz))?;
        tracing::info!(vcpus = cfg.vcpus, mem = cfg.mem_size, apf = ?cfg.apf, entry = format_args!("{:#x}", image.entry), tsc_khz, "booting");
        Ok(Machine {
            config: cfg.clone(),
            tsc_khz,
            vcpus,
            vm,
            apf_state: None,
            restored: false,
            _kvm: kvm,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vm.ram()
    }
}
