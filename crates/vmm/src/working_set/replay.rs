//! Counting how a replayed working set fared: every page fault of the run is a miss (the
//! page lies outside the working set, or its turn in the stream had not come); a page of
//! the working set that was in memory before anyone touched it is a hit.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use super::plan::Split;

/// The working-set section of a restore's report (`working_set` in `--json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkingSetReport {
    /// What the restore did with the snapshot's working set.
    pub status: WorkingSetStatus,
    /// Why it was ignored, or what was recorded where.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Distinct pages of the working set (used: replayed; recorded: recorded).
    pub pages: u64,
    /// Of those, pages loaded before the first instruction (VMM, CPL 0, before CPL 3).
    pub must_have_pages: u64,
    /// Working-set pages in memory before anything touched them.
    pub hits: u64,
    /// Page faults: `misses_outside` + `misses_early`.
    pub misses: u64,
    /// Faults on pages outside the working set.
    pub misses_outside: u64,
    /// Faults on working-set pages that had not arrived yet.
    pub misses_early: u64,
    /// Time from the pager's start until the whole working set was resident, µs (0 when
    /// nothing was streamed: it was all loaded before the first instruction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_us: Option<u64>,
    /// A recording: pages by touch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded: Option<super::recorder::RecordSummary>,
}

/// What a restore did with a working set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkingSetStatus {
    /// The snapshot has none.
    #[default]
    None,
    /// Replayed.
    Used,
    /// `--working-set off`.
    Off,
    /// Refused by its checks (a warning; the restore served memory on demand).
    Ignored,
    /// Recorded by this run (`--record-working-set`).
    Recorded,
}

/// The counts of one replay.
#[derive(Debug)]
pub struct Replay {
    /// Pages of the stream (lazily served working-set pages).
    stream: HashSet<u64>,
    pages: u64,
    must_have_pages: u64,
    faulted: Mutex<Faulted>,
}

#[derive(Debug, Default)]
struct Faulted {
    pages: HashSet<u64>,
    outside: u64,
    early: u64,
}

impl Replay {
    /// Counts for the replay of `split`.
    pub fn new(split: &Split) -> Replay {
        Replay {
            stream: split.stream.iter().copied().collect(),
            pages: split.pages,
            must_have_pages: split.must_have_pages,
            faulted: Mutex::new(Faulted::default()),
        }
    }

    /// Pager thread: a fault on `gpa` (`duplicate`: its fetch was in flight for a fault).
    pub fn on_fault(&self, gpa: u64, duplicate: bool) {
        let page = gpa & !0xfff;
        let mut f = self.faulted.lock().unwrap_or_else(PoisonError::into_inner);
        if duplicate || !f.pages.insert(page) {
            return;
        }
        if self.stream.contains(&page) {
            f.early += 1;
        } else {
            f.outside += 1;
        }
    }

    /// The report at the end of the run: `resident(gpa)` says whether a page is in memory;
    /// `resident_ns` is when the stream completed.
    pub fn report(
        &self,
        resident: impl Fn(u64) -> bool,
        resident_ns: Option<u64>,
    ) -> WorkingSetReport {
        let f = self.faulted.lock().unwrap_or_else(PoisonError::into_inner);
        let streamed_hits = self
            .stream
            .iter()
            .filter(|&&p| !f.pages.contains(&p) && resident(p))
            .count() as u64;
        WorkingSetReport {
            status: WorkingSetStatus::Used,
            pages: self.pages,
            must_have_pages: self.must_have_pages,
            hits: self.must_have_pages + streamed_hits,
            misses: f.outside + f.early,
            misses_outside: f.outside,
            misses_early: f.early,
            resident_us: resident_ns
                .map(|ns| ns / 1000)
                .or(self.stream.is_empty().then_some(0)),
            ..WorkingSetReport::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_misses_untouched_resident_pages_hits() {
        let split = Split {
            eager: vec![std::ops::Range {
                start: 0,
                end: 0x1_0000,
            }],
            lazy: Vec::new(),
            stream: vec![0x2_0000, 0x3_0000, 0x4_0000],
            pages: 5,
            must_have_pages: 2,
        };
        let r = Replay::new(&split);
        r.on_fault(0x3_0123, false); // early
        r.on_fault(0x3_0000, false); // the same page again
        r.on_fault(0x9_0000, false); // outside
        r.on_fault(0xa_0000, true); // duplicate
        let rep = r.report(|p| p != 0x4_0000, Some(5_000_000));
        assert_eq!((rep.hits, rep.misses), (3, 2));
        assert_eq!((rep.misses_early, rep.misses_outside), (1, 1));
        assert_eq!(rep.resident_us, Some(5000));
        assert_eq!(rep.status, WorkingSetStatus::Used);
    }
}
