//! Working sets: record the pages a lazily restored guest touches first
//! (`restore --lazy --record-working-set`), keep them in the snapshot directory
//! (`working-set.bin`, [`file`](mod@file)), and replay them on later lazy restores: the must-have
//! pages before the first instruction, the rest streamed in recorded order ahead of the
//! guest, APF (or a synchronous fault) for what has not arrived, everything else on demand.
//!
//! ```text
//! record:  all of RAM lazy ─► Recorder (pager faults + the vCPU's CPL at a kicked exit)
//!          ─► working-set.bin (atomic, checksummed, tied to the snapshot's memory)
//! replay:  WorkingSet::read (checked; refused → warning, plain lazy restore)
//!          ─► plan::split: must-have chunks eager, the rest lazy, the stream in order
//!          ─► pager (working set streamed first) ─► Replay counts hits and misses
//! ```

pub mod file;
pub mod plan;
pub mod recorder;
pub mod replay;

use std::ops::Range;
use std::sync::Arc;

pub use file::{Entry, FILE_NAME, Touch, WorkingSet, WorkingSetError, snapshot_id};
pub use recorder::{RecordSummary, Recorder};
pub use replay::{Replay, WorkingSetReport, WorkingSetStatus};

use crate::snapshot::format::Snapshot;

/// What a lazy restore does with working sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkingSetMode {
    /// Replay the snapshot's working set if it has one (`--working-set on`, the default).
    #[default]
    Replay,
    /// Ignore it (`--working-set off`).
    Ignore,
    /// Serve all of RAM lazily and record one into the snapshot directory
    /// (`--record-working-set`).
    Record,
}

/// What a restore does with working sets, decided before the VM is created.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Loaded before the first instruction.
    pub eager: Vec<Range<u64>>,
    /// Served on demand.
    pub lazy: Vec<Range<u64>>,
    /// Streamed to the pager in this order.
    pub stream: Vec<u64>,
    /// A replay's counters.
    pub replay: Option<Arc<Replay>>,
    /// A recording's recorder.
    pub recorder: Option<Arc<Recorder>>,
    /// The working set replayed (carried into a snapshot taken of this run).
    pub replayed: Option<WorkingSet>,
    /// The report section, as known before the run.
    pub report: WorkingSetReport,
}

/// Decides what a lazy restore of `snap` (RAM `ram`) loads when: `record` serves all of
/// RAM lazily and records; otherwise, with `use_working_set`, the snapshot's working set
/// (if any, and if it passes its checks: a refused one is a warning and the restore serves
/// memory on demand from `default_split`) is replayed.
pub fn prepare(
    snap: &Snapshot,
    ram: &[Range<u64>],
    record: bool,
    use_working_set: bool,
    default_split: (Vec<Range<u64>>, Vec<Range<u64>>),
) -> Prepared {
    let (eager, lazy) = default_split;
    let mut p = Prepared {
        eager,
        lazy,
        ..Prepared::default()
    };
    if record {
        p.eager = Vec::new();
        p.lazy = ram.to_vec();
        p.recorder = Some(Arc::new(Recorder::new(snap.manifest.vcpus.len())));
        p.report.status = WorkingSetStatus::Recorded;
        return p;
    }
    if !use_working_set {
        p.report.status = WorkingSetStatus::Off;
        return p;
    }
    let memory = &snap.manifest.memory;
    match WorkingSet::read(&snap.dir, memory) {
        Ok(None) => {}
        Ok(Some(ws)) => {
            let split = plan::split(ram, memory.chunk_size, &ws);
            p.replay = Some(Arc::new(Replay::new(&split)));
            p.report.status = WorkingSetStatus::Used;
            p.report.pages = split.pages;
            p.report.must_have_pages = split.must_have_pages;
            (p.eager, p.lazy, p.stream) = (split.eager, split.lazy, split.stream);
            p.replayed = Some(ws);
        }
        Err(e) => {
            let why = format!("{}: {e}", snap.dir.join(file::FILE_NAME).display());
            tracing::warn!("working set ignored (memory is served on demand): {why}");
            p.report.status = WorkingSetStatus::Ignored;
            p.report.note = Some(why);
        }
    }
    p
}
