//! Creating and configuring the VM: capabilities, MSR filter, irqchip, memory.
//!
//! # `hlt` and the in-kernel LAPIC (a documented choice)
//! The VM uses KVM's split irqchip: LAPICs in the kernel (page-ready interrupts are
//! `KVM_SIGNAL_MSI`, the guest's LAPIC timer is KVM's), no PIC, IOAPIC or PIT, so that
//! `request_interrupt_window` works. A guest `hlt` then sleeps in the kernel
//! ([`HaltMode::InKernel`], the default for a boot). docs/host.md ("the trap") shows that with an
//! in-kernel LAPIC and IF = 1, KVM resolves missing userfaultfd pages in a kworker, hiding
//! which vCPU faulted; every restore therefore uses [`HaltMode::NoExit`]
//! (`KVM_CAP_X86_DISABLE_EXITS(HLT)`, enabled here before any vCPU exists), except
//! `--apf kernel`, which wants exactly KVM's kworker path (see `crate::restore`).

use kvm_bindings::{
    KVM_CAP_EXCEPTION_PAYLOAD, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X86_DISABLE_EXITS,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER, KVM_X86_DISABLE_EXITS_HLT,
    kvm_enable_cap,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use std::sync::Arc;

use crate::config::HaltMode;
use crate::error::{Result, VmmError};
use crate::kvm::msr_filter;
use crate::memory::GuestRam;

/// IOAPIC pins routed to userspace by the split irqchip (none is used).
const IOAPIC_PINS: u64 = 24;

/// The KVM device.
pub const KVM_PATH: &str = "/dev/kvm";

/// Opens `/dev/kvm` with a clear error when it is missing or not accessible.
pub fn open_kvm() -> Result<Kvm> {
    // Open it ourselves first, for an error that names the path and the OS reason.
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_PATH)
    {
        return Err(VmmError::NoKvm {
            path: KVM_PATH.into(),
            err,
        });
    }
    Kvm::new().map_err(|e| VmmError::NoKvm {
        path: KVM_PATH.into(),
        err: e.into(),
    })
}

fn enable_cap(vm: &VmFd, what: &'static str, cap: u32, arg0: u64) -> Result<()> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    vm.enable_cap(&c).map_err(VmmError::kvm(what))
}

/// A VM and the guest RAM its memory slots point into: the VM holds the RAM alive, so the
/// mapping can never go away under a slot.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    ram: Arc<GuestRam>,
}

impl Vm {
    /// Creates a VM ready for vCPUs: capabilities enabled, the MSR filter installed unless
    /// KVM is to own the APF MSRs (`filter_apf_msrs = false`: `apfvm restore --apf kernel`,
    /// the baseline that QEMU postcopy and Firecracker's UFFD restore get from stock KVM),
    /// `hlt` handled per `halt`, the in-kernel irqchip created, `ram` registered.
    pub fn create(
        kvm: &Kvm,
        halt: HaltMode,
        filter_apf_msrs: bool,
        ram: Arc<GuestRam>,
    ) -> Result<Vm> {
        for (cap, name) in [
            (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
            (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
            (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
            (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        enable_cap(
            &vm,
            "KVM_ENABLE_CAP(X86_USER_SPACE_MSR)",
            KVM_CAP_X86_USER_SPACE_MSR,
            u64::from(KVM_MSR_EXIT_REASON_FILTER),
        )?;
        if filter_apf_msrs {
            msr_filter::install(&vm)?;
        }
        // #PF injection with CR2 carried as the exception payload.
        enable_cap(
            &vm,
            "KVM_ENABLE_CAP(EXCEPTION_PAYLOAD)",
            KVM_CAP_EXCEPTION_PAYLOAD,
            1,
        )?;
        if halt == HaltMode::NoExit {
            enable_cap(
                &vm,
                "KVM_ENABLE_CAP(X86_DISABLE_EXITS, HLT)",
                KVM_CAP_X86_DISABLE_EXITS,
                u64::from(KVM_X86_DISABLE_EXITS_HLT),
            )?;
        }
        // Before any vCPU: the vCPUs get in-kernel LAPICs; the PIC and IOAPIC are not
        // emulated (the guest uses neither). With the PIC out of the kernel,
        // `request_interrupt_window` works: the APF driver asks for an exit at the first
        // moment the guest can take the next injection (docs/host.md, "Interrupt windows").
        enable_cap(
            &vm,
            "KVM_ENABLE_CAP(SPLIT_IRQCHIP)",
            KVM_CAP_SPLIT_IRQCHIP,
            IOAPIC_PINS,
        )?;
        ram.register(&vm)?;
        Ok(Vm { fd: vm, ram })
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The guest RAM it runs on.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
}

/// Raises interrupt `vector` on the LAPIC with id `apic_id` (fixed delivery, physical
/// destination): MSI address 0xfee00000 | apic_id << 12, data = vector.
pub fn signal_msi(vm: &VmFd, apic_id: u32, vector: u8) -> Result<()> {
    let msi = kvm_bindings::kvm_msi {
        address_lo: 0xfee0_0000 | (apic_id << 12),
        address_hi: 0,
        data: u32::from(vector),
        ..Default::default()
    };
    vm.signal_msi(msi)
        .map_err(VmmError::kvm("KVM_SIGNAL_MSI"))?;
    Ok(())
}
