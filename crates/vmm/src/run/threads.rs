//! One thread per vCPU, and the main thread that waits for them: the first vCPU to end
//! (exit status, death) stops the others, and so does the deadline; a pause (guest request,
//! `--at`, SIGUSR1) ends every thread with its vCPU handed back whole.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::observer::RunObserver;
use super::vcpu_loop::{Shared, VcpuEnd, run_vcpu};
use crate::error::{Result, VmmError};
use crate::exit::GuestFault;
use crate::kvm::vcpu::Vcpu;
use crate::memory::GuestRam;
use crate::report::VcpuStats;

/// How the vCPU threads ended, together.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The guest's exit status (the first vCPU to report one).
    pub exit_code: Option<u32>,
    /// The guest died.
    pub fault: Option<GuestFault>,
    /// The VMM failed on a vCPU thread.
    pub error: Option<VmmError>,
    /// The deadline passed.
    pub timed_out: bool,
    /// The interrupt flag was raised.
    pub interrupted: bool,
    /// vCPU threads that did not stop within [`STOP_GRACE`] of the deadline (abandoned:
    /// they hold what they use alive, and end with the process).
    pub stuck: Vec<u32>,
    /// Every vCPU paused for a snapshot (none stopped or died meanwhile).
    pub paused: bool,
    /// Per vCPU, in index order.
    pub stats: Vec<VcpuStats>,
    /// The vCPUs, in index order.
    pub vcpus: Vec<Vcpu>,
}

impl Outcome {
    /// Takes in how one vCPU thread ended (the first exit status, fault or error is kept).
    fn record(&mut self, end: VcpuEnd, stats: VcpuStats, vcpu: Vcpu) {
        self.stats.push(stats);
        self.vcpus.push(vcpu);
        match end {
            VcpuEnd::Done(code) => {
                self.exit_code.get_or_insert(code);
            }
            VcpuEnd::Paused => self.paused = true,
            VcpuEnd::Stopped => {}
            VcpuEnd::Fatal(f) => {
                self.fault.get_or_insert(f);
            }
            VcpuEnd::Error(e) => {
                self.error.get_or_insert(e);
            }
        }
    }
}

/// When the main thread must act besides collecting the vCPUs.
#[derive(Debug)]
pub struct Watch<'a> {
    /// Stop everything at this instant.
    pub deadline: Option<Instant>,
    /// Pause for a snapshot at this instant (`--at`).
    pub pause_at: Option<Instant>,
    /// Pause for a snapshot when this flag is raised (SIGUSR1).
    pub pause_flag: Option<&'a AtomicBool>,
    /// Stop everything when this flag is raised (SIGINT, SIGTERM).
    pub interrupt: Option<&'a AtomicBool>,
}

/// How often the pause flag is looked at.
const FLAG_POLL: Duration = Duration::from_millis(20);

/// How long the vCPU threads get to stop once the deadline has passed.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// What a vCPU thread hands back when it ends.
type Ended = (VcpuEnd, VcpuStats, Vcpu);

/// Starts a thread per vCPU; each sends what it ended with. The first to end for another
/// reason than a pause stops the VM.
fn spawn_all(vcpus: Vec<Vcpu>, shared: &Arc<Shared>) -> Result<mpsc::Receiver<Ended>> {
    let (tx, rx) = mpsc::channel();
    for vcpu in vcpus {
        let tx = tx.clone();
        let mine = Arc::clone(shared);
        std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index()))
            .spawn(move || {
                let (end, st, vcpu) = run_vcpu(vcpu, &mine);
                if !matches!(end, VcpuEnd::Paused) {
                    mine.stop_all();
                }
                let _ = tx.send((end, st, vcpu));
            })
            .map_err(|err| {
                shared.stop_all();
                VmmError::Os {
                    what: "spawn a vCPU thread",
                    err,
                }
            })?;
    }
    Ok(rx)
}

/// Runs one thread per vCPU until all have ended.
pub fn run_threads(
    vcpus: Vec<Vcpu>,
    shared: &Arc<Shared>,
    watch: &Watch<'_>,
    observer: &mut dyn RunObserver,
    ram: &GuestRam,
    start: Instant,
) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut running: Vec<u32> = vcpus.iter().map(Vcpu::index).collect();
    let rx = spawn_all(vcpus, shared)?;
    let mut pause_at = watch.pause_at;
    let mut next_poll = Some(start);
    let mut deadline = watch.deadline;
    while !running.is_empty() {
        let now = Instant::now();
        if pause_at.is_some_and(|at| now >= at) {
            shared.request_pause("--at".into());
            pause_at = None;
        }
        if watch
            .pause_flag
            .is_some_and(|f| f.swap(false, Ordering::SeqCst))
        {
            shared.request_pause("SIGUSR1".into());
        }
        if !out.interrupted && watch.interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) {
            out.interrupted = true;
            shared.stop_all();
            pause_at = None;
            // The vCPUs get the same grace to stop as after a timeout.
            deadline = Some(now + STOP_GRACE);
        }
        if next_poll.is_some_and(|t| now >= t) {
            next_poll = observer
                .poll(ram, now.saturating_duration_since(start))
                .map(|d| now + d);
        }
        let wake = [
            deadline,
            pause_at,
            next_poll,
            watch
                .pause_flag
                .or(watch.interrupt)
                .map(|_| now + FLAG_POLL),
        ]
        .into_iter()
        .flatten()
        .min();
        let next = match wake {
            Some(t) => rx.recv_timeout(t.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((end, st, vcpu)) => {
                running.retain(|&i| i != vcpu.index());
                out.record(end, st, vcpu);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    if out.timed_out || out.interrupted {
                        // Past the grace period too: these threads are stuck.
                        out.stuck = std::mem::take(&mut running);
                        tracing::error!(stuck = ?out.stuck, "vCPU threads did not stop; abandoned");
                        break;
                    }
                    out.timed_out = true;
                    shared.stop_all();
                    deadline = Some(Instant::now() + STOP_GRACE);
                    pause_at = None;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // A pause only counts when every vCPU paused (none stopped or died meanwhile).
    if out.paused && (out.exit_code.is_some() || out.fault.is_some() || out.error.is_some()) {
        out.paused = false;
    }
    out.stats.sort_by_key(|s| s.index);
    out.vcpus.sort_by_key(Vcpu::index);
    Ok(out)
}
