//! The userspace APF path for lazily restored memory (design.md's data flow):
//!
//! ```text
//! pager thread: uffd message (gpa, vCPU tid) ─► note_fault: mailbox[v] = (page, t); kick v
//! vCPU v thread: KVM_RUN → EINTR ─► take_fault: state + area words → Engine::fault
//!     Injected(T): area reason = 1, #PF CR2 = T, resume (the guest sleeps the task)
//!     Sync(reason): resume; the vCPU blocks in KVM until the page is copied (counted)
//! pager thread: UFFDIO_COPY done ─► page_ready: Engine::page_arrived(page); kick every vCPU
//!     with a delivery pending, which takes it at its next window (v1 #PF reason 2, v2 IRQ)
//! ```
//!
//! A page's "arrived" bit and the engine are updated under the engine lock, and a fault is
//! only handed to the engine after checking that bit under the same lock: a fault whose page
//! arrived while the kick travelled is dropped (the access simply retries), so no token can
//! wait for a page that already came.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use apf_host::{Delivery, FaultOutcome, page_of};

use super::{Apf, lock};
use crate::error::Result;
use crate::kvm::vcpu::Vcpu;

/// A fault reported by the pager, waiting for its vCPU's thread.
#[derive(Clone, Copy, Debug)]
pub struct PendingFault {
    /// Page-aligned guest-physical address.
    pub page: u64,
    /// When the pager read the userfaultfd message.
    pub at: Instant,
}

/// Latency samples in microseconds.
#[derive(Debug, Default)]
pub struct Samples(Mutex<Vec<u64>>);

/// Percentiles of [`Samples`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencyUs {
    /// Samples.
    pub count: u64,
    /// Median, µs.
    pub p50: u64,
    /// 90th percentile, µs.
    pub p90: u64,
    /// 99th percentile, µs.
    pub p99: u64,
    /// Largest, µs.
    pub max: u64,
    /// Mean, µs.
    pub mean: u64,
}

impl std::fmt::Display for LatencyUs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={}µs p90={}µs p99={}µs max={}µs",
            self.count, self.p50, self.p90, self.p99, self.max
        )
    }
}

impl Samples {
    /// Records one sample.
    pub fn record(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        lock(&self.0).push(us);
    }

    /// The percentiles so far.
    pub fn summary(&self) -> LatencyUs {
        let mut v = lock(&self.0).clone();
        if v.is_empty() {
            return LatencyUs::default();
        }
        v.sort_unstable();
        let n = v.len();
        let at = |q: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let i = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
            v[i]
        };
        LatencyUs {
            count: n as u64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[n - 1],
            mean: v.iter().sum::<u64>() / n as u64,
        }
    }
}

/// The APF path's state and counters.
#[derive(Debug)]
pub struct FaultPath {
    /// Turn faults into APFs (`--apf on`); off: never kick, every fault stalls its vCPU.
    pub apf_on: AtomicBool,
    mailbox: Vec<Mutex<Vec<PendingFault>>>,
    has_fault: Vec<AtomicBool>,
    /// One bit per guest page: arrived (set under the engine lock).
    arrived: Vec<AtomicU64>,
    /// Token → when its page arrived (for the page-ready delivery latency).
    ready_at: Mutex<HashMap<u32, Instant>>,
    /// Faults reported by the pager on a vCPU thread.
    pub vcpu_faults: AtomicU64,
    /// Of those, duplicates of a fault whose fetch was in flight.
    pub duplicate_faults: AtomicU64,
    /// Faults on a thread that is no vCPU (the VMM itself reading memory).
    pub other_thread_faults: AtomicU64,
    /// Faults not kicked because `--apf off`.
    pub apf_off_faults: AtomicU64,
    /// Kicks sent for faults.
    pub fault_kicks: AtomicU64,
    /// Faults taken by their vCPU thread and handed to the engine.
    pub faults_to_engine: AtomicU64,
    /// Faults dropped because the page arrived before the vCPU took them.
    pub stale_faults: AtomicU64,
    /// Faults superseded in the mailbox by a later one of the same vCPU.
    pub superseded_faults: AtomicU64,
    /// Faults not kicked because their vCPU already holds a token for that page.
    pub same_page_sync: AtomicU64,
    /// Per vCPU: the page its last fault was answered `Sync` for (u64::MAX: none). A kick
    /// interrupts KVM's wait for the page and the retried access posts a new message: without
    /// this, a synchronous fault would be kicked again and again until its page arrives.
    sync_page: Vec<AtomicU64>,
    /// Messages not kicked because their vCPU waits for that page synchronously.
    pub sync_waits: AtomicU64,
    /// Pages the pager reported mapped.
    pub pages_ready: AtomicU64,
    /// Kicks sent because a page arrival left a delivery pending.
    pub ready_kicks: AtomicU64,
    /// uffd message → APF injected.
    pub fault_to_apf: Samples,
    /// First fault on a page → page mapped (fetch + added latency + copy).
    pub fetch: Samples,
    /// Page mapped → its page-ready handed out at a delivery window.
    pub ready_delivery: Samples,
    first_fault: Mutex<HashMap<u64, Instant>>,
}

impl FaultPath {
    /// State for `vcpus` vCPUs over `ram_size` bytes.
    pub fn new(vcpus: usize, ram_size: u64) -> FaultPath {
        let pages = usize::try_from(ram_size / 4096).unwrap_or(0);
        FaultPath {
            apf_on: AtomicBool::new(true),
            mailbox: (0..vcpus).map(|_| Mutex::new(Vec::new())).collect(),
            has_fault: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            arrived: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            ready_at: Mutex::new(HashMap::new()),
            vcpu_faults: AtomicU64::new(0),
            duplicate_faults: AtomicU64::new(0),
            other_thread_faults: AtomicU64::new(0),
            apf_off_faults: AtomicU64::new(0),
            fault_kicks: AtomicU64::new(0),
            faults_to_engine: AtomicU64::new(0),
            stale_faults: AtomicU64::new(0),
            superseded_faults: AtomicU64::new(0),
            same_page_sync: AtomicU64::new(0),
            sync_page: (0..vcpus).map(|_| AtomicU64::new(u64::MAX)).collect(),
            sync_waits: AtomicU64::new(0),
            pages_ready: AtomicU64::new(0),
            ready_kicks: AtomicU64::new(0),
            fault_to_apf: Samples::default(),
            fetch: Samples::default(),
            ready_delivery: Samples::default(),
            first_fault: Mutex::new(HashMap::new()),
        }
    }

    fn arrived(&self, page: u64) -> bool {
        let pfn = usize::try_from(page / 4096).unwrap_or(usize::MAX);
        self.arrived
            .get(pfn / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (pfn % 64)) != 0)
    }

    fn set_arrived(&self, page: u64) {
        let pfn = usize::try_from(page / 4096).unwrap_or(usize::MAX);
        if let Some(w) = self.arrived.get(pfn / 64) {
            w.fetch_or(1 << (pfn % 64), Ordering::AcqRel);
        }
    }
}

impl Apf {
    /// The APF path's state and counters.
    pub fn fault_path(&self) -> &FaultPath {
        &self.fault
    }

    /// Pager thread: the thread with id `tid` faulted on `gpa`. Finds the vCPU by its
    /// thread id, leaves the fault in its mailbox and kicks it.
    pub fn note_fault(&self, tid: u32, gpa: u64, at: Instant, duplicate: bool) {
        let fp = &self.fault;
        let page = page_of(gpa);
        lock(&fp.first_fault).entry(page).or_insert(at);
        let Some(v) = self
            .kickers
            .iter()
            .position(|k| u32::try_from(k.tid()).is_ok_and(|t| t == tid && t != 0))
        else {
            fp.other_thread_faults.fetch_add(1, Ordering::Relaxed);
            return;
        };
        fp.vcpu_faults.fetch_add(1, Ordering::Relaxed);
        if duplicate {
            fp.duplicate_faults.fetch_add(1, Ordering::Relaxed);
        }
        if !fp.apf_on.load(Ordering::Relaxed) {
            // `--apf off`: never inject; the vCPU waits in KVM for the page.
            fp.apf_off_faults.fetch_add(1, Ordering::Relaxed);
            return;
        }
        {
            // A vCPU that already holds a token for this page is not blocked on its first
            // fault any more (that task sleeps): this is a late duplicate message (KVM
            // retried the fault before the kick landed), or another of its tasks touching
            // the same in-flight page. Either way, no kick: the vCPU, if it is blocked on the
            // page, waits for it in KVM (a synchronous fault, counted), and no task is put to
            // sleep on a fault it did not take.
            let engine = lock(&self.engine);
            let vcpu_bits = apf_host::token::VCPU_BITS;
            if engine
                .tokens_on_page(page)
                .iter()
                .any(|t| (t.get() & ((1 << vcpu_bits) - 1)) as usize == v)
            {
                fp.same_page_sync.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if fp.sync_page[v].load(Ordering::Acquire) == page {
            fp.sync_waits.fetch_add(1, Ordering::Relaxed);
            return;
        }
        lock(&fp.mailbox[v]).push(PendingFault { page, at });
        fp.has_fault[v].store(true, Ordering::Release);
        fp.fault_kicks.fetch_add(1, Ordering::Relaxed);
        self.kickers[v].kick();
    }

    /// Pager thread: `gpa`'s page is mapped. Every token on it becomes ready; every vCPU
    /// with a delivery pending is kicked to take it at its next window.
    pub fn page_ready(&self, gpa: u64, at: Instant) {
        let fp = &self.fault;
        let page = page_of(gpa);
        fp.pages_ready.fetch_add(1, Ordering::Relaxed);
        if let Some(t0) = lock(&fp.first_fault).remove(&page) {
            fp.fetch.record(at.saturating_duration_since(t0));
        }
        let mut engine = lock(&self.engine);
        fp.set_arrived(page);
        {
            let mut ready = lock(&fp.ready_at);
            for t in engine.tokens_on_page(page) {
                ready.insert(t.get(), at);
            }
        }
        if engine.page_arrived(page) == 0 {
            return;
        }
        let pending: Vec<usize> = engine.pending_deliveries().collect();
        drop(engine);
        for v in pending {
            self.maybe_pending[v].store(true, Ordering::Release);
            self.retry_at_us[v].store(0, Ordering::Relaxed);
            fp.ready_kicks.fetch_add(1, Ordering::Relaxed);
            self.kickers[v].kick();
        }
    }

    /// True when vCPU `i` has a fault waiting in its mailbox.
    pub(super) fn has_fault(&self, i: usize) -> bool {
        self.fault.has_fault[i].load(Ordering::Acquire)
    }

    /// vCPU thread, no completion pending: hands the latest fault of its mailbox to the
    /// engine and carries out the answer. Returns true when a #PF was injected.
    pub(super) fn take_fault(&self, vcpu: &mut Vcpu) -> Result<bool> {
        let i = vcpu.index() as usize;
        let fp = &self.fault;
        if !fp.has_fault[i].swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let mut faults = std::mem::take(&mut *lock(&fp.mailbox[i]));
        let Some(f) = faults.pop() else {
            return Ok(false);
        };
        // The vCPU was blocked on the latest one; earlier ones were resolved or retried.
        fp.superseded_faults
            .fetch_add(faults.len() as u64, Ordering::Relaxed);
        let cpu = vcpu.cpu_state()?;
        let mut engine = lock(&self.engine);
        if fp.arrived(f.page) {
            fp.stale_faults.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        fp.faults_to_engine.fetch_add(1, Ordering::Relaxed);
        let state = self.engine_state(&engine, i, cpu);
        let outcome = engine.fault(i, f.page, state);
        tracing::debug!(
            page = format_args!("{:#x}", f.page),
            ?outcome,
            ?state,
            "fault"
        );
        match outcome {
            Ok(FaultOutcome::Injected(_)) => {
                fp.sync_page[i].store(u64::MAX, Ordering::Release);
                let inject = self.drain(&mut engine, vcpu);
                self.flag_pending(&engine);
                drop(engine);
                if let Some((cr2, error_code)) = inject {
                    vcpu.inject_pf_now(cr2, error_code)?;
                }
                fp.fault_to_apf.record(f.at.elapsed());
                Ok(true)
            }
            // The engine saw the page arrive after this fault was queued: nothing to do.
            Ok(FaultOutcome::AlreadyPresent) => {
                fp.stale_faults.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
            // Sync: counted by the engine; the vCPU re-enters and waits for the page, and
            // further messages for it from this vCPU are not kicked.
            Ok(FaultOutcome::Sync(_)) | Err(_) => {
                fp.sync_page[i].store(f.page, Ordering::Release);
                Ok(false)
            }
        }
    }

    /// Records the delivery latency of a page ready handed out at a window.
    pub(super) fn note_delivery(&self, outcome: Delivery) {
        if let Delivery::Delivered { token, .. } = outcome
            && let Some(t0) = lock(&self.fault.ready_at).remove(&token.get())
        {
            self.fault.ready_delivery.record(t0.elapsed());
        }
    }
}
