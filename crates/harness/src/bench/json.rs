//! The JSON results of a demo or a bench: metadata (command, date, machine, plan) and one
//! element per row in `runs`.

use super::mode::{Memory, Mode};
use super::plan::{Plan, Variants};
use super::row::Row;
use super::setup::Setup;
use crate::host::{Host, utc_now};

/// What the workload is, in the JSON's words.
const WORKLOAD: &str = "shape mixed, per vCPU: 1 scan over cold memory + tasks_per_vcpu - 1 compute tasks; shape concurrent: every task scans its own cold memory. Snapshot taken after the scans' fill pass, the restored guest re-reads it, checksums verified; compute_work = the compute tasks' loop iterations in the window; scan_ms = restore -> every scan done";

/// How the bench's memory rows were measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryRows {
    /// The plain rows' memory.
    pub plain_rows: &'static str,
    /// The other memories.
    pub other_rows: Vec<Memory>,
    /// At these fetch latencies.
    pub other_rows_at_latency_us: Vec<u64>,
    /// For these modes.
    pub other_rows_modes: Vec<Mode>,
    /// How NBD is served.
    pub nbd: &'static str,
    /// Why the NBD rows were left out (`None`: they were not).
    pub nbd_skipped: Option<String>,
}

impl MemoryRows {
    /// The memory rows of `variants`.
    pub fn new(variants: &Variants, nbd_skipped: Option<String>) -> MemoryRows {
        MemoryRows {
            plain_rows: "source file, prefetch none",
            other_rows: variants.memories.clone(),
            other_rows_at_latency_us: variants
                .latencies
                .iter()
                .map(|l| u64::try_from(l.as_micros()).unwrap_or(u64::MAX))
                .collect(),
            other_rows_modes: variants.modes.clone(),
            nbd: "qemu-nbd --read-only --persistent --shared=8 --format=raw on a unix socket in the temporary directory, one per snapshot",
            nbd_skipped,
        }
    }
}

/// A demo's or a bench's results, as written to `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Results {
    /// `demo`, or the bench's command line.
    pub command: String,
    /// When it ended (UTC).
    pub date: String,
    /// Where it ran.
    pub machine: Host,
    /// apfvm's version.
    pub version: &'static str,
    /// The measured window, ms.
    pub window_ms: u64,
    /// Repeats of every point.
    pub repeats: usize,
    /// The guests.
    pub setups: Vec<Setup>,
    /// What they run.
    pub workload: &'static str,
    /// The bench's memory rows (`None` for the demo).
    pub memory: Option<MemoryRows>,
    /// One element per row.
    pub runs: Vec<Row>,
}

impl Results {
    /// The results of `plan`, measured as `rows`.
    pub fn new(
        command: impl Into<String>,
        plan: &Plan,
        rows: Vec<Row>,
        memory: Option<MemoryRows>,
    ) -> Results {
        Results {
            command: command.into(),
            date: utc_now(),
            machine: Host::this(),
            version: env!("CARGO_PKG_VERSION"),
            window_ms: u64::try_from(plan.window.as_millis()).unwrap_or(u64::MAX),
            repeats: plan.repeats,
            setups: plan.setups.clone(),
            workload: WORKLOAD,
            memory,
            runs: rows,
        }
    }
}
