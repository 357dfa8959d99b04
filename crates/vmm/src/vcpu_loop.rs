//! The body of a vCPU thread: run, convert the exit, [`handle_exit`], carry out the action.

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
}

impl Shared {
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
    /// Stopped because another vCPU ended the VM.
    Stopped,
    /// The guest died on this vCPU.
    Fatal(GuestFault),
    /// The VMM failed.
    Error(VmmError),
}

/// Exit statistics of one vCPU.
#[derive(Debug, Default, serde::Serialize)]
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

/// Runs vCPU `vcpu` until the VM stops. Must run on the thread that will own the vCPU.
pub fn run_vcpu(mut vcpu: Vcpu, shared: &Shared) -> (VcpuEnd, VcpuStats) {
    let index = vcpu.index();
    let span = tracing::info_span!("vcpu", index);
    let _entered = span.enter();
    let kicker = &shared.kickers[index as usize];
    // SAFETY: `vcpu` (and so its kvm_run mapping) lives until the end of this function,
    // after `_target` is dropped; `_target` is dropped on this thread.
    let _target = unsafe { KickTarget::register(kicker, vcpu.immediate_exit_ptr()) };
    let mut stats = VcpuStats {
        index,
        ..VcpuStats::default()
    };
    let mut line = LineBuffer::default();
    let end = run_loop(&mut vcpu, shared, &mut line, &mut stats);
    line.flush(&shared.console);
    stats.kicks = kicker.kicks();
    tracing::debug!(?end, "vCPU stopped");
    (end, stats)
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
                tracing::warn!(
                    tag,
                    "snapshot requested; snapshots are not implemented yet, resuming"
                );
            }
            ExitAction::Fatal(fault) => return VcpuEnd::Fatal(fault),
        }
    }
}
