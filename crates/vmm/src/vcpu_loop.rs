//! The body of a vCPU thread: run, convert the exit, [`handle_exit`], carry out the action.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::apf::Apf;
use crate::console::{Console, LineBuffer};
use crate::error::VmmError;
use crate::exit::{Exit, ExitAction, ExitContext, GuestFault, MsrRefused, handle_exit};
use crate::kick::{KickTarget, Kicker};
use crate::kvm::vcpu::Vcpu;

/// What every vCPU thread shares.
#[derive(Debug)]
pub struct Shared {
    /// Set when the VM must stop (a vCPU reported an exit status or died, or a timeout).
    pub stop: AtomicBool,
    /// One kicker per vCPU.
    pub kickers: Vec<Kicker>,
    /// The APF engine and its glue.
    pub apf: Apf,
    /// The guest console.
    pub console: Console,
    /// Set when the VM must pause for a snapshot: every vCPU finishes its pending
    /// instruction and leaves its loop with [`VcpuEnd::Paused`].
    pub pause: AtomicBool,
    /// Honour the guest's "snapshot me" requests (port 0xf5) by pausing.
    pub snapshot_on_request: bool,
    /// What asked for the pause (the first request wins).
    pub pause_trigger: Mutex<Option<String>>,
    /// A failure outside the vCPU threads (the pager) that stopped the VM.
    pub failure: Mutex<Option<String>>,
}

impl Shared {
    /// Shared state for `kickers.len()` vCPUs.
    pub fn new(
        kickers: Vec<Kicker>,
        apf: Apf,
        console: Console,
        snapshot_on_request: bool,
    ) -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            kickers,
            apf,
            console,
            pause: AtomicBool::new(false),
            snapshot_on_request,
            pause_trigger: Mutex::new(None),
            failure: Mutex::new(None),
        }
    }

    /// Stops the VM because of a failure outside the vCPU threads (the first one is kept).
    pub fn fail(&self, why: String) {
        tracing::error!(%why, "stopping the VM");
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(why);
        self.stop_all();
    }

    /// Pauses every vCPU for a snapshot; `trigger` says why (kept if first).
    pub fn request_pause(&self, trigger: String) {
        {
            let mut t = self
                .pause_trigger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if t.is_none() {
                tracing::info!(%trigger, "pausing every vCPU for a snapshot");
                *t = Some(trigger);
            }
        }
        self.pause.store(true, Ordering::SeqCst);
        for k in &self.kickers {
            k.kick();
        }
    }

    /// Stops every vCPU: sets the flag and kicks them all.
    pub fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for k in &self.kickers {
            k.kick();
        }
    }
}

/// How a vCPU thread ended.
#[derive(Debug)]
pub enum VcpuEnd {
    /// This vCPU wrote the exit port.
    Done(u32),
    /// Paused for a snapshot, every instruction completed: its state may be read.
    Paused,
    /// Stopped because another vCPU ended the VM.
    Stopped,
    /// The guest died on this vCPU.
    Fatal(GuestFault),
    /// The VMM failed.
    Error(VmmError),
}

/// Exit statistics of one vCPU.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VcpuStats {
    /// vCPU index.
    pub index: u32,
    /// All exits to userspace.
    pub exits: u64,
    /// Port I/O exits.
    pub io_exits: u64,
    /// APF MSR exits.
    pub msr_exits: u64,
    /// `EINTR` returns (kicks, immediate exits).
    pub interrupted: u64,
    /// Kicks sent to this vCPU.
    pub kicks: u64,
}

struct Ctx<'a> {
    vcpu: &'a Vcpu,
    shared: &'a Shared,
    line: &'a mut LineBuffer,
}

impl ExitContext for Ctx<'_> {
    fn vcpu_index(&self) -> u32 {
        self.vcpu.index()
    }
    fn console(&mut self, bytes: &[u8]) {
        self.line.push(&self.shared.console, bytes);
    }
    fn msr_write(&mut self, index: u32, value: u64) -> Result<(), MsrRefused> {
        self.shared.apf.msr_write(self.vcpu, index, value)
    }
    fn msr_read(&mut self, index: u32) -> Result<u64, MsrRefused> {
        self.shared.apf.msr_read(self.vcpu, index)
    }
    fn rip(&mut self) -> Option<u64> {
        self.vcpu.rip()
    }
}

/// Runs vCPU `vcpu` until the VM stops or pauses. Must run on the thread that will own the
/// vCPU; hands the vCPU back (a paused one is saved by the caller).
pub fn run_vcpu(mut vcpu: Vcpu, shared: &Shared) -> (VcpuEnd, VcpuStats, Vcpu) {
    let index = vcpu.index();
    let span = tracing::info_span!("vcpu", index);
    let _entered = span.enter();
    let kicker = &shared.kickers[index as usize];
    // SAFETY: `vcpu` (and so its kvm_run mapping) lives until `target` is dropped, on this
    // thread, before the vCPU is handed back.
    let target = unsafe { KickTarget::register(kicker, vcpu.immediate_exit_ptr()) };
    let mut stats = VcpuStats {
        index,
        ..VcpuStats::default()
    };
    let mut line = LineBuffer::default();
    let end = run_loop(&mut vcpu, shared, &mut line, &mut stats);
    line.flush(&shared.console);
    stats.kicks = kicker.kicks();
    tracing::debug!(?end, "vCPU stopped");
    drop(target);
    (end, stats, vcpu)
}

fn run_loop(
    vcpu: &mut Vcpu,
    shared: &Shared,
    line: &mut LineBuffer,
    stats: &mut VcpuStats,
) -> VcpuEnd {
    let i = vcpu.index() as usize;
    // No instruction completion is pending before the first entry.
    let mut completion_pending = false;
    loop {
        if shared.pause.load(Ordering::SeqCst) {
            if completion_pending {
                // "KVM_RUN with immediate_exit set completes the pending operation (PIO/MMIO
                // read data, MSR reply) and returns EINTR": afterwards the state is whole.
                vcpu.set_immediate_exit(true);
                let r = vcpu.run();
                vcpu.set_immediate_exit(false);
                match r {
                    Ok(Exit::Interrupted) => {}
                    Ok(other) => {
                        return VcpuEnd::Error(VmmError::Config(format!(
                            "completing the last exit before a snapshot gave {other:?}"
                        )));
                    }
                    Err(e) => return VcpuEnd::Error(e),
                }
            }
            return VcpuEnd::Paused;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return VcpuEnd::Stopped;
        }
        if shared.apf.wants_window(i) {
            if completion_pending {
                // Let KVM finish the exiting instruction (a wrmsr may still raise #GP), then
                // come back with EINTR for the window.
                vcpu.set_immediate_exit(true);
            } else if let Err(e) = shared.apf.window(vcpu) {
                return VcpuEnd::Error(e);
            }
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => return VcpuEnd::Error(e),
        };
        stats.exits += 1;
        completion_pending = !matches!(exit, Exit::Interrupted);
        match &exit {
            Exit::Interrupted => {
                stats.interrupted += 1;
                vcpu.set_immediate_exit(false);
            }
            Exit::IoOut { .. } | Exit::IoIn { .. } => stats.io_exits += 1,
            Exit::RdMsr { .. } | Exit::WrMsr { .. } => stats.msr_exits += 1,
            _ => {}
        }
        let action = handle_exit(exit, &mut Ctx { vcpu, shared, line });
        match action {
            ExitAction::Resume(reply) => vcpu.write_reply(reply),
            ExitAction::Done(code) => return VcpuEnd::Done(code),
            ExitAction::Snapshot(tag) => {
                if shared.snapshot_on_request {
                    shared.request_pause(format!("guest request (port 0xf5, tag {tag})"));
                } else {
                    tracing::debug!(tag, "guest asked for a snapshot; none planned, resuming");
                }
            }
            ExitAction::Fatal(fault) => return VcpuEnd::Fatal(fault),
        }
    }
}
