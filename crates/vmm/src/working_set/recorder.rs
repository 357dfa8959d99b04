//! Recording a working set while a lazily restored guest runs (`--record-working-set`).
//!
//! The pager reports every first fault (address, thread id). A fault by a thread that is no
//! vCPU is the VMM's own ([`Touch::Vmm`]). A vCPU's fault is kicked so that the vCPU leaves
//! `KVM_RUN` while it still waits for the page: its CPL at that exit is the CPL of the
//! faulting access. That is only known when the page had not arrived by then (the vCPU was
//! still blocked on it); otherwise the touch stays [`Touch::BeforeUser`] while the vCPU has
//! not been seen at CPL 3 since the restore (its saved state says where it starts), and
//! [`Touch::Unknown`] after. The APF driver is not involved and decides as it always does.
//!
//! Cost: one mutex-protected `Vec` push and one kick per fault on the pager thread, and one
//! `KVM_GET_SREGS` per kicked exit on the vCPU thread.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::file::{Entry, Touch, WorkingSet};

/// A vCPU's fault whose CPL is being asked for.
#[derive(Clone, Copy, Debug)]
struct Probe {
    /// Index of its entry.
    index: usize,
    /// Its page.
    page: u64,
    /// The page arrived meanwhile: the CPL at the next exit says nothing about the access.
    arrived: bool,
}

#[derive(Debug, Default)]
struct Log {
    entries: Vec<Entry>,
    pages: HashSet<u64>,
    probes: Vec<Option<Probe>>,
}

/// The recorder of one run.
#[derive(Debug)]
pub struct Recorder {
    start: Mutex<Option<Instant>>,
    tids: Vec<AtomicU32>,
    user_seen: Vec<AtomicBool>,
    log: Mutex<Log>,
}

/// Counts of a recording, by touch.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecordSummary {
    /// Pages recorded.
    pub pages: u64,
    /// By the VMM.
    pub vmm: u64,
    /// Before the vCPU's first CPL 3 instruction.
    pub before_user: u64,
    /// At CPL 0.
    pub kernel: u64,
    /// At CPL 3.
    pub user: u64,
    /// CPL not learned (treated as CPL 3).
    pub unknown: u64,
}

impl Recorder {
    /// A recorder for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Recorder {
        Recorder {
            start: Mutex::new(None),
            tids: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
            user_seen: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            log: Mutex::new(Log {
                probes: vec![None; vcpus],
                ..Log::default()
            }),
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// vCPU `vcpu` runs on thread `tid`, starting at CPL `cpl` (its restored state).
    pub fn vcpu_started(&self, vcpu: usize, tid: u32, cpl: u8) {
        let mut start = self.start.lock().unwrap_or_else(PoisonError::into_inner);
        start.get_or_insert_with(Instant::now);
        if let Some(t) = self.tids.get(vcpu) {
            t.store(tid, Ordering::Release);
            self.user_seen[vcpu].store(cpl == 3, Ordering::Release);
        }
    }

    /// Pager thread: thread `tid` faulted on `gpa` at `at`. Returns the vCPU to kick so that
    /// its CPL is read while it waits for the page.
    pub fn on_fault(&self, tid: u32, gpa: u64, at: Instant, duplicate: bool) -> Option<usize> {
        let page = gpa & !0xfff;
        let vcpu = self
            .tids
            .iter()
            .position(|t| t.load(Ordering::Acquire) == tid && tid != 0);
        let start = *self.start.lock().unwrap_or_else(PoisonError::into_inner);
        let t_us = start.map_or(0, |s| at.saturating_duration_since(s).as_micros());
        let mut log = self.log();
        if duplicate || !log.pages.insert(page) {
            return None;
        }
        let touch = match vcpu {
            None => Touch::Vmm,
            Some(v) if !self.user_seen[v].load(Ordering::Acquire) => Touch::BeforeUser,
            Some(_) => Touch::Unknown,
        };
        let index = log.entries.len();
        log.entries.push(Entry {
            gpa: page,
            t_us: u32::try_from(t_us).unwrap_or(u32::MAX),
            touch,
        });
        let v = vcpu?;
        log.probes[v] = Some(Probe {
            index,
            page,
            arrived: false,
        });
        Some(v)
    }

    /// Pager thread: `gpa`'s page is mapped.
    pub fn on_page_ready(&self, gpa: u64) {
        let page = gpa & !0xfff;
        for p in self.log().probes.iter_mut().flatten() {
            if p.page == page {
                p.arrived = true;
            }
        }
    }

    /// vCPU thread, out of `KVM_RUN`: true when a fault of this vCPU waits for its CPL.
    pub fn wants_cpl(&self, vcpu: usize) -> bool {
        self.log().probes.get(vcpu).is_some_and(Option::is_some)
    }

    /// vCPU thread, out of `KVM_RUN` at CPL `cpl`: the CPL of the access that faulted, if
    /// its page has not arrived yet (the vCPU is still stopped at it).
    pub fn exit_at(&self, vcpu: usize, cpl: u8) {
        let mut log = self.log();
        let Some(probe) = log.probes.get_mut(vcpu).and_then(Option::take) else {
            return;
        };
        if probe.arrived {
            return;
        }
        log.entries[probe.index].touch = if cpl == 3 {
            self.user_seen[vcpu].store(true, Ordering::Release);
            Touch::User
        } else {
            Touch::Kernel
        };
    }

    /// The working set recorded so far, for the snapshot `snapshot_id`.
    pub fn working_set(&self, snapshot_id: u64) -> WorkingSet {
        WorkingSet {
            snapshot_id,
            entries: self.log().entries.clone(),
        }
    }

    /// Counts by touch.
    pub fn summary(&self) -> RecordSummary {
        let log = self.log();
        let mut s = RecordSummary {
            pages: log.entries.len() as u64,
            ..RecordSummary::default()
        };
        for e in &log.entries {
            *match e.touch {
                Touch::Vmm => &mut s.vmm,
                Touch::BeforeUser => &mut s.before_user,
                Touch::Kernel => &mut s.kernel,
                Touch::User => &mut s.user,
                Touch::Unknown => &mut s.unknown,
            } += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_are_classified_by_thread_cpl_and_arrival() {
        let r = Recorder::new(2);
        r.vcpu_started(0, 100, 3);
        r.vcpu_started(1, 101, 0);
        let now = Instant::now();
        assert_eq!(r.on_fault(7, 0x1000, now, false), None, "the VMM's own");
        assert_eq!(r.on_fault(100, 0x2000, now, false), Some(0));
        r.exit_at(0, 0);
        assert_eq!(r.on_fault(100, 0x3000, now, false), Some(0));
        r.exit_at(0, 3);
        assert_eq!(r.on_fault(100, 0x4000, now, false), Some(0));
        r.on_page_ready(0x4000);
        r.exit_at(0, 0); // arrived first: says nothing
        assert_eq!(r.on_fault(101, 0x5123, now, false), Some(1));
        r.on_page_ready(0x5000);
        r.exit_at(1, 3);
        assert_eq!(r.on_fault(101, 0x5000, now, false), None, "recorded once");
        assert_eq!(r.on_fault(101, 0x6000, now, true), None, "duplicate");
        let touches: Vec<_> = r.working_set(9).entries.iter().map(|e| e.touch).collect();
        assert_eq!(
            touches,
            [
                Touch::Vmm,
                Touch::Kernel,
                Touch::User,
                Touch::Unknown,
                Touch::BeforeUser
            ]
        );
        assert_eq!(r.summary().pages, 5);
        assert!(!r.wants_cpl(0));
    }
}
