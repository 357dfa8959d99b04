//! One vCPU: boot state, `KVM_RUN` turned into an owned [`Exit`], replies written back, and
//! the state the APF engine asks about; #PF injection with the exception payload.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_PAYLOAD,
    Msrs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
};
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};

use crate::config::ApfMode;
use crate::cpuid;
use crate::error::{Result, VmmError};
use crate::exit::{Exit, Reply};
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

/// The #PF vector.
const PF_VECTOR: u8 = 14;

/// What the engine needs to know about the vCPU at a delivery window or a fault (the area
/// words are read from guest memory by the caller).
#[allow(clippy::struct_excessive_bools)] // mirrors the hardware flags one to one
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// CS.DPL.
    pub cpl: u8,
    /// RFLAGS.IF.
    pub interrupts_enabled: bool,
    /// STI / MOV SS shadow.
    pub interrupt_shadow: bool,
    /// An exception, interrupt or NMI is pending or being injected.
    pub event_pending: bool,
    /// CR0.PG.
    pub paging: bool,
}

/// A vCPU and its index (= LAPIC id).
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    /// `KVM_CAP_SYNC_REGS` is on: KVM copies regs, sregs and events into `kvm_run` at every
    /// return from `KVM_RUN`, so the fault path reads them without three ioctls.
    sync_regs: bool,
    /// The `kvm_run` copy is current: set when `KVM_RUN` returns, cleared by any state
    /// write of ours.
    synced: AtomicBool,
    /// The last [`Vcpu::cpu_state`] found CPL 3: the vCPU is not halted (`hlt` is
    /// privileged), so an injection need not read the MP state.
    at_cpl3: AtomicBool,
}

/// `apfvm` reads vCPU state through ioctls instead of `KVM_CAP_SYNC_REGS` when this
/// environment variable is set (to compare the two).
pub const NO_SYNC_REGS_ENV: &str = "APFVM_NO_SYNC_REGS";

fn sync_regs_wanted(vm: &VmFd) -> bool {
    std::env::var_os(NO_SYNC_REGS_ENV).is_none() && vm.check_extension(kvm_ioctls::Cap::SyncRegs)
}

impl Vcpu {
    fn new(index: u32, mut fd: VcpuFd, vm: &VmFd) -> Vcpu {
        let sync_regs = sync_regs_wanted(vm);
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
            fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        }
        Vcpu {
            index,
            fd,
            sync_regs,
            synced: AtomicBool::new(false),
            at_cpl3: AtomicBool::new(false),
        }
    }
}

impl Vcpu {
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

    /// Index of this vCPU (also its APIC id).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// TSC frequency in kHz.
    pub fn tsc_khz(&self) -> Result<u32> {
        self.fd
            .get_tsc_khz()
            .map_err(VmmError::kvm("KVM_GET_TSC_KHZ"))
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

    /// Address of `kvm_run.immediate_exit`, for the kick handler.
    pub fn immediate_exit_ptr(&mut self) -> *mut u8 {
        &raw mut self.fd.get_kvm_run().immediate_exit
    }

    /// Sets or clears `kvm_run.immediate_exit`.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// Runs the vCPU until the next exit.
    pub fn run(&mut self) -> Result<Exit> {
        let ran = self.fd.run();
        self.synced.store(self.sync_regs, Ordering::Release);
        let exit = match ran {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Exit::Interrupted);
            }
            Err(e) => {
                return Err(VmmError::Kvm {
                    what: "KVM_RUN",
                    err: e,
                });
            }
        };
        Ok(match exit {
            VcpuExit::IoOut(port, data) => Exit::IoOut {
                port,
                data: data.to_vec(),
            },
            VcpuExit::IoIn(port, data) => Exit::IoIn {
                port,
                size: data.len(),
            },
            VcpuExit::MmioRead(addr, _) => Exit::Mmio { addr, write: false },
            VcpuExit::MmioWrite(addr, _) => Exit::Mmio { addr, write: true },
            VcpuExit::X86Rdmsr(m) => Exit::RdMsr { index: m.index },
            VcpuExit::X86Wrmsr(m) => Exit::WrMsr {
                index: m.index,
                data: m.data,
            },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::Intr => Exit::Interrupted,
            VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
            VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent { kind },
            VcpuExit::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // union member KVM filled in.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Exit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
            VcpuExit::Debug(_) => Exit::Other("KVM_EXIT_DEBUG"),
            VcpuExit::Exception => Exit::Other("KVM_EXIT_EXCEPTION"),
            VcpuExit::Unknown => Exit::Other("KVM_EXIT_UNKNOWN"),
            VcpuExit::IrqWindowOpen => Exit::Other("KVM_EXIT_IRQ_WINDOW_OPEN"),
            VcpuExit::MemoryFault { .. } => Exit::Other("KVM_EXIT_MEMORY_FAULT"),
            _ => Exit::Other("an exit reason apfvm does not handle"),
        })
    }

    /// Writes a reply into `kvm_run` for the exit that was just handled.
    pub fn write_reply(&mut self, reply: Reply) {
        let run = self.fd.get_kvm_run();
        match reply {
            Reply::None => {}
            Reply::Msr { error, data } => {
                if run.exit_reason == kvm_bindings::KVM_EXIT_X86_RDMSR
                    || run.exit_reason == kvm_bindings::KVM_EXIT_X86_WRMSR
                {
                    // SAFETY: the exit reason says `msr` is the live union member.
                    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
                    msr.error = u8::from(error);
                    msr.data = data;
                }
            }
            Reply::IoIn(value) => {
                if run.exit_reason == kvm_bindings::KVM_EXIT_IO {
                    // SAFETY: the exit reason says `io` is the live union member.
                    let io = unsafe { run.__bindgen_anon_1.io };
                    if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
                        let len = (io.size as usize * io.count as usize).min(4);
                        let base: *mut kvm_bindings::kvm_run = run;
                        // SAFETY: KVM places the `in` data buffer `data_offset` bytes into the
                        // kvm_run mapping (which spans pages beyond the struct), and the
                        // buffer holds size * count bytes; we write at most 4 of them.
                        unsafe {
                            let dst = base
                                .cast::<u8>()
                                .add(usize::try_from(io.data_offset).unwrap_or(0));
                            std::ptr::copy_nonoverlapping(value.to_le_bytes().as_ptr(), dst, len);
                        }
                    }
                }
            }
        }
    }

    /// Guest RIP, if it can be read.
    pub fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }

    /// The vCPU state relevant to APF delivery.
    pub fn cpu_state(&self) -> Result<CpuState> {
        if self.synced.load(Ordering::Acquire) {
            let s = self.fd.sync_regs();
            let state = state_of(&s.regs, &s.sregs, &s.events);
            self.at_cpl3.store(state.cpl == 3, Ordering::Release);
            return Ok(state);
        }
        self.at_cpl3.store(false, Ordering::Release);
        let regs = self.fd.get_regs().map_err(VmmError::kvm("KVM_GET_REGS"))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        let ev = self
            .fd
            .get_vcpu_events()
            .map_err(VmmError::kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(state_of(&regs, &sregs, &ev))
    }

    /// [`Vcpu::inject_pf`] for the vCPU thread between two `KVM_RUN`s: when the state read
    /// at this exit came through `kvm_run` (`KVM_CAP_SYNC_REGS`) and said CPL 3, the event
    /// is written there too (`kvm_dirty_regs`), for KVM to load at the next `KVM_RUN`: no
    /// ioctl at all. Otherwise the ioctls.
    pub fn inject_pf_now(&mut self, cr2: u64, error_code: u32) -> Result<()> {
        if !(self.synced.load(Ordering::Acquire) && self.at_cpl3.load(Ordering::Acquire)) {
            return self.inject_pf(cr2, error_code);
        }
        self.synced.store(false, Ordering::Release);
        self.at_cpl3.store(false, Ordering::Release);
        let ev = &mut self.fd.sync_regs_mut().events;
        ev.flags = KVM_VCPUEVENT_VALID_PAYLOAD;
        ev.exception.injected = 0;
        ev.exception.pending = 1;
        ev.exception.nr = PF_VECTOR;
        ev.exception.has_error_code = 1;
        ev.exception.error_code = error_code;
        ev.exception_has_payload = 1;
        ev.exception_payload = cr2;
        self.fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
        Ok(())
    }

    /// Injects #PF with CR2 = `cr2` (exception payload) and `error_code`. A vCPU halted in the
    /// kernel is made runnable so it takes the exception.
    pub fn inject_pf(&self, cr2: u64, error_code: u32) -> Result<()> {
        let mut ev = if self.synced.swap(false, Ordering::AcqRel) {
            self.fd.sync_regs().events
        } else {
            self.fd
                .get_vcpu_events()
                .map_err(VmmError::kvm("KVM_GET_VCPU_EVENTS"))?
        };
        ev.flags = KVM_VCPUEVENT_VALID_PAYLOAD;
        ev.exception.injected = 0;
        ev.exception.pending = 1;
        ev.exception.nr = PF_VECTOR;
        ev.exception.has_error_code = 1;
        ev.exception.error_code = error_code;
        ev.exception_has_payload = 1;
        ev.exception_payload = cr2;
        self.fd
            .set_vcpu_events(&ev)
            .map_err(VmmError::kvm("KVM_SET_VCPU_EVENTS"))?;
        if self.at_cpl3.swap(false, Ordering::AcqRel) {
            // Interrupted at CPL 3 (read from this very exit): not halted.
            return Ok(());
        }
        let mp = self
            .fd
            .get_mp_state()
            .map_err(VmmError::kvm("KVM_GET_MP_STATE"))?;
        if mp.mp_state == KVM_MP_STATE_HALTED {
            self.fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(VmmError::kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }
}

fn state_of(regs: &kvm_regs, sregs: &kvm_sregs, ev: &kvm_vcpu_events) -> CpuState {
    CpuState {
        cpl: sregs.cs.dpl,
        interrupts_enabled: regs.rflags & (1 << 9) != 0,
        interrupt_shadow: ev.interrupt.shadow != 0,
        event_pending: ev.exception.pending != 0
            || ev.exception.injected != 0
            || ev.interrupt.injected != 0
            || ev.nmi.injected != 0
            || ev.nmi.pending != 0,
        paging: sregs.cr0 & (1 << 31) != 0,
    }
}
