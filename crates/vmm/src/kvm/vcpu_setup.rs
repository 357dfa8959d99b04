//! Making a vCPU: CPUID, the boot state of guest-abi's "Entry", or a snapshot's state;
//! and reading that state back for a snapshot.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, Msrs, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment,
};
use kvm_ioctls::{Kvm, VmFd};

use super::cpuid;
use super::vcpu::Vcpu;
use crate::config::ApfMode;
use crate::error::{Result, VmmError};
use crate::layout::{self, CODE_SELECTOR, DATA_SELECTOR, GDT, GDT_GPA, PML4_GPA};
use crate::snapshot::format::{SavedMsr, SavedVcpuState};

/// MSRs a snapshot saves besides what `KVM_GET_SREGS` holds (EFER, APIC base, FS/GS base).
/// The APF MSRs are not here: the VMM filters them and the engine saves them.
///
/// TSC policy: `IA32_TSC` is saved and written back (host-initiated), asking for the guest's
/// TSC to resume at its snapshot value. On this project's hosts (nested "PVM" KVM, no
/// hardware TSC offsetting: a CPL 3 `rdtsc` runs natively) the guest TSC follows the host's
/// whatever is written (measured: the value read back after the write is the host's), so a
/// restored guest sees the time its snapshot spent on disk pass at once; the guest copes
/// (compute deadlines only end early; the LAPIC timer state comes back with the LAPIC).
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// The LAPIC register LVT0 (local interrupt 0).
const APIC_LVT0: usize = 0x350;
/// LVT0 delivering ExtINT, unmasked.
const LVT0_EXTINT: u32 = 0x700;

impl Vcpu {
    /// Programs LVT0 as ExtINT, unmasked: with the split irqchip, KVM reports an interrupt
    /// window (`request_interrupt_window`) only while the LAPIC would accept an interrupt
    /// from the (userspace) PIC. There is no PIC, so nothing ever arrives through it; a vCPU
    /// other than 0 comes out of `KVM_CREATE_VCPU` with LVT0 masked, and a snapshot may hold
    /// either (docs/host.md, "Interrupt windows").
    fn accept_interrupt_windows(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(VmmError::kvm("KVM_GET_LAPIC"))?;
        for (dst, src) in lapic.regs[APIC_LVT0..APIC_LVT0 + 4]
            .iter_mut()
            .zip(LVT0_EXTINT.to_le_bytes())
        {
            *dst = src.cast_signed();
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(VmmError::kvm("KVM_SET_LAPIC"))
    }

    /// Creates vCPU `index` and puts it in the boot state of guest-abi's "Entry".
    pub fn create(
        kvm: &Kvm,
        vm: &VmFd,
        index: u32,
        vcpus: u32,
        apf: ApfMode,
        entry: u64,
    ) -> Result<Vcpu> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
        let vcpu = Vcpu::new(index, fd, vm);
        vcpu.set_cpuid(kvm, apf, vcpus)?;
        vcpu.set_boot_state(entry)?;
        vcpu.accept_interrupt_windows()?;
        Ok(vcpu)
    }

    /// Creates vCPU `index` with its CPUID and loads `saved` into it (restore).
    pub fn restore(
        kvm: &Kvm,
        vm: &VmFd,
        vcpus: u32,
        apf: ApfMode,
        saved: &SavedVcpuState,
    ) -> Result<Vcpu> {
        let fd = vm
            .create_vcpu(u64::from(saved.index))
            .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
        let vcpu = Vcpu::new(saved.index, fd, vm);
        vcpu.set_cpuid(kvm, apf, vcpus)?;
        vcpu.load_state(saved)?;
        vcpu.accept_interrupt_windows()?;
        Ok(vcpu)
    }

    /// Reads everything a snapshot keeps of this vCPU. Call only when no instruction
    /// completion is pending (after an `EINTR` exit or a `KVM_RUN` with `immediate_exit`).
    pub fn save_state(&self) -> Result<SavedVcpuState> {
        let fd = &self.fd;
        let regs = fd.get_regs().map_err(VmmError::kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().ok().map(|x| x.region.to_vec());
        let xcrs = fd.get_xcrs().ok();
        let events = fd
            .get_vcpu_events()
            .map_err(VmmError::kvm("KVM_GET_VCPU_EVENTS"))?;
        let lapic = fd.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?;
        let mp_state = fd
            .get_mp_state()
            .map_err(VmmError::kvm("KVM_GET_MP_STATE"))?
            .mp_state;
        let mut msrs = Vec::new();
        for &index in SAVED_MSRS {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|e| VmmError::Config(format!("MSR list: {e:?}")))?;
            // An MSR this KVM does not have reads 0 entries: skip it.
            if fd.get_msrs(&mut one).unwrap_or(0) == 1 {
                msrs.push(SavedMsr {
                    index,
                    value: one.as_slice()[0].data,
                });
            }
        }
        Ok(SavedVcpuState {
            index: self.index,
            regs,
            sregs,
            xsave,
            xcrs,
            events,
            lapic,
            mp_state,
            msrs,
        })
    }

    /// Loads a saved state: sregs (APIC base first), regs, FPU, MSRs, LAPIC, events, MP state.
    fn load_state(&self, s: &SavedVcpuState) -> Result<()> {
        let fd = &self.fd;
        fd.set_sregs(&s.sregs)
            .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&s.regs)
            .map_err(VmmError::kvm("KVM_SET_REGS"))?;
        if let Some(region) = &s.xsave {
            let mut x = kvm_bindings::kvm_xsave::default();
            if region.len() != x.region.len() {
                return Err(VmmError::Config(format!(
                    "xsave area of {} words, KVM's has {}",
                    region.len(),
                    x.region.len()
                )));
            }
            x.region.copy_from_slice(region);
            // SAFETY: a legacy 4 KiB kvm_xsave (no extra area) as KVM_GET_XSAVE returned it on
            // a vCPU with the same CPUID; KVM validates its contents.
            unsafe { fd.set_xsave(&x) }.map_err(VmmError::kvm("KVM_SET_XSAVE"))?;
        }
        if let Some(x) = &s.xcrs {
            fd.set_xcrs(x).map_err(VmmError::kvm("KVM_SET_XCRS"))?;
        }
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        if !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| VmmError::Config(format!("MSR list: {e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(VmmError::kvm("KVM_SET_MSRS"))?;
            if n != entries.len() {
                return Err(VmmError::Config(format!(
                    "KVM_SET_MSRS refused MSR {:#x} of the snapshot",
                    entries[n].index
                )));
            }
        }
        fd.set_lapic(&s.lapic)
            .map_err(VmmError::kvm("KVM_SET_LAPIC"))?;
        fd.set_vcpu_events(&s.events)
            .map_err(VmmError::kvm("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(kvm_mp_state {
            mp_state: s.mp_state,
        })
        .map_err(VmmError::kvm("KVM_SET_MP_STATE"))
    }

    /// Writes MSRs through `KVM_SET_MSRS` (host-initiated), in order.
    pub fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries)
            .map_err(|e| VmmError::Config(format!("MSR list: {e:?}")))?;
        let n = self
            .fd
            .set_msrs(&list)
            .map_err(VmmError::kvm("KVM_SET_MSRS"))?;
        if n == entries.len() {
            Ok(())
        } else {
            Err(VmmError::Config(format!(
                "KVM_SET_MSRS refused MSR {:#x} = {:#x}",
                entries[n].index, entries[n].data
            )))
        }
    }

    fn set_cpuid(&self, kvm: &Kvm, apf: ApfMode, vcpus: u32) -> Result<()> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut entries = supported.as_slice().to_vec();
        cpuid::patch(&mut entries, apf, self.index, vcpus);
        let table = kvm_bindings::CpuId::from_entries(&entries)
            .map_err(|e| VmmError::Config(format!("CPUID table: {e:?}")))?;
        self.fd
            .set_cpuid2(&table)
            .map_err(VmmError::kvm("KVM_SET_CPUID2"))
    }

    fn set_boot_state(&self, entry: u64) -> Result<()> {
        let mut s = self
            .fd
            .get_sregs()
            .map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: CODE_SELECTOR,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: DATA_SELECTOR,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        s.cs = code;
        s.ds = data;
        s.es = data;
        s.fs = data;
        s.gs = data;
        s.ss = data;
        s.gdt.base = GDT_GPA;
        s.gdt.limit = u16::try_from(size_of_val(&GDT) - 1).unwrap_or(u16::MAX);
        // No IDT until the guest loads one: an early exception is a triple fault (shutdown).
        s.idt.base = 0;
        s.idt.limit = 0;
        s.cr3 = PML4_GPA;
        s.cr4 = layout::cr::CR4;
        s.cr0 = layout::cr::CR0;
        s.efer = layout::cr::EFER;
        self.fd
            .set_sregs(&s)
            .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: entry,
            rdi: guest_abi::BOOT_INFO_GPA,
            rsi: u64::from(self.index),
            rsp: guest_abi::boot_stack_top(self.index),
            rflags: 2,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(VmmError::kvm("KVM_SET_REGS"))?;
        // With an in-kernel LAPIC only vCPU 0 starts runnable (the others wait for INIT/SIPI);
        // our contract starts every vCPU at the entry point.
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(VmmError::kvm("KVM_SET_MP_STATE"))
    }
}
