//! The body of a vCPU thread: let the APF driver act, run, convert the exit, [`handle_exit`],
//! carry out the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use pager::{FaultEvent, PagerError, PagerObserver};

use crate::apf::ApfService;
use crate::console::{Console, LineBuffer};
use crate::error::VmmError;
use crate::exit::{Exit, ExitAction, ExitContext, GuestFault, MsrRefused, handle_exit};
use crate::kick::{KickTarget, Kicker};
use crate::kvm::vcpu::Vcpu;
use crate::report::VcpuStats;
use crate::working_set::{Recorder, Replay};

/// What every vCPU thread shares.
#[derive(Debug)]
pub struct Shared {
    /// Set when the VM must stop (a vCPU reported an exit status or died, a timeout, a
    /// failure of lazily served memory).
    stop: AtomicBool,
    /// Set when the VM must pause for a snapshot: every vCPU completes its pending
    /// instruction and leaves its loop with [`VcpuEnd::Paused`].
    pause: AtomicBool,
    /// Honour the guest's "snapshot me" requests (port 0xf5) by pausing.
    snapshot_on_request: bool,
    /// What asked for the pause (the first request wins).
    pause_trigger: Mutex<Option<String>>,
    /// A failure outside the vCPU threads (the pager) that stopped the VM.
    failure: Mutex<Option<VmmError>>,
    /// One kicker per vCPU.
    pub kickers: Vec<Kicker>,
    /// The APF driver.
    pub apf: ApfService,
    /// The guest console.
    pub console: Console,
    /// Records the working set (`--record-working-set`).
    pub recorder: Option<Arc<Recorder>>,
    /// Counts a working set's hits and misses.
    pub replay: Option<Arc<Replay>>,
}

impl Shared {
    /// Shared state for `kickers.len()` vCPUs.
    pub fn new(
        kickers: Vec<Kicker>,
        apf: ApfService,
        console: Console,
        snapshot_on_request: bool,
    ) -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            snapshot_on_request,
            pause_trigger: Mutex::new(None),
            failure: Mutex::new(None),
            kickers,
            apf,
            console,
            recorder: None,
            replay: None,
        }
    }

    /// Stops the VM because of a failure outside the vCPU threads (the first one is kept).
    pub fn fail(&self, error: VmmError) {
        tracing::error!(%error, "stopping the VM");
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(error);
        self.stop_all();
    }

    /// The failure that stopped the VM, if any.
    pub fn take_failure(&self) -> Option<VmmError> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Pauses every vCPU for a snapshot; `trigger` says why (kept if first).
    pub fn request_pause(&self, trigger: String) {
        {
            let mut t = self
                .pause_trigger
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if t.is_none() {
                tracing::info!(%trigger, "pausing every vCPU for a snapshot");
                *t = Some(trigger);
            }
        }
        self.apf.freeze();
        self.pause.store(true, Ordering::SeqCst);
        for k in &self.kickers {
            k.kick();
        }
    }

    /// What asked for the pause.
    pub fn pause_trigger(&self) -> Option<String> {
        self.pause_trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops every vCPU: sets the flag and kicks them all.
    pub fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for k in &self.kickers {
            k.kick();
        }
    }
}

/// The pager reports to what the vCPU threads share: faults and arrivals to the APF driver,
/// its failures to the run (which stops).
impl PagerObserver for Shared {
    fn on_fault(&self, e: &FaultEvent) {
        if let Some(r) = &self.replay {
            r.on_fault(e.gpa, e.duplicate);
        }
        if let Some(v) = self
            .recorder
            .as_ref()
            .and_then(|r| r.on_fault(e.thread_id, e.gpa, e.at, e.duplicate))
        {
            // Out of KVM_RUN while it waits for the page: its CPL is the access's.
            self.kickers[v].kick();
        }
        self.apf
            .fault_reported(e.thread_id, e.gpa, e.at, e.duplicate);
    }

    fn on_page_ready(&self, gpa: u64, at: Instant) {
        if let Some(r) = &self.recorder {
            r.on_page_ready(gpa);
        }
        self.apf.page_mapped(gpa, at);
    }

    fn on_error(&self, error: PagerError) {
        // The pager's errors name the guest page (and the chunk, for a checksum mismatch).
        self.fail(VmmError::Pager(error));
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
    let tid = u32::try_from(kicker.tid()).unwrap_or(0);
    shared.apf.vcpu_thread(index as usize, tid);
    if let Some(r) = &shared.recorder {
        r.vcpu_started(index as usize, tid, vcpu.cpl().unwrap_or(0));
    }
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

/// Completes the instruction of the last exit (`KVM_RUN` with `immediate_exit` set
/// completes the pending PIO/MMIO/MSR operation and returns `EINTR`), so that the vCPU's
/// state is whole before a snapshot reads it.
fn complete_pending(vcpu: &mut Vcpu) -> Result<(), VmmError> {
    if !vcpu.completion_pending() {
        return Ok(());
    }
    vcpu.set_immediate_exit(true);
    let r = vcpu.run();
    vcpu.set_immediate_exit(false);
    match r? {
        Exit::Interrupted => Ok(()),
        other => Err(VmmError::Pause(format!(
            "completing vCPU {}'s last exit gave {other:?}",
            vcpu.index()
        ))),
    }
}

fn run_loop(
    vcpu: &mut Vcpu,
    shared: &Shared,
    line: &mut LineBuffer,
    stats: &mut VcpuStats,
) -> VcpuEnd {
    loop {
        if shared.pause.load(Ordering::SeqCst) {
            return match complete_pending(vcpu) {
                Ok(()) => VcpuEnd::Paused,
                Err(e) => VcpuEnd::Error(e),
            };
        }
        if shared.stop.load(Ordering::SeqCst) {
            return VcpuEnd::Stopped;
        }
        if shared.apf.wants_entry(vcpu.index() as usize) {
            match shared.apf.entry(vcpu) {
                // The exit's instruction completes first, then KVM returns at once.
                Ok(true) => vcpu.set_immediate_exit(true),
                Ok(false) => {}
                Err(e) => return VcpuEnd::Error(e),
            }
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => return VcpuEnd::Error(e),
        };
        stats.exits += 1;
        if let Some(r) = &shared.recorder
            && r.wants_cpl(vcpu.index() as usize)
        {
            r.exit_at(vcpu.index() as usize, vcpu.cpl().unwrap_or(0));
        }
        match &exit {
            Exit::Interrupted => {
                stats.interrupted += 1;
                vcpu.set_immediate_exit(false);
            }
            Exit::IoOut { .. } | Exit::IoIn { .. } => stats.io_exits += 1,
            Exit::RdMsr { .. } | Exit::WrMsr { .. } => stats.msr_exits += 1,
            _ => {}
        }
        match handle_exit(exit, &mut Ctx { vcpu, shared, line }) {
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
