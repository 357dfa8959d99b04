//! The measurement window, watched from outside the guest while it runs: compute tasks are
//! held running (`guest_abi::COMPUTE_HOLD_GPA`) until the window ends, their work is read
//! from the guest's counters page at its end, and the moment every scan task is done is
//! polled every [`POLL`].

use std::time::Duration;

use guest_abi::{
    BOOT_INFO_GPA, BootInfo, COMPUTE_HOLD_GPA, COUNTERS_GPA, COUNTERS_MAGIC, Counters, TaskKind,
    task_state,
};
use vmm::RunObserver;
use vmm::memory::GuestRam;

/// How often the counters page is read.
pub const POLL: Duration = Duration::from_micros(500);

/// What the window measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WindowReport {
    /// The window.
    pub window: Duration,
    /// Iterations of every compute task in the window (since the start: a restored guest's
    /// counters are counted from the restore).
    pub compute_work: u64,
    /// Each task's work in the window, in task order.
    pub task_work: Vec<u64>,
    /// When every scan task was seen done (`None`: not before the guest exited).
    pub scans_done: Option<Duration>,
    /// The guest exited before the window ended (then `compute_work` is its work at the
    /// exit).
    pub guest_ended_before_window: bool,
}

/// A [`RunObserver`] measuring a window of a given length from the start of the run.
#[derive(Debug)]
pub struct WindowObserver {
    window: Duration,
    compute: Vec<usize>,
    scans: Vec<usize>,
    tasks: usize,
    baseline: Vec<u64>,
    at_window: Option<Vec<u64>>,
    scans_done: Option<Duration>,
    elapsed: Option<Duration>,
}

impl WindowObserver {
    /// A window of `window` from the start of the run.
    pub fn new(window: Duration) -> WindowObserver {
        WindowObserver {
            window,
            compute: Vec::new(),
            scans: Vec::new(),
            tasks: 0,
            baseline: Vec::new(),
            at_window: None,
            scans_done: None,
            elapsed: None,
        }
    }

    fn done(&self) -> bool {
        self.at_window.is_some() && self.scans_done.is_some()
    }

    /// Reads the counters; records the window's end and the scans' completion when due.
    fn sample(&mut self, ram: &GuestRam, elapsed: Duration) {
        if self.done() {
            return;
        }
        let Ok(c) = ram.read_obj::<Counters>(COUNTERS_GPA) else {
            return;
        };
        if self.scans_done.is_none()
            && self
                .scans
                .iter()
                .all(|&i| c.tasks[i].state == task_state::DONE)
        {
            self.scans_done = Some(elapsed);
        }
        if self.at_window.is_none() && elapsed >= self.window {
            self.at_window = Some(c.tasks.iter().map(|t| t.work).collect());
            // Let the compute tasks end once the other tasks are done.
            let _ = ram.write_u64(COMPUTE_HOLD_GPA, 0);
        }
    }

    /// What was measured (after the run).
    pub fn report(&self) -> WindowReport {
        let work: Vec<u64> = self
            .at_window
            .iter()
            .flatten()
            .zip(self.baseline.iter().chain(std::iter::repeat(&0)))
            .map(|(w, b)| w.saturating_sub(*b))
            .take(self.tasks)
            .collect();
        let elapsed = self.elapsed.unwrap_or(Duration::MAX);
        WindowReport {
            window: self.window,
            compute_work: self
                .compute
                .iter()
                .map(|&i| work.get(i).copied().unwrap_or(0))
                .sum(),
            task_work: work,
            scans_done: self.scans_done.map(|d| d.min(elapsed)),
            guest_ended_before_window: self.elapsed.is_some_and(|e| e < self.window),
        }
    }
}

impl RunObserver for WindowObserver {
    fn start(&mut self, ram: &GuestRam) -> vmm::Result<()> {
        let boot: BootInfo = ram.read_obj(BOOT_INFO_GPA)?;
        let specs = &boot.tasks[..(boot.task_count as usize).min(boot.tasks.len())];
        let of = |k: TaskKind| -> Vec<usize> {
            specs
                .iter()
                .enumerate()
                .filter(|(_, t)| t.kind == k as u32)
                .map(|(i, _)| i)
                .collect()
        };
        self.compute = of(TaskKind::Compute);
        self.scans = of(TaskKind::Scan);
        self.tasks = specs.len();
        // A restored guest's counters count from here.
        let found: Counters = ram.read_obj(COUNTERS_GPA)?;
        self.baseline = if found.magic == COUNTERS_MAGIC {
            found.tasks.iter().map(|t| t.work).collect()
        } else {
            Vec::new()
        };
        Ok(ram.write_u64(COMPUTE_HOLD_GPA, 1)?)
    }

    fn poll(&mut self, ram: &GuestRam, elapsed: Duration) -> Option<Duration> {
        self.sample(ram, elapsed);
        (!self.done()).then_some(POLL)
    }

    fn finish(&mut self, ram: &GuestRam, elapsed: Duration) {
        self.elapsed = Some(elapsed);
        // A last look: the scans may have finished (and the guest exited) between two polls;
        // their time is then the exit's (at most one poll period late). A guest that ended
        // before the window gets its work at the exit.
        self.sample(ram, elapsed.max(self.window));
    }
}
