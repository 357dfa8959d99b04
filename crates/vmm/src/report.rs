//! What a run produced: the guest's exit status and counters, the engine's counters, the
//! VMM's exit statistics. Printed as text at exit and written as JSON with `--json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use guest_abi::{
    COUNTERS_MAGIC, Counters, SCAN_FILL, TaskKind, TaskSpec, exit_status, expected_fill_checksum,
    task_state,
};

use crate::apf::EnableRecord;
use crate::config::{ApfMode, VmConfig};
use crate::vcpu_loop::{Shared, VcpuStats};

/// One task, as the guest reported it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TaskReport {
    /// Position in the workload.
    pub index: usize,
    /// `compute`, `scan`, `msr-selftest`.
    pub kind: String,
    /// vCPU that ran it.
    pub cpu: u32,
    /// `new`, `running`, `done`.
    pub state: String,
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
    /// The guest's counters (`apf_version`, `apf_vector`, `not_present`, `page_ready`,
    /// `wake_all`, `early_ready`, `idle_halts`, `timer_ticks`, `switches`).
    #[serde(flatten)]
    pub counters: guest_abi::CpuCounters,
}

impl std::ops::Deref for CpuReport {
    type Target = guest_abi::CpuCounters;

    fn deref(&self) -> &guest_abi::CpuCounters {
        &self.counters
    }
}

/// The engine's view.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineReport {
    /// APF MSR exits seen by the VMM (valid or not).
    pub msr_exits: u64,
    /// Valid `_EN` writes.
    pub en_writes: u64,
    /// Valid `_INT` writes.
    pub int_writes: u64,
    /// ACKs.
    pub acks: u64,
    /// #GP answers, by class.
    pub gp: BTreeMap<String, u64>,
    /// Faults reported to the engine.
    pub faults: u64,
    /// Not-present injected.
    pub injected: u64,
    /// Of those, on a page that already had a token in flight (another task, or another
    /// vCPU, faulted on it first): each got its own token.
    pub second_fault_same_page: u64,
    /// Synchronous fallbacks, by reason.
    pub fallback: BTreeMap<String, u64>,
    /// Page-ready delivered.
    pub page_ready_delivered: u64,
    /// Wake-alls queued.
    pub wake_all_queued: u64,
    /// Wake-alls delivered.
    pub wake_all_delivered: u64,
    /// Windows held, by reason.
    pub held: BTreeMap<String, u64>,
    /// Pages reported arrived to the engine (lazy restore).
    pub pages_arrived: u64,
    /// Tokens made ready by those arrivals.
    pub tokens_ready: u64,
    /// Outstanding tokens covered by a wake-all (dropped without an individual page ready:
    /// the wake-all woke their sleepers).
    pub tokens_covered_by_wake_all: u64,
    /// Outstanding tokens dropped by a disable, reset or restore.
    pub tokens_dropped_other: u64,
    /// Tokens outstanding at the end (not-present injected, page ready not handed out).
    pub outstanding_at_end: u64,
    /// Delivery windows opened by the VMM.
    pub windows: u64,
    /// Per vCPU at exit: APF version and area while active.
    pub active: Vec<Option<ActiveApf>>,
    /// Every valid `_EN` write, in order.
    pub enables: Vec<EnableRecord>,
}

/// APF active on a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ActiveApf {
    /// 1 or 2.
    pub version: u8,
    /// Area address.
    pub area_gpa: u64,
}

/// Everything about one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    /// The guest's exit status.
    pub exit_status: u32,
    /// `--apf`.
    pub apf: ApfMode,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM bytes.
    pub mem_size: u64,
    /// Wall time from the first entry to the exit, in microseconds.
    pub elapsed_us: u64,
    /// TSC kHz given to the guest.
    pub tsc_khz: u32,
    /// The guest published its counters page.
    pub guest_counters_valid: bool,
    /// Per task.
    pub tasks: Vec<TaskReport>,
    /// Per vCPU (guest kernel counters).
    pub cpus: Vec<CpuReport>,
    /// The engine.
    pub engine: EngineReport,
    /// Per vCPU (VMM exit statistics).
    pub vmm: Vec<VcpuStats>,
    /// Console output.
    pub console: String,
    /// After a restore: task and vCPU counters count from the restore (the VMM subtracts
    /// the values found in the snapshot's counters page).
    pub counters_since_restore: bool,
    /// Set when the run ended by taking a snapshot.
    pub snapshot: Option<SnapshotReport>,
    /// Set for `apfvm restore`.
    pub restore: Option<crate::restore::RestoreReport>,
    /// Set when the run measured a window (`RunOptions::window`).
    pub window: Option<WindowReport>,
}

/// A measured window from the start of the run (`apfvm demo` and `apfvm bench`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WindowReport {
    /// Its length, µs.
    pub window_us: u64,
    /// Compute iterations done by every compute task within the window (since the
    /// restore, for a restored guest).
    pub compute_work: u64,
    /// Every task's work within the window.
    pub task_work: Vec<u64>,
    /// When every scan task was done, µs from the start (polled every 0.5 ms); `None` if
    /// the run ended first.
    pub scans_done_us: Option<u64>,
    /// The guest exited before the window ended (the work is then the work at its exit).
    pub guest_ended_before_window: bool,
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

pub use crate::restore::RestoreReport;

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

fn kind_name(raw: u32) -> String {
    match TaskKind::from_raw(raw) {
        Some(TaskKind::Compute) => "compute".into(),
        Some(TaskKind::Scan) => "scan".into(),
        Some(TaskKind::MsrSelftest) => "msr-selftest".into(),
        Some(TaskKind::Hostile) => "hostile".into(),
        None => format!("kind{raw}"),
    }
}

fn state_name(raw: u32) -> String {
    match raw {
        task_state::NEW => "new".into(),
        task_state::RUNNING => "running".into(),
        task_state::DONE => "done".into(),
        _ => format!("state{raw}"),
    }
}

fn engine_report(shared: &Shared) -> EngineReport {
    let c = shared.apf.counters();
    let gp = BTreeMap::from([
        ("not_advertised".to_string(), c.gp.not_advertised),
        ("reserved_bits".to_string(), c.gp.reserved_bits),
        (
            "pf_vmexit_not_advertised".to_string(),
            c.gp.pf_vmexit_not_advertised,
        ),
        ("exception_vector".to_string(), c.gp.exception_vector),
        ("area_not_in_ram".to_string(), c.gp.area_not_in_ram),
    ]);
    EngineReport {
        msr_exits: shared.apf.msr_exits(),
        en_writes: c.en_writes,
        int_writes: c.int_writes,
        acks: c.acks,
        gp,
        faults: c.faults,
        injected: c.injected,
        second_fault_same_page: c.second_fault_same_page,
        fallback: c
            .fallback
            .iter()
            .map(|(r, n)| (format!("{r:?}"), n))
            .collect(),
        page_ready_delivered: c.page_ready_delivered,
        wake_all_queued: c.wake_all_queued,
        wake_all_delivered: c.wake_all_delivered,
        held: c.held.iter().map(|(r, n)| (format!("{r:?}"), n)).collect(),
        pages_arrived: c.pages_arrived,
        tokens_ready: c.tokens_ready,
        tokens_covered_by_wake_all: c.dropped.wake_all,
        tokens_dropped_other: c
            .dropped
            .disable
            .saturating_add(c.dropped.reset)
            .saturating_add(c.dropped.restore),
        outstanding_at_end: shared.apf.outstanding_total(),
        windows: shared.apf.windows(),
        active: shared
            .apf
            .active()
            .into_iter()
            .map(|a| a.map(|(version, area_gpa)| ActiveApf { version, area_gpa }))
            .collect(),
        enables: shared.apf.enables(),
    }
}

impl RunReport {
    /// Assembles the report after the vCPU threads are gone.
    #[allow(clippy::too_many_arguments, clippy::too_many_lines)]
    pub(crate) fn new(
        cfg: &VmConfig,
        exit_status: u32,
        elapsed: Duration,
        tsc_khz: u32,
        counters: &Counters,
        baseline: Option<&Counters>,
        shared: &Shared,
        stats: Vec<VcpuStats>,
    ) -> RunReport {
        let valid = counters.magic == COUNTERS_MAGIC;
        let zero = Counters {
            magic: 0,
            version: 0,
            task_count: 0,
            cpus: [guest_abi::CpuCounters::default(); guest_abi::MAX_CPUS],
            tasks: [guest_abi::TaskCounters::default(); guest_abi::MAX_TASKS],
        };
        let base = baseline.unwrap_or(&zero);
        let tasks = if valid {
            let n = (counters.task_count as usize).min(counters.tasks.len());
            counters.tasks[..n]
                .iter()
                .enumerate()
                .map(|(index, t)| (index, t, &base.tasks[index]))
                .map(|(index, t, b)| TaskReport {
                    index,
                    kind: kind_name(t.kind),
                    cpu: cfg.tasks.get(index).map_or(0, |s| s.cpu),
                    state: state_name(t.state),
                    exit_code: t.exit_code,
                    work: t.work.saturating_sub(b.work),
                    checksum: t.checksum,
                    checksum_ok: cfg
                        .tasks
                        .get(index)
                        .and_then(expected_checksum)
                        .map(|c| c == t.checksum),
                    apf_sleeps: t.apf_sleeps.saturating_sub(b.apf_sleeps),
                    ran_while_token_outstanding: t
                        .ran_while_token_outstanding
                        .saturating_sub(b.ran_while_token_outstanding),
                    run_us: if tsc_khz == 0 || t.done_tsc < t.start_tsc {
                        0
                    } else {
                        (t.done_tsc - t.start_tsc) * 1000 / u64::from(tsc_khz)
                    },
                })
                .collect()
        } else {
            Vec::new()
        };
        let cpus = if valid {
            counters.cpus[..(cfg.vcpus as usize).min(counters.cpus.len())]
                .iter()
                .enumerate()
                .map(|(index, c)| {
                    let b = &base.cpus[index];
                    CpuReport {
                        index,
                        counters: guest_abi::CpuCounters {
                            apf_version: c.apf_version,
                            apf_vector: c.apf_vector,
                            not_present: c.not_present.saturating_sub(b.not_present),
                            page_ready: c.page_ready.saturating_sub(b.page_ready),
                            wake_all: c.wake_all.saturating_sub(b.wake_all),
                            early_ready: c.early_ready.saturating_sub(b.early_ready),
                            idle_halts: c.idle_halts.saturating_sub(b.idle_halts),
                            timer_ticks: c.timer_ticks.saturating_sub(b.timer_ticks),
                            switches: c.switches.saturating_sub(b.switches),
                            ready_after_wake_all: c
                                .ready_after_wake_all
                                .saturating_sub(b.ready_after_wake_all),
                        },
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        RunReport {
            exit_status,
            apf: cfg.apf,
            vcpus: cfg.vcpus,
            mem_size: cfg.mem_size,
            elapsed_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            tsc_khz,
            guest_counters_valid: valid,
            tasks,
            cpus,
            engine: engine_report(shared),
            vmm: stats,
            console: shared.console.text(),
            counters_since_restore: baseline.is_some(),
            snapshot: None,
            restore: None,
            window: None,
        }
    }

    /// The human-readable summary printed at exit.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== apfvm: guest exit status {} ({}) after {:.3} ms (apf {:?}, {} vCPU, {} MiB)",
            self.exit_status,
            exit_status_name(self.exit_status),
            Duration::from_micros(self.elapsed_us).as_secs_f64() * 1000.0,
            self.apf,
            self.vcpus,
            self.mem_size >> 20
        );
        if !self.guest_counters_valid {
            let _ = writeln!(s, "   (the guest did not publish its counters page)");
        }
        if !self.tasks.is_empty() {
            let _ = writeln!(
                s,
                "   {:>4} {:<12} {:>3} {:<7} {:>4} {:>12} {:>18} {:>4} {:>6} {:>9} {:>10}",
                "task",
                "kind",
                "cpu",
                "state",
                "exit",
                "work",
                "checksum",
                "ok?",
                "sleeps",
                "ran-w/tok",
                "run-us"
            );
            for t in &self.tasks {
                let _ = writeln!(
                    s,
                    "   {:>4} {:<12} {:>3} {:<7} {:>4} {:>12} {:>#18x} {:>4} {:>6} {:>9} {:>10}",
                    t.index,
                    t.kind,
                    t.cpu,
                    t.state,
                    t.exit_code,
                    t.work,
                    t.checksum,
                    match t.checksum_ok {
                        Some(true) => "ok",
                        Some(false) => "BAD",
                        None => "-",
                    },
                    t.apf_sleeps,
                    t.ran_while_token_outstanding,
                    t.run_us
                );
            }
        }
        if !self.cpus.is_empty() {
            let _ = writeln!(
                s,
                "   {:>4} {:>3} {:>4} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8}",
                "vcpu",
                "apf",
                "vec",
                "not-pres",
                "ready",
                "wake-all",
                "early",
                "halts",
                "ticks",
                "switches"
            );
            for r in &self.cpus {
                let c = &r.counters;
                let _ = writeln!(
                    s,
                    "   {:>4} {:>3} {:>#4x} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8}",
                    r.index,
                    c.apf_version,
                    c.apf_vector,
                    c.not_present,
                    c.page_ready,
                    c.wake_all,
                    c.early_ready,
                    c.idle_halts,
                    c.timer_ticks,
                    c.switches
                );
            }
        }
        self.write_engine_and_vmm(&mut s);
        if let Some(snap) = &self.snapshot {
            let _ = writeln!(
                s,
                "   snapshot: {} ({} MiB of memory, trigger: {}, written in {:.1} ms)",
                snap.dir,
                snap.memory_bytes >> 20,
                snap.trigger,
                Duration::from_micros(snap.write_us).as_secs_f64() * 1000.0
            );
        }
        if let Some(r) = &self.restore {
            s.push_str(&r.summary());
        }
        s
    }

    fn write_engine_and_vmm(&self, s: &mut String) {
        let e = &self.engine;
        let gp: u64 = e.gp.values().sum();
        let _ = writeln!(
            *s,
            "   engine: msr exits {} (en {}, int {}, ack {}, #GP {}), faults {}, injected {}, page-ready {}, wake-all {}/{} delivered, tokens covered by wake-all {}, windows {}",
            e.msr_exits,
            e.en_writes,
            e.int_writes,
            e.acks,
            gp,
            e.faults,
            e.injected,
            e.page_ready_delivered,
            e.wake_all_delivered,
            e.wake_all_queued,
            e.tokens_covered_by_wake_all,
            e.windows
        );
        let fallbacks: Vec<String> = e
            .fallback
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if !fallbacks.is_empty() {
            let _ = writeln!(
                *s,
                "   engine: synchronous fallbacks by reason: {}",
                fallbacks.join(", ")
            );
        }
        for (i, a) in e.active.iter().enumerate() {
            if let Some(a) = a {
                let _ = writeln!(
                    s,
                    "   engine: vCPU {i}: APF v{} active, area {:#x}",
                    a.version, a.area_gpa
                );
            }
        }
        for v in &self.vmm {
            let _ = writeln!(
                s,
                "   vmm: vCPU {}: {} exits ({} io, {} msr, {} eintr), {} kicks",
                v.index, v.exits, v.io_exits, v.msr_exits, v.interrupted, v.kicks
            );
        }
    }
}
