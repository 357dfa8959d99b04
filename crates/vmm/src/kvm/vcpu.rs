//! One vCPU at run time: `KVM_RUN` turned into an owned [`Exit`], replies written back, the
//! state the APF driver asks about, and #PF injection with the exception payload. Only the
//! vCPU's own thread uses it (`&mut self` throughout).

use apf_host::VcpuState;
use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_PAYLOAD, kvm_mp_state,
    kvm_regs, kvm_sregs, kvm_vcpu_events,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd, VmFd};

use crate::error::{Result, VmmError};
use crate::exit::{Exit, Reply};

/// The #PF vector.
const PF_VECTOR: u8 = 14;

/// A vCPU and its index (= LAPIC id).
#[derive(Debug)]
pub struct Vcpu {
    pub(super) index: u32,
    pub(super) fd: VcpuFd,
    /// `KVM_CAP_SYNC_REGS` is on: KVM copies regs, sregs and events into `kvm_run` at every
    /// return from `KVM_RUN`, so the fault path reads them without three ioctls.
    sync_regs: bool,
    /// The `kvm_run` copy is current: set when `KVM_RUN` returns, cleared by any state
    /// write of ours.
    synced: bool,
    /// The last exit's instruction completes at the next `KVM_RUN` (a PIO or MSR exit): an
    /// exception must not be queued before that.
    completion_pending: bool,
}

/// `apfvm` reads vCPU state through ioctls instead of `KVM_CAP_SYNC_REGS` when this
/// environment variable is set (to compare the two).
pub const NO_SYNC_REGS_ENV: &str = "APFVM_NO_SYNC_REGS";

fn sync_regs_wanted(vm: &VmFd) -> bool {
    std::env::var_os(NO_SYNC_REGS_ENV).is_none() && vm.check_extension(kvm_ioctls::Cap::SyncRegs)
}

impl Vcpu {
    pub(super) fn new(index: u32, mut fd: VcpuFd, vm: &VmFd) -> Vcpu {
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
            synced: false,
            completion_pending: false,
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

    /// Address of `kvm_run.immediate_exit`, for the kick handler.
    pub fn immediate_exit_ptr(&mut self) -> *mut u8 {
        &raw mut self.fd.get_kvm_run().immediate_exit
    }

    /// Sets or clears `kvm_run.immediate_exit`.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// Asks KVM to exit (`KVM_EXIT_IRQ_WINDOW_OPEN`) as soon as the guest can take an
    /// injection (IF = 1, no interrupt shadow, nothing pending), or stops asking.
    pub fn request_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = u8::from(on);
    }

    /// True when the last exit's instruction completes at the next `KVM_RUN`.
    pub fn completion_pending(&self) -> bool {
        self.completion_pending
    }

    /// Runs the vCPU until the next exit.
    pub fn run(&mut self) -> Result<Exit> {
        let ran = self.fd.run();
        self.synced = self.sync_regs;
        let exit = match ran {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.completion_pending = false;
                return Ok(Exit::Interrupted);
            }
            Err(e) => {
                return Err(VmmError::Kvm {
                    what: "KVM_RUN",
                    err: e,
                });
            }
        };
        let exit = match exit {
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
            VcpuExit::IrqWindowOpen => Exit::WindowOpen,
            VcpuExit::MemoryFault { .. } => Exit::Other("KVM_EXIT_MEMORY_FAULT"),
            _ => Exit::Other("an exit reason apfvm does not handle"),
        };
        self.completion_pending = !matches!(exit, Exit::Interrupted | Exit::WindowOpen);
        Ok(exit)
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

    /// The current privilege level (CS.DPL).
    pub fn cpl(&self) -> Result<u8> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(VmmError::kvm("KVM_GET_SREGS"))?;
        Ok(sregs.cs.dpl)
    }

    /// The vCPU state the APF engine decides on (the area words are left 0: the caller
    /// reads them from guest memory).
    pub fn cpu_state(&self) -> Result<VcpuState> {
        if self.synced {
            let s = self.fd.sync_regs();
            return Ok(state_of(&s.regs, &s.sregs, &s.events));
        }
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

    /// Injects #PF with CR2 = `cr2` (exception payload) and `error_code`, for KVM to deliver
    /// at the next `KVM_RUN`. When the state of this exit came through `kvm_run`
    /// (`KVM_CAP_SYNC_REGS`) and says CPL 3, the event is written there (`kvm_dirty_regs`):
    /// no ioctl. Otherwise through `KVM_SET_VCPU_EVENTS`, and a vCPU halted in the kernel is
    /// made runnable so that it takes the exception.
    pub fn inject_pf(&mut self, cr2: u64, error_code: u32) -> Result<()> {
        let at_cpl3 = self.synced && self.fd.sync_regs().sregs.cs.dpl == 3;
        let mut ev = if self.synced {
            self.fd.sync_regs().events
        } else {
            self.fd
                .get_vcpu_events()
                .map_err(VmmError::kvm("KVM_GET_VCPU_EVENTS"))?
        };
        self.synced = false;
        ev.flags = KVM_VCPUEVENT_VALID_PAYLOAD;
        ev.exception.injected = 0;
        ev.exception.pending = 1;
        ev.exception.nr = PF_VECTOR;
        ev.exception.has_error_code = 1;
        ev.exception.error_code = error_code;
        ev.exception_has_payload = 1;
        ev.exception_payload = cr2;
        if at_cpl3 {
            // Interrupted at CPL 3: not halted (`hlt` is privileged).
            self.fd.sync_regs_mut().events = ev;
            self.fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
            return Ok(());
        }
        self.fd
            .set_vcpu_events(&ev)
            .map_err(VmmError::kvm("KVM_SET_VCPU_EVENTS"))?;
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

fn state_of(regs: &kvm_regs, sregs: &kvm_sregs, ev: &kvm_vcpu_events) -> VcpuState {
    VcpuState {
        cpl: sregs.cs.dpl,
        interrupts_enabled: regs.rflags & (1 << 9) != 0,
        interrupt_shadow: ev.interrupt.shadow != 0,
        event_pending: ev.exception.pending != 0
            || ev.exception.injected != 0
            || ev.interrupt.injected != 0
            || ev.nmi.injected != 0
            || ev.nmi.pending != 0,
        paging: sregs.cr0 & (1 << 31) != 0,
        area_reason: 0,
        area_token: 0,
    }
}
