//! The userspace APF driver's decisions, as a pure core: events in, decisions out.
//!
//! The apf-host [`Engine`] knows the protocol; this core knows the VMM around it: which
//! thread is which vCPU, which fault a kicked vCPU must take, when a vCPU must leave
//! `KVM_RUN` again, and the latencies of the path. It performs no I/O, reads no clock (time
//! is passed in) and takes no lock: [`super::service::ApfService`] holds it behind one mutex
//! and carries out what it answers. Every decision is unit-tested below with fabricated
//! event sequences.
//!
//! Events, and who reports them:
//! - [`Driver::vcpu_thread`]: a vCPU thread started (its thread id names it in fault
//!   messages).
//! - [`Driver::fault_reported`] (pager thread): a thread faulted on a missing page →
//!   the vCPU to kick, or nothing.
//! - [`Driver::page_mapped`] (pager thread): a page is in guest memory → the vCPUs to kick
//!   so they take their page-ready.
//! - [`Driver::entry`] (vCPU thread, out of `KVM_RUN`): the vCPU's state and area words →
//!   the engine's actions to carry out before re-entering, and whether it must come back.
//! - [`Driver::msr_write`] / [`Driver::msr_read`] (vCPU thread): the APF MSRs.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use apf_abi::{AsyncPfEn, Token, Version};
use apf_host::{
    Action, Delivery, Engine, FallbackReason, FaultOutcome, HoldReason, SavedState, VcpuState,
    page_of,
};

use super::metrics::{
    ActiveApf, ApfReport, DriverCounters, DriverLatency, EnableRecord, version_number,
};
use super::policy::{Choice, Policy};

/// Most `_EN` writes remembered for the report.
const MAX_ENABLE_RECORDS: usize = 256;

mod types;
pub use types::{Again, DriverConfig, Entry, PendingFault, Wake};

/// Per-vCPU record.
#[derive(Clone, Debug, Default)]
struct Record {
    /// Thread id of the vCPU thread, once it runs.
    tid: Option<u32>,
    /// The latest fault reported for it, not taken yet (a kick is on its way).
    fault: Option<PendingFault>,
    /// The frame this vCPU waits for synchronously (the engine answered `Sync`): a kick
    /// interrupts KVM's wait and the retried access posts another message, so further
    /// messages for it are not kicked until it arrives.
    sync_page: Option<u64>,
    /// Its last entry asked for an interrupt window.
    awaiting_window: bool,
}

/// The driver: the engine plus the per-vCPU records, counters and latencies.
#[derive(Debug)]
pub struct Driver {
    engine: Engine,
    vcpus: Vec<Record>,
    faults_to_apf: bool,
    lazy: Vec<Range<u64>>,
    counters: DriverCounters,
    latency: DriverLatency,
    /// Frame → first fault message on it (for the fetch latency).
    first_fault: HashMap<u64, Instant>,
    /// Token → when its page was mapped (for the page-ready delivery latency).
    mapped_at: HashMap<Token, Instant>,
    enables: Vec<EnableRecord>,
    /// Why the last delivery window of the current entry was held.
    last_hold: Option<HoldReason>,
    /// The current entry sampled a handler's cost: come back when the guest can take an
    /// interrupt, which is when its handler is done.
    probe: bool,
    /// The current entry handed out a page-ready.
    delivered: bool,
    policy: Policy,
}

impl Driver {
    /// A driver for a VM whose vCPUs are all just powered on.
    pub fn new(config: DriverConfig) -> Driver {
        let vcpus = vec![Record::default(); config.engine.vcpus];
        let policy = Policy::new(config.policy, config.engine.vcpus);
        Driver {
            engine: Engine::new(config.engine),
            vcpus,
            faults_to_apf: config.faults_to_apf,
            lazy: config.lazy,
            counters: DriverCounters::default(),
            latency: DriverLatency::default(),
            first_fault: HashMap::new(),
            mapped_at: HashMap::new(),
            enables: Vec::new(),
            last_hold: None,
            probe: false,
            delivered: false,
            policy,
        }
    }

    /// The engine, for questions (counters, tokens, versions).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The driver's own counters.
    pub fn counters(&self) -> &DriverCounters {
        &self.counters
    }

    /// The path's latencies.
    pub fn latency(&self) -> &DriverLatency {
        &self.latency
    }

    /// Valid `_EN` writes seen (at most the first 256).
    pub fn enables(&self) -> &[EnableRecord] {
        &self.enables
    }

    /// The report section: the engine's and the driver's counters as they are.
    pub fn report(&self) -> ApfReport {
        let e = &self.engine;
        ApfReport {
            engine: e.counters().clone(),
            driver: self.counters.clone(),
            latency: self.latency.clone(),
            outstanding_at_end: (0..e.vcpu_count()).map(|v| e.outstanding(v) as u64).sum(),
            active: (0..e.vcpu_count())
                .map(|v| {
                    Some(ActiveApf {
                        version: version_number(e.version(v)?),
                        area_gpa: e.area_gpa(v)?,
                    })
                })
                .collect(),
            enables: self.enables.clone(),
            policy: self.policy.report(),
        }
    }

    /// Loads saved APF MSRs (restore): the engine re-runs the enable path, queueing a
    /// wake-all per enabled vCPU. Returns the vCPUs that have something to deliver.
    pub fn restore(&mut self, saved: &SavedState) -> Result<Vec<usize>, apf_host::Error> {
        self.engine.restore(saved)?;
        Ok(self.engine.pending_deliveries().collect())
    }

    /// vCPU `vcpu`'s thread runs with thread id `tid`.
    pub fn vcpu_thread(&mut self, vcpu: usize, tid: u32) {
        if let Some(r) = self.vcpus.get_mut(vcpu) {
            r.tid = Some(tid);
        }
    }

    fn vcpu_of(&self, tid: u32) -> Option<usize> {
        self.vcpus.iter().position(|r| r.tid == Some(tid))
    }

    /// Pager thread: thread `tid` faulted on the frame of `gpa` (`duplicate`: its fetch was
    /// already in flight). Returns the vCPU to kick so that it takes the fault.
    pub fn fault_reported(
        &mut self,
        tid: u32,
        gpa: u64,
        at: Instant,
        duplicate: bool,
    ) -> Option<usize> {
        let page = page_of(gpa);
        let vcpu = self.vcpu_of(tid);
        let c = &mut self.counters;
        if self.engine.is_arrived(page) {
            // Read after the page was mapped: the access has been retried already.
            c.faults_after_arrival += 1;
            return None;
        }
        self.first_fault.entry(page).or_insert(at);
        let Some(v) = vcpu else {
            // The VMM itself (or a KVM worker) touched the page: nobody to kick.
            c.other_thread_faults += 1;
            return None;
        };
        c.vcpu_faults += 1;
        if duplicate {
            c.duplicate_faults += 1;
        }
        if !self.faults_to_apf {
            c.apf_off_faults += 1;
            return None;
        }
        // A vCPU that holds a token for this page is not blocked on its first fault any
        // more (that task sleeps): this is a late duplicate message (KVM retried the fault
        // before the kick landed), or another of its tasks touching the in-flight page. A
        // kick could put a task to sleep on a fault it did not take: the vCPU, if blocked,
        // waits for the page in KVM.
        if self.engine.waits_on(v, page) {
            c.same_page_sync += 1;
            return None;
        }
        let r = &mut self.vcpus[v];
        if r.sync_page == Some(page) {
            c.sync_waits += 1;
            return None;
        }
        // The policy: is the page due sooner than an APF would cost this vCPU? Then the
        // vCPU is not kicked at all and waits for it in KVM.
        let age = self
            .first_fault
            .get(&page)
            .map_or(Duration::ZERO, |&t0| at.saturating_duration_since(t0));
        if let Choice::Wait { remaining, cycle } = self.policy.choose(v, age) {
            tracing::debug!(
                vcpu = v,
                page = format_args!("{page:#x}"),
                ?remaining,
                ?cycle,
                "waiting: sooner than an APF"
            );
            // The vCPU is blocked on this page now, not on the one of a kick in flight.
            r.fault = None;
            r.sync_page = Some(page);
            if let Err(e) = self.engine.decline(v, page, FallbackReason::ShortWait) {
                tracing::error!(%e, "declined a fault for a vCPU the engine does not have");
            }
            return None;
        }
        let r = &mut self.vcpus[v];
        let Some(old) = r.fault.replace(PendingFault { page, at }) else {
            c.fault_kicks += 1;
            return Some(v);
        };
        // A kick is on its way already, and the vCPU takes the latest fault (the first
        // message's time for the same page).
        if old.page == page {
            r.fault = Some(old);
            c.coalesced_faults += 1;
        } else {
            c.superseded_faults += 1;
        }
        None
    }

    /// Pager thread: the frame of `gpa` is mapped. Every token on it becomes ready; says,
    /// for each vCPU that now has a page-ready to take, how it gets it: a v2 vCPU whose area
    /// is resident in RAM gets it from this thread (the token goes into its slot and its
    /// interrupt is raised: [`Driver::deliver_now`]), without leaving the guest; any other
    /// is kicked to take it at its next entry.
    pub fn page_mapped(&mut self, gpa: u64, at: Instant) -> Vec<Wake> {
        let page = page_of(gpa);
        self.counters.pages_mapped += 1;
        if let Some(t0) = self.first_fault.remove(&page) {
            let fetch = at.saturating_duration_since(t0);
            self.latency.fetch.record(fetch);
            self.policy.fetched(fetch);
        }
        let tokens = self.engine.tokens_on_page(page).to_vec();
        for r in &mut self.vcpus {
            if r.sync_page == Some(page) {
                r.sync_page = None;
            }
        }
        let mut owners: Vec<usize> = tokens
            .iter()
            .filter_map(|&t| self.engine.token_owner(t))
            .collect();
        for &t in &tokens {
            self.mapped_at.insert(t, at);
        }
        self.engine.page_arrived(page);
        if self.engine.config().v1_ready_on_other_vcpus {
            owners = self.engine.pending_deliveries().collect();
        }
        owners.sort_unstable();
        owners.dedup();
        owners.retain(|&v| self.engine.pending_delivery(v));
        let wakes: Vec<Wake> = owners
            .into_iter()
            .map(|v| match self.resident_area(v) {
                Some(area) if self.engine.version(v) == Some(Version::V2) => {
                    Wake::Deliver { vcpu: v, area }
                }
                _ => Wake::Kick(v),
            })
            .collect();
        self.counters.ready_kicks +=
            wakes.iter().filter(|w| matches!(w, Wake::Kick(_))).count() as u64;
        wakes
    }

    /// vCPU `vcpu`'s area while APF is active on it and its page is in RAM (outside the lazily
    /// served ranges, or arrived): another thread may read and write it without faulting.
    fn resident_area(&self, vcpu: usize) -> Option<u64> {
        let area = self.engine.area_gpa(vcpu)?;
        let lazy = self.lazy.iter().any(|r| r.contains(&area));
        (!lazy || self.engine.is_arrived(area)).then_some(area)
    }

    /// Pager thread, after [`Wake::Deliver`]: hands vCPU `vcpu` its next v2 page-ready from
    /// this thread, given the token slot `slot` of its area as just read. Returns the
    /// actions (the slot write, the interrupt), or `None` when the vCPU must be kicked to
    /// take it itself (the slot is not free, or it has nothing to deliver any more).
    pub fn deliver_now(&mut self, vcpu: usize, slot: u32, now: Instant) -> Option<Vec<Action>> {
        if !self.engine.pending_delivery(vcpu) || self.engine.version(vcpu) != Some(Version::V2) {
            return None;
        }
        // v2 delivery depends on the token slot only: the LAPIC holds the interrupt until
        // the guest can take it.
        let state = VcpuState {
            area_token: slot,
            ..VcpuState::USER
        };
        let mut actions = Vec::new();
        let mut exception_free = true;
        self.window(vcpu, state, now, &mut actions, &mut exception_free);
        if actions.is_empty() {
            self.counters.ready_kicks += 1;
            return None;
        }
        self.counters.direct_readies += 1;
        Some(actions)
    }

    /// The area of vCPU `vcpu` while APF is active on it: the caller reads its two words
    /// from guest memory (without any lock a page fault could need) for [`Driver::entry`].
    pub fn area(&self, vcpu: usize) -> Option<u64> {
        self.engine.area_gpa(vcpu)
    }

    /// True when vCPU `vcpu` has work for an entry: a fault to take or a delivery.
    pub fn has_work(&self, vcpu: usize) -> bool {
        self.vcpus.get(vcpu).is_some_and(|r| r.fault.is_some())
            || self.engine.pending_delivery(vcpu)
    }

    /// vCPU thread, out of `KVM_RUN` in state `state` (with its area words): decides what to
    /// inject before it re-enters. `exception_allowed` is false while the instruction that
    /// exited still has to complete (a PIO or MSR exit): an exception must not be queued
    /// then, an interrupt may.
    ///
    /// Order: a queued wake-all first (so it covers the tokens injected before it), then
    /// the fault the vCPU was kicked for, then ready tokens. One exception per entry.
    pub fn entry(
        &mut self,
        vcpu: usize,
        state: VcpuState,
        exception_allowed: bool,
        now: Instant,
    ) -> Entry {
        self.counters.entries += 1;
        self.last_hold = None;
        self.probe = false;
        self.delivered = false;
        if state.interrupts_enabled && !state.interrupt_shadow {
            self.policy.injectable(vcpu, now);
        }
        let mut actions = Vec::new();
        let mut exception_free = exception_allowed;
        let v1 = self.engine.version(vcpu) == Some(Version::V1);

        let mut wake_all_now = false;
        if self.engine.wake_all_pending(vcpu) && (exception_free || !v1) {
            self.window(vcpu, state, now, &mut actions, &mut exception_free);
            wake_all_now = !self.engine.wake_all_pending(vcpu);
        }
        if exception_allowed && let Some(f) = self.vcpus.get_mut(vcpu).and_then(|r| r.fault.take())
        {
            // v2: the wake-all is in flight while its token sits in the slot (the guest frees
            // the slot in its interrupt handler, where a not-present cannot come in).
            let wake_all_in_slot = self.engine.version(vcpu) == Some(Version::V2)
                && state.area_token == Token::WAKE_ALL.get();
            if exception_free && !wake_all_now && !wake_all_in_slot {
                self.take_fault(vcpu, f, state, now, &mut actions, &mut exception_free);
            } else {
                // An exception went out at this entry, or a wake-all the guest has not taken
                // yet (it must cover exactly the tokens injected before it): the guest takes
                // it, retries the access and faults again, which brings the vCPU back. (A
                // wake-all the guest's state holds is no reason to wait: the fault meets
                // the same rules in the engine, and a token injected before the wake-all
                // is delivered is covered by it.)
                self.counters.deferred_faults += 1;
            }
        }
        if self.engine.pending_delivery(vcpu) && (exception_free || !v1) {
            self.window(vcpu, state, now, &mut actions, &mut exception_free);
        }

        let fault_left = self.vcpus.get(vcpu).is_some_and(|r| r.fault.is_some());
        let pending = self.engine.pending_delivery(vcpu);

        let again = if fault_left || (pending && !exception_allowed) {
            Again::AfterCompletion
        } else if !pending {
            if self.probe {
                Again::WhenInjectable
            } else {
                Again::No
            }
        } else if matches!(
            self.last_hold,
            Some(HoldReason::ReasonNotConsumed | HoldReason::TokenSlotBusy)
        ) {
            Again::Later
        } else {
            Again::WhenInjectable
        };
        let r = &mut self.vcpus[vcpu];
        if std::mem::replace(&mut r.awaiting_window, again == Again::WhenInjectable)
            && self.delivered
        {
            self.counters.window_deliveries += 1;
        }
        match again {
            Again::WhenInjectable => self.counters.window_waits += 1,
            Again::Later => self.counters.retry_waits += 1,
            Again::No | Again::AfterCompletion => {}
        }
        Entry { actions, again }
    }

    /// Hands the latest fault to the engine.
    fn take_fault(
        &mut self,
        vcpu: usize,
        f: PendingFault,
        state: VcpuState,
        now: Instant,
        actions: &mut Vec<Action>,
        exception_free: &mut bool,
    ) {
        self.counters.faults_to_engine += 1;
        match self.engine.fault(vcpu, f.page, state) {
            Ok(FaultOutcome::Injected(token)) => {
                tracing::debug!(
                    vcpu,
                    page = format_args!("{:#x}", f.page),
                    token = format_args!("{:#x}", token.get()),
                    "not present injected"
                );
                self.vcpus[vcpu].sync_page = None;
                self.latency
                    .fault_to_apf
                    .record(now.saturating_duration_since(f.at));
                self.probe |= self.policy.injected(vcpu, f.at, now);
                *exception_free = false;
            }
            Ok(FaultOutcome::AlreadyPresent) => {
                // The page arrived while the kick travelled: re-entering retries the access.
                self.counters.stale_faults += 1;
            }
            Ok(FaultOutcome::Sync(reason)) => {
                tracing::debug!(vcpu, page = format_args!("{:#x}", f.page), %reason, "synchronous");
                self.vcpus[vcpu].sync_page = Some(f.page);
            }
            Err(e) => tracing::error!(%e, "fault for a vCPU the engine does not have"),
        }
        self.drain(actions);
    }

    /// Opens a delivery window and records what went out.
    fn window(
        &mut self,
        vcpu: usize,
        state: VcpuState,
        now: Instant,
        actions: &mut Vec<Action>,
        exception_free: &mut bool,
    ) {
        let outcome = self
            .engine
            .delivery_window(vcpu, state)
            .unwrap_or(Delivery::Nothing);
        tracing::debug!(vcpu, ?outcome, "delivery window");
        if let Delivery::Held(reason) = outcome {
            self.last_hold = Some(reason);
        }
        if let Delivery::Delivered { token, .. } = outcome {
            if token.is_wake_all() {
                // The tokens it covered will never be delivered.
                let engine = &self.engine;
                self.mapped_at.retain(|t, _| engine.is_outstanding(*t));
            } else {
                self.delivered = true;
                if let Some(t0) = self.mapped_at.remove(&token) {
                    self.latency
                        .ready_delivery
                        .record(now.saturating_duration_since(t0));
                }
                // v1: timed to the end of its handler (an interrupt window); v2: to its ACK.
                let sampled = self.policy.ready_out(vcpu, now);
                self.probe |= sampled && self.engine.version(vcpu) == Some(Version::V1);
            }
        }
        let before = actions.len();
        self.drain(actions);
        if actions[before..]
            .iter()
            .any(|a| matches!(a, Action::InjectPf { .. }))
        {
            *exception_free = false;
        }
    }

    fn drain(&mut self, actions: &mut Vec<Action>) {
        actions.extend(std::iter::from_fn(|| self.engine.poll_action()));
    }

    /// vCPU thread: the guest wrote `value` to APF MSR `msr`. `Ok(true)`: the vCPU now has
    /// something to deliver (an ACK released the next page-ready, an enable queued a
    /// wake-all). `Err`: answer #GP.
    pub fn msr_write(
        &mut self,
        vcpu: usize,
        msr: u32,
        value: u64,
        now: Instant,
    ) -> Result<bool, apf_host::Error> {
        self.counters.msr_exits += 1;
        let features = self.engine.config().features;
        self.engine.msr_write(vcpu, msr, value)?;
        if msr == apf_abi::msr::MSR_KVM_ASYNC_PF_ACK && value == 1 {
            self.policy.acked(vcpu, now);
        }
        if msr == apf_abi::msr::MSR_KVM_ASYNC_PF_EN
            && let Ok(en) = AsyncPfEn::parse(value, features)
        {
            tracing::info!(vcpu, value = format_args!("{value:#x}"), area = format_args!("{:#x}", en.area_gpa()), version = ?en.version(), "MSR_KVM_ASYNC_PF_EN");
            if self.enables.len() < MAX_ENABLE_RECORDS {
                self.enables.push(EnableRecord::new(vcpu, value, &en));
            }
            if en.version().is_none() {
                // Disabled: nothing it had outstanding will be delivered.
                let engine = &self.engine;
                self.mapped_at.retain(|t, _| engine.is_outstanding(*t));
            }
        }
        Ok(self.engine.pending_delivery(vcpu))
    }

    /// vCPU thread: the guest reads APF MSR `msr`. `Err`: answer #GP.
    pub fn msr_read(&mut self, vcpu: usize, msr: u32) -> Result<u64, apf_host::Error> {
        self.counters.msr_exits += 1;
        self.engine.msr_read(vcpu, msr)
    }
}

#[cfg(test)]
mod tests;
