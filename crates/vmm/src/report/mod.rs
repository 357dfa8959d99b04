//! What a run produced: the guest's exit status and counters, the APF driver's and engine's
//! counters, the VMM's exit statistics, the lazy memory's pager statistics. Sources are
//! serialized as they are; the text summary is `RunReport::summary`.

mod text;

use std::time::Duration;

use guest_abi::{
    COUNTERS_MAGIC, Counters, SCAN_FILL, TaskKind, TaskSpec, exit_status, expected_fill_checksum,
    task_state,
};

use crate::apf::ApfReport;
use crate::config::{ApfMode, ApfPath, VmConfig};
use crate::lazy::LazyReport;

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    /// Not started.
    New,
    /// Runnable or running.
    Running,
    /// Finished; its exit code is valid.
    Done,
    /// A value the guest should never write.
    Unknown(u32),
}

impl TaskState {
    fn of(raw: u32) -> TaskState {
        match raw {
            task_state::NEW => TaskState::New,
            task_state::RUNNING => TaskState::Running,
            task_state::DONE => TaskState::Done,
            other => TaskState::Unknown(other),
        }
    }
}

/// One task, as the guest reported it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TaskReport {
    /// Position in the workload.
    pub index: usize,
    /// What it does (`None`: a kind the guest should never report).
    pub kind: Option<TaskKind>,
    /// vCPU that ran it.
    pub cpu: u32,
    /// Where it is.
    pub state: TaskState,
    /// Exit code (valid when done).
    pub exit_code: u32,
    /// Iterations (compute) or pages (scan).
    pub work: u64,
    /// Scan checksum.
    pub checksum: u64,
    /// For a fill scan: whether `checksum` is the one the fill pattern gives
    /// (`guest_abi::expected_fill_checksum` over the task's region), computed on the host.
    pub checksum_ok: Option<bool>,
    /// Times it slept on an APF token.
    pub apf_sleeps: u64,
    /// Times it ran while another task slept on a not-present token.
    pub ran_while_token_outstanding: u64,
    /// Run time (first run → done) in microseconds, from the guest's TSC.
    pub run_us: u64,
}

/// One vCPU's kernel counters, as the guest reported them (after a restore: since it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CpuReport {
    /// vCPU index.
    pub index: usize,
    /// The guest's counters.
    #[serde(flatten)]
    pub counters: guest_abi::CpuCounters,
}

impl std::ops::Deref for CpuReport {
    type Target = guest_abi::CpuCounters;

    fn deref(&self) -> &guest_abi::CpuCounters {
        &self.counters
    }
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

/// A snapshot taken by this run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotReport {
    /// Where it is.
    pub dir: String,
    /// What asked for it.
    pub trigger: String,
    /// Bytes of guest memory written.
    pub memory_bytes: u64,
    /// Time to write it (state, memory, fsyncs), µs.
    pub write_us: u64,
}

/// Eager or lazy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Every page resident before the first instruction.
    Eager,
    /// Pages served on demand.
    Lazy,
}

/// What `apfvm restore` adds to the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RestoreReport {
    /// The snapshot.
    pub dir: String,
    /// Eager or lazy.
    pub mode: RestoreMode,
    /// Who turned missing pages into APFs.
    pub apf_path: ApfPath,
    /// Time to create the VM and load eager memory and state (to the first guest
    /// instruction), µs.
    pub setup_us: u64,
    /// Bytes loaded before the first instruction.
    pub eager_bytes: u64,
    /// Where guest memory came from.
    pub source: String,
}

/// Everything about one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    /// The guest's exit status.
    pub exit_status: u32,
    /// The APF protocol offered to the guest (CPUID).
    pub protocol: ApfMode,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM bytes.
    pub mem_size: u64,
    /// Wall time from the first entry to the end, µs.
    pub elapsed_us: u64,
    /// TSC kHz given to the guest.
    pub tsc_khz: u32,
    /// The guest published its counters page.
    pub guest_counters_valid: bool,
    /// After a restore: task and vCPU counters count from the restore (the VMM subtracts
    /// the values found in the counters page before the first entry).
    pub counters_since_restore: bool,
    /// Per task.
    pub tasks: Vec<TaskReport>,
    /// Per vCPU (guest kernel counters).
    pub cpus: Vec<CpuReport>,
    /// The APF driver and engine.
    pub apf: ApfReport,
    /// Per vCPU (VMM exit statistics).
    pub vmm: Vec<VcpuStats>,
    /// Lazily served memory (lazy restores).
    pub lazy: Option<LazyReport>,
    /// Console output.
    pub console: String,
    /// Set when the run ended by taking a snapshot.
    pub snapshot: Option<SnapshotReport>,
    /// Set for `apfvm restore`.
    pub restore: Option<RestoreReport>,
    /// A lazy restore's working set: replayed, recorded, ignored, off.
    pub working_set: Option<crate::working_set::WorkingSetReport>,
}

/// The checksum a completed fill scan must report.
fn expected_checksum(spec: &TaskSpec) -> Option<u64> {
    (spec.kind == TaskKind::Scan as u32 && spec.flags & SCAN_FILL != 0)
        .then(|| expected_fill_checksum(spec.arg0, spec.arg1))
}

/// The guest's exit status in words (guest_abi::exit_status).
pub fn exit_status_name(status: u32) -> &'static str {
    match status {
        exit_status::OK => "ok",
        exit_status::TASK_FAILED => "a task failed",
        exit_status::BAD_BOOT_INFO => "bad boot info",
        exit_status::FATAL_EXCEPTION => "fatal exception in the guest",
        exit_status::PAGE_FAULT => "genuine page fault in the guest",
        exit_status::KERNEL_PANIC => "guest kernel panic",
        _ => "unknown",
    }
}

/// The guest's own view at the end of a run: tasks and vCPUs, counted since `baseline`.
pub(crate) fn guest_view(
    cfg: &VmConfig,
    counters: &Counters,
    baseline: Option<&Counters>,
    tsc_khz: u32,
) -> (Vec<TaskReport>, Vec<CpuReport>) {
    if counters.magic != COUNTERS_MAGIC {
        return (Vec::new(), Vec::new());
    }
    let zero_task = guest_abi::TaskCounters::default();
    let zero_cpu = guest_abi::CpuCounters::default();
    let n = (counters.task_count as usize).min(counters.tasks.len());
    let tasks = counters.tasks[..n]
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let b = baseline.map_or(&zero_task, |b| &b.tasks[index]);
            let spec = cfg.tasks.get(index);
            TaskReport {
                index,
                kind: TaskKind::from_raw(t.kind),
                cpu: spec.map_or(0, |s| s.cpu),
                state: TaskState::of(t.state),
                exit_code: t.exit_code,
                work: t.work.saturating_sub(b.work),
                checksum: t.checksum,
                checksum_ok: spec.and_then(expected_checksum).map(|c| c == t.checksum),
                apf_sleeps: t.apf_sleeps.saturating_sub(b.apf_sleeps),
                ran_while_token_outstanding: t
                    .ran_while_token_outstanding
                    .saturating_sub(b.ran_while_token_outstanding),
                run_us: if tsc_khz == 0 || t.done_tsc < t.start_tsc {
                    0
                } else {
                    (t.done_tsc - t.start_tsc).saturating_mul(1000) / u64::from(tsc_khz)
                },
            }
        })
        .collect();
    let cpus = counters.cpus[..(cfg.vcpus as usize).min(counters.cpus.len())]
        .iter()
        .enumerate()
        .map(|(index, c)| CpuReport {
            index,
            counters: c.since(baseline.map_or(&zero_cpu, |b| &b.cpus[index])),
        })
        .collect();
    (tasks, cpus)
}

impl RunReport {
    /// Wall time of the run.
    pub fn elapsed(&self) -> Duration {
        Duration::from_micros(self.elapsed_us)
    }
}
