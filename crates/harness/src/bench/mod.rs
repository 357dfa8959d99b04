//! What `apfvm demo` and `apfvm bench` share: the guest, the snapshots (one per guest
//! protocol, in a temporary directory), one restore per point with a measured window, the
//! checks every run must pass, and the medians over repeats.
//!
//! The workload, per vCPU: one scan task over its own cold region (the memory a lazy
//! restore serves on demand) and `tasks_per_vcpu - 1` compute tasks. The snapshot is taken
//! right after the scans' fill pass; the restored guest re-reads every scanned page (its
//! checksum is checked) while the compute tasks count loop iterations.
//!
//! The measure: **compute work** = loop iterations of every compute task in the first
//! `window` after the restore ([`WindowObserver`] reads the guest's counters page at the
//! window's end; `guest_abi::COMPUTE_HOLD_GPA` keeps the compute tasks running at least that
//! long), and **scan time** = when every scan task is done (counters polled every 0.5 ms).
//!
//! ```text
//! Plan + Variants ─► execute: Snapshots::get (boot, snapshot) ─► run_point (restore + WindowObserver) ─► Sample
//!                          └► rows: Row::new (medians) ─► set_ratios ─► consistency, table, Results (JSON), plot
//! ```
//!
//! - [`mode`]: restore modes, memory sources and prefetch policies.
//! - [`setup`]: the guest's shape; [`snapshots`]: its snapshots.
//! - [`window`]: the measurement window; [`point`]: one measured restore.
//! - [`row`]: medians and ratios; [`plan`]: what to measure; [`execute`](mod@execute): measuring it.
//! - [`consistency`](mod@consistency): what every row must show; [`table`], [`json`],
//!   [`plot`](mod@plot): the outputs; [`sweep`]: the bench command.

pub mod consistency;
pub mod execute;
pub mod json;
pub mod mode;
pub mod plan;
pub mod plot;
pub mod point;
pub mod row;
pub mod setup;
pub mod snapshots;
pub mod sweep;
pub mod table;
pub mod window;

pub use consistency::consistency;
pub use execute::{Progress, execute};
pub use json::{MemoryRows, Results};
pub use mode::{Memory, Mode, PREFETCH_ALL, PREFETCH_NAMES, Source};
pub use plan::{Plan, Variants};
pub use point::{Point, Sample, run_point};
pub use row::Row;
pub use setup::{CONCURRENT_TASKS, MEM_SIZE, SCAN_PER_TASK, Setup, Shape, WINDOW};
pub use snapshots::Snapshots;
pub use sweep::{BenchOptions, BenchOutcome, bench};
pub use window::{WindowObserver, WindowReport};

use crate::error::Result;
use crate::interrupt;

/// Runs `f` over a fresh set of snapshots with SIGINT/SIGTERM caught; the snapshots' temporary
/// directory (and any `qemu-nbd` serving from it) is removed when it returns, on success, on
/// error and after an interrupt.
pub fn with_snapshots<T>(f: impl FnOnce(&mut Snapshots) -> Result<T>) -> Result<T> {
    interrupt::catch()?;
    let mut snapshots = Snapshots::new()?;
    f(&mut snapshots)
}
