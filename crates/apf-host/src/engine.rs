//! The engine: one object per VM. Events in, [`Action`]s out; no I/O, no clock, no threads.

use std::collections::{BTreeMap, VecDeque};

use apf_abi::area::{REASON_OFFSET, TOKEN_OFFSET};
use apf_abi::{Reason, Token, Version};

use crate::action::{APF_ERROR_CODE, Action, FallbackReason, FaultOutcome};
use crate::arrival::{ArrivalMap, Insert};
use crate::config::EngineConfig;
use crate::counters::{self, Counters};
use crate::error::Error;
use crate::page::page_of;
use crate::state::VcpuState;
use crate::token;
use crate::vcpu::Vcpu;

/// One outstanding token: "not present" injected, "page ready" not handed out yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Outstanding {
    /// The vCPU that took the "not present".
    pub vcpu: usize,
    /// The frame it waits for.
    pub page: u64,
    /// The page has arrived; the token sits in its vCPU's ready queue.
    pub ready: bool,
}

/// Why a vCPU's outstanding tokens are being dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DropCause {
    Disable,
    Reset,
    Restore,
}

/// The host side of the APF protocol for one VM.
///
/// Inputs are method calls ([`msr_write`](Engine::msr_write), [`fault`](Engine::fault),
/// [`page_arrived`](Engine::page_arrived), [`delivery_window`](Engine::delivery_window),
/// [`reset`](Engine::reset), [`restore`](Engine::restore)); outputs are [`Action`]s drained
/// with [`poll_action`](Engine::poll_action), plus the answers those methods return (#GP as
/// [`Error::Gp`], synchronous fallback as [`FaultOutcome::Sync`]). The VMM performs the
/// actions; the engine performs nothing.
///
/// Deterministic: the same inputs give the same outputs. `Clone + Eq + Hash` so a model
/// checker can store and deduplicate states.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Engine {
    pub(crate) config: EngineConfig,
    pub(crate) vcpus: Vec<Vcpu>,
    /// Every outstanding token of the VM.
    pub(crate) tokens: BTreeMap<Token, Outstanding>,
    /// Frame → tokens waiting for it, in fault order.
    pub(crate) waiting: BTreeMap<u64, Vec<Token>>,
    /// Frames of guest RAM that have arrived for good.
    pub(crate) arrived: ArrivalMap,
    pub(crate) actions: VecDeque<Action>,
    pub(crate) counters: Counters,
}

impl Engine {
    /// An engine for a VM whose vCPUs are all just powered on (MSRs 0).
    pub fn new(config: EngineConfig) -> Engine {
        let vcpus = (0..config.vcpus).map(|_| Vcpu::new()).collect();
        Engine {
            arrived: ArrivalMap::new(&config.ram),
            config,
            vcpus,
            tokens: BTreeMap::new(),
            waiting: BTreeMap::new(),
            actions: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// The configuration the engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Every decision made so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Returns the counters and starts new ones from zero (for periodic export, and for model
    /// checkers, which compare protocol states without their history).
    pub fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }

    /// The next thing the VMM must do, in order; `None` when there is nothing left.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The protocol vCPU `vcpu` speaks now: `None` when APF is disabled, inert or the vCPU
    /// does not exist.
    pub fn version(&self, vcpu: usize) -> Option<Version> {
        self.vcpus.get(vcpu)?.version()
    }

    /// Guest-physical address of vCPU `vcpu`'s area while APF is active on it.
    pub fn area_gpa(&self, vcpu: usize) -> Option<u64> {
        self.vcpus.get(vcpu)?.area()
    }

    /// Tokens of vCPU `vcpu` between "not present" and "page ready" (0 for an unknown vCPU).
    pub fn outstanding(&self, vcpu: usize) -> usize {
        self.vcpus.get(vcpu).map_or(0, |v| v.outstanding)
    }

    /// True while `token` is outstanding (allocated and its "page ready" not handed out).
    pub fn is_outstanding(&self, token: Token) -> bool {
        self.tokens.contains_key(&token)
    }

    /// Tokens waiting for the frame holding `gpa`, in fault order.
    pub fn tokens_on_page(&self, gpa: u64) -> &[Token] {
        self.waiting.get(&page_of(gpa)).map_or(&[], Vec::as_slice)
    }

    /// The vCPU that took the "not present" of `token`, while it is outstanding (waiting for
    /// its page, or ready and not handed out yet); `None` for any other value. Callers ask
    /// this instead of decoding the token's bits.
    pub fn token_owner(&self, token: Token) -> Option<usize> {
        self.tokens.get(&token).map(|o| o.vcpu)
    }

    /// True when vCPU `vcpu` holds an outstanding token that still waits for the frame
    /// holding `gpa` (its page has not arrived). A VMM uses it to tell a late duplicate fault
    /// message, or another task of the same vCPU touching the same in-flight page, from a
    /// new fault.
    pub fn waits_on(&self, vcpu: usize, gpa: u64) -> bool {
        self.tokens_on_page(gpa)
            .iter()
            .any(|t| self.token_owner(*t) == Some(vcpu))
    }

    /// True when the frame holding `gpa` has arrived ([`page_arrived`](Engine::page_arrived))
    /// and not been evicted since. Always false outside guest RAM.
    pub fn is_arrived(&self, gpa: u64) -> bool {
        self.arrived.contains(gpa)
    }

    /// True while a wake-all is queued for vCPU `vcpu` and not handed out yet. A VMM that
    /// could both open a delivery window and report a fault for this vCPU at one entry
    /// should open the window first: the wake-all then goes out before the new "not
    /// present", so the new token is not covered by it and gets its own "page ready"
    /// (either order is correct; this one wakes the tasks left sleeping sooner).
    pub fn wake_all_pending(&self, vcpu: usize) -> bool {
        self.vcpus
            .get(vcpu)
            .is_some_and(|v| v.wake_all && v.version().is_some())
    }

    pub(crate) fn check_vcpu(&self, vcpu: usize) -> Result<(), Error> {
        if vcpu < self.vcpus.len() {
            Ok(())
        } else {
            Err(Error::NoSuchVcpu {
                vcpu,
                vcpus: self.vcpus.len(),
            })
        }
    }

    /// v2: vCPU `vcpu`'s token slot holds the wake-all the guest has not taken yet: the
    /// VMM read 0xffffffff there, or the engine handed out the write of it and it is not
    /// drained yet. The slot, not the ACK, is the evidence: only the guest frees it, and it
    /// does so in the interrupt handler (IF = 0, so no "not present" comes before the
    /// handler returns), whereas an ACK may be the late ACK of the previous "page ready"
    /// (the engine delivers into a freed slot without waiting for it), and a restored
    /// engine never saw the wake-all a snapshot carried in its slot.
    fn wake_all_in_slot(&self, vcpu: usize, state: &VcpuState) -> bool {
        let wake_all = Token::WAKE_ALL.get();
        let slot = self.vcpus[vcpu]
            .area()
            .map(|a| a.wrapping_add(TOKEN_OFFSET));
        state.area_token == wake_all
            || self.actions.iter().any(|a| {
                matches!(*a, Action::WriteArea { vcpu: v, gpa, value }
                    if v == vcpu && Some(gpa) == slot && value == wake_all)
            })
    }

    /// An injection for `vcpu` was handed out and not drained yet: it is an event pending.
    pub(crate) fn undrained_injection(&self, vcpu: usize) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(*a, Action::InjectPf { vcpu: v, .. } if v == vcpu))
    }

    /// vCPU `vcpu` faulted on the frame holding `gpa`, in state `state`.
    ///
    /// Either injects "page not present" (returns [`FaultOutcome::Injected`] and queues, in
    /// order, [`Action::WriteArea`] reason 1 at offset 0 then [`Action::InjectPf`] with CR2 =
    /// token) or answers [`FaultOutcome::Sync`]; either way the VMM fetches the page and
    /// reports [`page_arrived`](Engine::page_arrived). Another fault on a frame that already
    /// has tokens in flight gets its own token; all become ready together.
    ///
    /// A fault on a frame that has already arrived (the fault message came late) answers
    /// [`FaultOutcome::AlreadyPresent`]: no token, no action, the vCPU just re-enters. So no
    /// token ever waits for a page that already came.
    ///
    /// When [`wake_all_pending`](Engine::wake_all_pending) is true for `vcpu`, prefer
    /// opening a [`delivery_window`](Engine::delivery_window) first: a token injected before
    /// the wake-all is handed out is covered by it (no "page ready" of its own).
    pub fn fault(
        &mut self,
        vcpu: usize,
        gpa: u64,
        state: VcpuState,
    ) -> Result<FaultOutcome, Error> {
        if let Some(present) = self.count_fault(vcpu, gpa)? {
            return Ok(present);
        }
        if let Err(reason) = self.may_inject_not_present(vcpu, &state) {
            self.counters.fallback.record(reason);
            return Ok(FaultOutcome::Sync(reason));
        }
        let in_use_count = self.tokens.len().saturating_add(self.vcpus.len());
        let (tokens, vcpus) = (&self.tokens, &self.vcpus);
        let in_use =
            |t: Token| tokens.contains_key(&t) || vcpus.iter().any(|v| v.in_slot == Some(t));
        let mut next_id = vcpus[vcpu].next_id;
        let allocated = token::allocate(vcpu, &mut next_id, in_use_count, in_use);
        let v = &mut self.vcpus[vcpu];
        v.next_id = next_id;
        let (Some(token), Some(area)) = (allocated, v.area()) else {
            let reason = FallbackReason::TokensExhausted;
            self.counters.fallback.record(reason);
            return Ok(FaultOutcome::Sync(reason));
        };
        v.outstanding = v.outstanding.saturating_add(1);
        let page = page_of(gpa);
        self.tokens.insert(
            token,
            Outstanding {
                vcpu,
                page,
                ready: false,
            },
        );
        let on_page = self.waiting.entry(page).or_default();
        if !on_page.is_empty() {
            // "A userspace design can do better: a new token per faulting task" (§4).
            counters::bump(&mut self.counters.second_fault_same_page);
        }
        on_page.push(token);
        // "Not present: as in v1 — #PF, flags = 1, CR2 = token" (§3): reason first, then #PF.
        self.actions.push_back(Action::WriteArea {
            vcpu,
            gpa: area.wrapping_add(REASON_OFFSET),
            value: Reason::PageNotPresent.raw(),
        });
        self.actions.push_back(Action::InjectPf {
            vcpu,
            cr2: u64::from(token.get()),
            error_code: APF_ERROR_CODE,
        });
        counters::bump(&mut self.counters.injected);
        Ok(FaultOutcome::Injected(token))
    }

    /// vCPU `vcpu` faulted on the frame holding `gpa`, and the VMM chose to let it wait for
    /// the page (`reason`, e.g. [`FallbackReason::ShortWait`]) rather than ask for an APF: the
    /// fault is counted as one answered synchronously for that reason. Nothing else changes.
    pub fn decline(
        &mut self,
        vcpu: usize,
        gpa: u64,
        reason: FallbackReason,
    ) -> Result<FaultOutcome, Error> {
        if let Some(present) = self.count_fault(vcpu, gpa)? {
            return Ok(present);
        }
        self.counters.fallback.record(reason);
        Ok(FaultOutcome::Sync(reason))
    }

    /// Counts a fault of `vcpu` on `gpa`'s frame; `Some(AlreadyPresent)` when that frame has
    /// arrived (the fault is answered), `None` when it is still missing.
    fn count_fault(&mut self, vcpu: usize, gpa: u64) -> Result<Option<FaultOutcome>, Error> {
        self.check_vcpu(vcpu)?;
        counters::bump(&mut self.counters.faults);
        if self.arrived.contains(gpa) {
            counters::bump(&mut self.counters.faults_on_arrived);
            return Ok(Some(FaultOutcome::AlreadyPresent));
        }
        Ok(None)
    }

    /// Every rule that forbids "page not present" now, checked in [`FallbackReason::ALL`]
    /// order.
    fn may_inject_not_present(&self, vcpu: usize, state: &VcpuState) -> Result<(), FallbackReason> {
        let v = &self.vcpus[vcpu];
        let Some(en) = v.en.filter(|en| en.enabled()) else {
            return Err(FallbackReason::NotEnabled);
        };
        // Modern mode, ENABLED without DELIVERY_AS_INT: "current KVM hosts deliver nothing
        // unless bit 3 is set" (§3).
        if en.version().is_none() {
            return Err(FallbackReason::Inert);
        }
        // "Can inject "not present" only if: APF enabled, (SEND_ALWAYS or CPL 3), paging on,
        // interrupts allowed (IF = 1, no interrupt shadow), no exception/event pending
        // re-injection" (§4).
        if !state.paging {
            return Err(FallbackReason::PagingOff);
        }
        // SEND_ALWAYS (bit 1) is accepted in both modes (apf_abi::msr).
        if state.cpl != 3 && !en.send_always() {
            return Err(FallbackReason::NotUserMode);
        }
        // "Interrupts disabled (RFLAGS.IF = 0) inhibits APFs" (§2).
        if !state.interrupts_enabled {
            return Err(FallbackReason::InterruptsDisabled);
        }
        if state.interrupt_shadow {
            return Err(FallbackReason::InterruptShadow);
        }
        if state.event_pending || self.undrained_injection(vcpu) {
            return Err(FallbackReason::EventPending);
        }
        // "never overwrite a reason the guest has not consumed" (§2).
        if state.area_reason != 0 {
            return Err(FallbackReason::ReasonNotConsumed);
        }
        // v2: a wake-all sits in the token slot and the guest has not taken its interrupt.
        // A token injected now is not covered by it (it comes after the wake-all's delivery)
        // but its task would sleep before the interrupt is taken (the #PF goes first) and be
        // woken by it, and then get its own "page ready" too. Falling back until the guest
        // has taken the wake-all keeps "covered" exact.
        if en.version() == Some(Version::V2) && self.wake_all_in_slot(vcpu, state) {
            return Err(FallbackReason::WakeAllInFlight);
        }
        // "At most 64 outstanding APFs per vCPU; past that the fault is handled
        // synchronously" (§4).
        if v.outstanding >= self.config.max_outstanding_per_vcpu {
            return Err(FallbackReason::OutstandingLimit);
        }
        Ok(())
    }

    /// The frame holding `gpa` is now in guest memory, for good: every token waiting for it
    /// becomes ready and is queued for delivery. Returns how many tokens became ready.
    ///
    /// "Page ready is only sent for a token whose "not present" was actually injected" (§4):
    /// only injected faults have tokens, so a page that only synchronous faults waited for
    /// readies nothing.
    ///
    /// The engine remembers the arrival (frames in guest RAM only): a later
    /// [`fault`](Engine::fault) on the frame answers [`FaultOutcome::AlreadyPresent`], and a
    /// second report of the same arrival is a no-op, counted as
    /// [`Counters::duplicate_arrivals`](crate::Counters::duplicate_arrivals).
    pub fn page_arrived(&mut self, gpa: u64) -> usize {
        if self.arrived.insert(gpa) == Insert::Duplicate {
            counters::bump(&mut self.counters.duplicate_arrivals);
            return 0;
        }
        counters::bump(&mut self.counters.pages_arrived);
        let Some(tokens) = self.waiting.remove(&page_of(gpa)) else {
            return 0;
        };
        let mut n = 0;
        for token in tokens {
            let Some(o) = self.tokens.get_mut(&token) else {
                continue;
            };
            o.ready = true;
            if let Some(v) = self.vcpus.get_mut(o.vcpu) {
                v.ready.push_back(token);
                n += 1;
            }
        }
        counters::add(&mut self.counters.tokens_ready, n);
        n
    }

    /// The frame holding `gpa` is no longer in guest memory (the VMM dropped it, e.g. to
    /// fetch it again later): forget its arrival, so a later fault on it gets a token again.
    /// Returns whether it had arrived. Tokens are unaffected: none waits on an arrived frame.
    pub fn page_evicted(&mut self, gpa: u64) -> bool {
        let was = self.arrived.remove(gpa);
        if was {
            counters::bump(&mut self.counters.pages_evicted);
        }
        was
    }

    /// Removes a token whose "page ready" is being handed out.
    pub(crate) fn retire(&mut self, token: Token) {
        if let Some(o) = self.tokens.remove(&token)
            && let Some(v) = self.vcpus.get_mut(o.vcpu)
        {
            v.outstanding = v.outstanding.saturating_sub(1);
        }
    }

    /// Removes every outstanding token of `vcpu` (waiting or ready) from the tables and its
    /// ready queue. Returns how many there were.
    fn remove_tokens_of(&mut self, vcpu: usize) -> usize {
        let mine: Vec<Token> = self
            .tokens
            .iter()
            .filter(|(_, o)| o.vcpu == vcpu)
            .map(|(t, _)| *t)
            .collect();
        for t in &mine {
            if let Some(o) = self.tokens.remove(t)
                && let Some(list) = self.waiting.get_mut(&o.page)
            {
                list.retain(|x| x != t);
                if list.is_empty() {
                    self.waiting.remove(&o.page);
                }
            }
        }
        if let Some(v) = self.vcpus.get_mut(vcpu) {
            v.ready.retain(|t| !mine.contains(t));
            v.outstanding = 0;
        }
        mine.len()
    }

    /// A wake-all for `vcpu` is being handed out: "all outstanding APFs should be woken (no
    /// individual type 2 APFs will be sent)" (§2). Every token of `vcpu` outstanding now had
    /// its "not present" injected before this wake-all, so the guest's wake-all wakes its
    /// task: it is covered and gets no "page ready" of its own (its page still arrives;
    /// [`page_arrived`](Engine::page_arrived) then finds nothing). Tokens injected later are
    /// not covered. v1: a not-present and the wake-all's #PF cannot be injected at the same
    /// entry (one exception per entry, and an undrained injection holds the other), so
    /// "injected before" is exact; v2: see
    /// [`FallbackReason::WakeAllInFlight`](crate::FallbackReason::WakeAllInFlight).
    pub(crate) fn cover_by_wake_all(&mut self, vcpu: usize) {
        let n = self.remove_tokens_of(vcpu);
        counters::add(&mut self.counters.dropped.wake_all, n);
    }

    /// Drops everything queued or outstanding for `vcpu`: its tokens (no "page ready" will be
    /// sent for them), its wake-all, its v2 slot state, and actions not drained yet.
    pub(crate) fn drop_vcpu(&mut self, vcpu: usize, cause: DropCause) {
        let n = self.remove_tokens_of(vcpu);
        let d = &mut self.counters.dropped;
        let c = match cause {
            DropCause::Disable => &mut d.disable,
            DropCause::Reset => &mut d.reset,
            DropCause::Restore => &mut d.restore,
        };
        counters::add(c, n);
        self.actions.retain(|a| a.vcpu() != vcpu);
        if let Some(v) = self.vcpus.get_mut(vcpu) {
            if v.wake_all {
                counters::bump(&mut self.counters.wake_all_dropped);
            }
            v.ready.clear();
            v.wake_all = false;
            v.awaiting_ack = false;
            v.in_slot = None;
            v.blocked = false;
        }
    }

    /// vCPU reset (INIT or power cycle): "both MSRs 0, queue cleared" (§4).
    pub fn reset(&mut self, vcpu: usize) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        self.drop_vcpu(vcpu, DropCause::Reset);
        if let Some(v) = self.vcpus.get_mut(vcpu) {
            v.en = None;
            v.int = None;
        }
        counters::bump(&mut self.counters.resets);
        Ok(())
    }

    /// Checks the engine's internal consistency; used by tests and model checkers.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut owned = vec![0usize; self.vcpus.len()];
        for (t, o) in &self.tokens {
            if !t.is_individual() {
                return Err(format!("broadcast token {t:?} outstanding"));
            }
            let Some(n) = owned.get_mut(o.vcpu) else {
                return Err(format!("{t:?} owned by unknown vCPU {}", o.vcpu));
            };
            *n += 1;
            let waits = self.waiting.get(&o.page).is_some_and(|l| l.contains(t));
            let queued = self.vcpus[o.vcpu].ready.contains(t);
            if o.ready == waits || o.ready != queued {
                return Err(format!("{t:?} {o:?}: waiting {waits}, queued {queued}"));
            }
            if self.vcpus[o.vcpu].version().is_none() {
                return Err(format!("{t:?} outstanding on a disabled vCPU"));
            }
        }
        for (page, list) in &self.waiting {
            if list.is_empty()
                || list
                    .iter()
                    .any(|t| self.tokens.get(t).is_none_or(|o| o.page != *page))
            {
                return Err(format!("waiting list of {page:#x} inconsistent"));
            }
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.outstanding != owned[i] {
                return Err(format!(
                    "vCPU {i}: outstanding {} != {}",
                    v.outstanding, owned[i]
                ));
            }
            if v.outstanding > self.config.max_outstanding_per_vcpu {
                return Err(format!("vCPU {i}: over the outstanding limit"));
            }
            if v.ready.len()
                != self
                    .tokens
                    .values()
                    .filter(|o| o.vcpu == i && o.ready)
                    .count()
            {
                return Err(format!("vCPU {i}: ready queue inconsistent"));
            }
            if v.version().is_none() && (v.wake_all || v.awaiting_ack) {
                return Err(format!("vCPU {i}: delivery state while disabled"));
            }
        }
        if let Some(page) = self.waiting.keys().find(|p| self.arrived.contains(**p)) {
            return Err(format!("tokens wait for {page:#x}, which has arrived"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use apf_abi::PvFeatures;
    use apf_abi::msr::MSR_KVM_ASYNC_PF_EN;

    use super::*;
    use crate::testutil::{PAGE, area, drain, engine, v1, v2};
    use crate::{EngineConfig, RamMap};

    fn sync(e: &mut Engine, state: VcpuState) -> FallbackReason {
        match e.fault(0, PAGE, state).unwrap() {
            FaultOutcome::Sync(r) => r,
            other => panic!("{other:?} in {state:?}"),
        }
    }

    fn injected(e: &mut Engine, vcpu: usize, gpa: u64, state: VcpuState) -> Token {
        match e.fault(vcpu, gpa, state).unwrap() {
            FaultOutcome::Injected(t) => t,
            other => panic!("not injected: {other:?}"),
        }
    }

    #[test]
    fn not_present_needs_apf_enabled() {
        for features in [PvFeatures(0), PvFeatures::SEED, PvFeatures::MODERN] {
            let mut e = engine(features, 1);
            assert_eq!(sync(&mut e, VcpuState::USER), FallbackReason::NotEnabled);
        }
        let mut e = v1(1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0)).unwrap();
        assert_eq!(sync(&mut e, VcpuState::USER), FallbackReason::NotEnabled);
        assert!(drain(&mut e).is_empty());
    }

    #[test]
    fn modern_enabled_without_delivery_as_int_falls_back_inert() {
        let mut e = engine(PvFeatures::MODERN, 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        assert_eq!(sync(&mut e, VcpuState::USER), FallbackReason::Inert);
        assert_eq!(e.counters().fallback.get(FallbackReason::Inert), 1);
    }

    #[test]
    fn not_present_needs_paging_on() {
        for mut e in [v1(1), v2(1)] {
            let s = VcpuState {
                paging: false,
                ..VcpuState::USER
            };
            assert_eq!(sync(&mut e, s), FallbackReason::PagingOff);
        }
    }

    #[test]
    fn not_present_needs_cpl_3_without_send_always() {
        for mut e in [v1(1), v2(1)] {
            for cpl in 0..3 {
                let s = VcpuState {
                    cpl,
                    ..VcpuState::USER
                };
                assert_eq!(sync(&mut e, s), FallbackReason::NotUserMode);
            }
        }
    }

    #[test]
    fn send_always_allows_cpl_0() {
        let mut e = v2(1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 0b1011)
            .unwrap();
        drain(&mut e);
        injected(&mut e, 0, PAGE, VcpuState::KERNEL);
    }

    /// Issue 14 item 10: Linux guests of 2.6.38 to 5.8 built with CONFIG_PREEMPT enable v1
    /// with SEND_ALWAYS; it means what it means in v2.
    #[test]
    fn seed_mode_send_always_allows_cpl_0() {
        let mut e = v1(1);
        assert_eq!(sync(&mut e, VcpuState::KERNEL), FallbackReason::NotUserMode);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 0b11).unwrap();
        assert_eq!(e.version(0), Some(Version::V1));
        assert_eq!(e.msr_read(0, MSR_KVM_ASYNC_PF_EN), Ok(area(0) | 0b11));
        injected(&mut e, 0, PAGE, VcpuState::KERNEL);
        drain(&mut e);
        // Without it again: CPL 3 only.
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        e.delivery_window(0, VcpuState::USER).unwrap();
        drain(&mut e);
        assert_eq!(
            match e.fault(0, PAGE + 0x1000, VcpuState::KERNEL).unwrap() {
                FaultOutcome::Sync(r) => r,
                other => panic!("{other:?}"),
            },
            FallbackReason::NotUserMode
        );
    }

    #[test]
    fn not_present_never_while_if_0() {
        for mut e in [v1(1), v2(1)] {
            let s = VcpuState {
                interrupts_enabled: false,
                ..VcpuState::USER
            };
            assert_eq!(sync(&mut e, s), FallbackReason::InterruptsDisabled);
        }
    }

    #[test]
    fn not_present_never_in_an_interrupt_shadow() {
        for mut e in [v1(1), v2(1)] {
            let s = VcpuState {
                interrupt_shadow: true,
                ..VcpuState::USER
            };
            assert_eq!(sync(&mut e, s), FallbackReason::InterruptShadow);
        }
    }

    #[test]
    fn not_present_never_with_an_event_pending() {
        for mut e in [v1(1), v2(1)] {
            let s = VcpuState {
                event_pending: true,
                ..VcpuState::USER
            };
            assert_eq!(sync(&mut e, s), FallbackReason::EventPending);
        }
    }

    #[test]
    fn not_present_never_over_an_undrained_injection() {
        let mut e = v1(1);
        injected(&mut e, 0, PAGE, VcpuState::USER);
        assert_eq!(sync(&mut e, VcpuState::USER), FallbackReason::EventPending);
        drain(&mut e);
        injected(&mut e, 0, PAGE, VcpuState::USER);
    }

    #[test]
    fn not_present_never_overwrites_an_unconsumed_reason() {
        for mut e in [v1(1), v2(1)] {
            for reason in [1, 2, 0xdead] {
                let s = VcpuState {
                    area_reason: reason,
                    ..VcpuState::USER
                };
                assert_eq!(sync(&mut e, s), FallbackReason::ReasonNotConsumed);
            }
        }
    }

    #[test]
    fn outstanding_limit_64_then_synchronous() {
        let mut e = v2(1);
        for i in 0..64u64 {
            injected(&mut e, 0, PAGE + (i << 12), VcpuState::USER);
            drain(&mut e);
        }
        assert_eq!(e.outstanding(0), 64);
        assert_eq!(
            sync(&mut e, VcpuState::USER),
            FallbackReason::OutstandingLimit
        );
        // Once one is handed out, there is room again.
        e.page_arrived(PAGE);
        e.delivery_window(0, VcpuState::USER).unwrap();
        drain(&mut e);
        assert_eq!(e.outstanding(0), 63);
        injected(&mut e, 0, PAGE + (64 << 12), VcpuState::USER);
    }

    #[test]
    fn outstanding_limit_is_configurable_and_per_vcpu() {
        let mut config = EngineConfig::new(PvFeatures::SEED, 2, RamMap::single(0..0x10_0000));
        config.max_outstanding_per_vcpu = 1;
        let mut e = Engine::new(config);
        for v in 0..2 {
            e.msr_write(v, MSR_KVM_ASYNC_PF_EN, area(v) | 1).unwrap();
        }
        injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        assert_eq!(
            sync(&mut e, VcpuState::USER),
            FallbackReason::OutstandingLimit
        );
        injected(&mut e, 1, PAGE, VcpuState::USER);
    }

    #[test]
    fn not_present_writes_reason_1_then_injects_pf_with_cr2_token() {
        for mut e in [v1(1), v2(1)] {
            let t = injected(&mut e, 0, PAGE + 0x123, VcpuState::USER);
            assert_eq!(
                drain(&mut e),
                [
                    Action::WriteArea {
                        vcpu: 0,
                        gpa: area(0),
                        value: 1
                    },
                    Action::InjectPf {
                        vcpu: 0,
                        cr2: u64::from(t.get()),
                        error_code: 0
                    },
                ]
            );
            assert_eq!(e.tokens_on_page(PAGE), [t]);
            assert_eq!(e.counters().injected, 1);
        }
    }

    #[test]
    fn token_is_linux_scheme_id_shl_12_or_vcpu() {
        let mut e = v1(2);
        assert_eq!(injected(&mut e, 0, PAGE, VcpuState::USER).get(), 0x1000);
        assert_eq!(injected(&mut e, 1, PAGE, VcpuState::USER).get(), 0x1001);
        drain(&mut e);
        assert_eq!(injected(&mut e, 0, PAGE, VcpuState::USER).get(), 0x2000);
    }

    #[test]
    fn tokens_unique_among_outstanding_never_0_never_broadcast() {
        let mut e = v2(3);
        let mut seen = BTreeSet::new();
        for round in 0..20u64 {
            for v in 0..3 {
                let t = injected(&mut e, v, PAGE + (round << 12), VcpuState::USER);
                drain(&mut e);
                assert!(t.is_individual() && t.get() != 0);
                assert!(seen.insert(t), "{t:?} reused while outstanding");
            }
        }
        e.check_invariants().unwrap();
    }

    #[test]
    fn token_not_reused_across_id_wrap_while_outstanding() {
        let mut e = v1(1);
        let first = injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        // Jump the id counter to just before it wraps onto `first` again.
        e.vcpus[0].next_id = token::IDS_PER_VCPU - 1;
        let a = injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        let b = injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        assert_eq!(a.get(), 0xffff_f000);
        assert_ne!(b, first, "0x1000 still outstanding, skipped");
        assert_eq!(b.get(), 0x2000);
    }

    #[test]
    fn second_fault_on_a_page_in_flight_gets_its_own_token() {
        let mut e = v1(2);
        let a = injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        let b = injected(&mut e, 0, PAGE + 8, VcpuState::USER);
        let c = injected(&mut e, 1, PAGE + 16, VcpuState::USER);
        drain(&mut e);
        assert!(a != b && b != c && a != c);
        assert_eq!(e.tokens_on_page(PAGE), [a, b, c]);
        assert_eq!(e.counters().second_fault_same_page, 2);
        // Both become ready when the page arrives.
        assert_eq!(e.page_arrived(PAGE + 0xfff), 3);
        assert!(e.tokens_on_page(PAGE).is_empty());
        assert!(e.pending_delivery(0) && e.pending_delivery(1));
    }

    #[test]
    fn page_ready_only_for_injected_tokens() {
        let mut e = v1(1);
        let s = VcpuState {
            interrupts_enabled: false,
            ..VcpuState::USER
        };
        assert!(matches!(
            e.fault(0, PAGE, s).unwrap(),
            FaultOutcome::Sync(_)
        ));
        assert_eq!(e.page_arrived(PAGE), 0);
        assert_eq!(e.page_arrived(0x9000), 0);
        assert!(!e.pending_delivery(0));
        assert_eq!(e.counters().pages_arrived, 2);
    }

    #[test]
    fn a_declined_fault_is_counted_as_synchronous_and_changes_nothing() {
        let mut e = v2(1);
        let before = e.clone();
        assert_eq!(
            e.decline(0, PAGE, FallbackReason::ShortWait),
            Ok(FaultOutcome::Sync(FallbackReason::ShortWait))
        );
        assert_eq!(e.counters().fallback.get(FallbackReason::ShortWait), 1);
        assert_eq!(e.counters().faults, 1);
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.tokens, before.tokens);
        e.page_arrived(PAGE);
        assert_eq!(
            e.decline(0, PAGE, FallbackReason::ShortWait),
            Ok(FaultOutcome::AlreadyPresent)
        );
        assert!(e.decline(5, PAGE, FallbackReason::ShortWait).is_err());
    }

    #[test]
    fn fallbacks_are_counted_by_reason() {
        let mut e = v1(1);
        sync(&mut e, VcpuState::KERNEL);
        sync(&mut e, VcpuState::KERNEL);
        sync(
            &mut e,
            VcpuState {
                paging: false,
                ..VcpuState::USER
            },
        );
        let f = &e.counters().fallback;
        assert_eq!(f.get(FallbackReason::NotUserMode), 2);
        assert_eq!(f.get(FallbackReason::PagingOff), 1);
        assert_eq!(f.total(), 3);
        assert_eq!(e.counters().faults, 3);
    }

    #[test]
    fn reset_clears_both_msrs_and_the_queues() {
        let mut e = v2(1);
        let t = injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        injected(&mut e, 0, PAGE + 0x1000, VcpuState::USER);
        e.page_arrived(PAGE);
        e.reset(0).unwrap();
        assert!(
            drain(&mut e).is_empty(),
            "undrained actions of the vCPU are dropped"
        );
        assert_eq!(e.msr_read(0, MSR_KVM_ASYNC_PF_EN), Ok(0));
        assert_eq!(e.msr_read(0, apf_abi::msr::MSR_KVM_ASYNC_PF_INT), Ok(0));
        assert_eq!(e.outstanding(0), 0);
        assert!(!e.is_outstanding(t));
        assert!(!e.pending_delivery(0));
        assert_eq!(e.counters().dropped.reset, 2);
        assert_eq!(e.page_arrived(PAGE + 0x1000), 0);
        e.check_invariants().unwrap();
    }

    #[test]
    fn fault_on_an_arrived_page_is_already_present() {
        for mut e in [v1(2), v2(2)] {
            let t = injected(&mut e, 0, PAGE, VcpuState::USER);
            drain(&mut e);
            assert_eq!(e.page_arrived(PAGE + 0x10), 1);
            assert!(e.is_arrived(PAGE) && e.is_arrived(PAGE + 0xfff));
            assert!(!e.is_arrived(PAGE + 0x1000));
            // A late fault message for the page: no token, no action, whatever the state.
            for (v, s) in [(0, VcpuState::USER), (1, VcpuState::KERNEL)] {
                assert_eq!(
                    e.fault(v, PAGE + 0x800, s),
                    Ok(FaultOutcome::AlreadyPresent)
                );
            }
            assert!(drain(&mut e).is_empty());
            assert_eq!(e.counters().faults_on_arrived, 2);
            assert_eq!(e.counters().faults, 3);
            assert_eq!(e.counters().injected, 1);
            assert!(e.tokens_on_page(PAGE).is_empty());
            assert_eq!(e.outstanding(1), 0);
            // The token that did wait still gets its "page ready".
            assert!(e.is_outstanding(t));
            // A disabled vCPU's late fault is "already present" too: the page is there.
            e.msr_write(1, MSR_KVM_ASYNC_PF_EN, 0).unwrap();
            assert_eq!(
                e.fault(1, PAGE, VcpuState::USER),
                Ok(FaultOutcome::AlreadyPresent)
            );
            e.check_invariants().unwrap();
        }
    }

    #[test]
    fn a_duplicate_arrival_is_a_counted_no_op() {
        let mut e = v1(1);
        injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        assert_eq!(e.page_arrived(PAGE), 1);
        assert_eq!(e.page_arrived(PAGE + 8), 0);
        assert_eq!(e.counters().pages_arrived, 1);
        assert_eq!(e.counters().duplicate_arrivals, 1);
        assert_eq!(e.counters().tokens_ready, 1);
        // Outside guest RAM nothing is remembered, so nothing is a duplicate.
        let outside = 0x4000_0000;
        assert_eq!(e.page_arrived(outside), 0);
        assert_eq!(e.page_arrived(outside), 0);
        assert!(!e.is_arrived(outside));
        assert_eq!(e.counters().pages_arrived, 3);
        assert_eq!(e.counters().duplicate_arrivals, 1);
    }

    #[test]
    fn an_evicted_page_gets_tokens_again() {
        let mut e = v1(1);
        e.page_arrived(PAGE);
        assert!(e.page_evicted(PAGE + 1));
        assert!(!e.page_evicted(PAGE), "evicted once");
        assert!(!e.is_arrived(PAGE));
        injected(&mut e, 0, PAGE, VcpuState::USER);
        assert_eq!(e.counters().pages_evicted, 1);
        assert_eq!(e.page_arrived(PAGE), 1);
        e.check_invariants().unwrap();
    }

    #[test]
    fn token_owner_is_the_faulting_vcpu_while_outstanding() {
        let mut e = v2(3);
        let t = injected(&mut e, 2, PAGE, VcpuState::USER);
        drain(&mut e);
        assert_eq!(e.token_owner(t), Some(2));
        e.page_arrived(PAGE);
        assert_eq!(e.token_owner(t), Some(2), "ready, not handed out yet");
        e.delivery_window(2, VcpuState::USER).unwrap();
        assert_eq!(e.token_owner(t), None, "its page ready is out");
        assert_eq!(e.token_owner(Token::WAKE_ALL), None);
        assert_eq!(e.token_owner(Token::new(0x1000).unwrap()), None);
    }

    #[test]
    fn waits_on_until_the_page_arrives() {
        let mut e = v1(2);
        injected(&mut e, 0, PAGE, VcpuState::USER);
        drain(&mut e);
        assert!(e.waits_on(0, PAGE + 0xabc));
        assert!(!e.waits_on(1, PAGE), "vCPU 1 holds no token on it");
        assert!(!e.waits_on(0, PAGE + 0x1000));
        injected(&mut e, 1, PAGE + 8, VcpuState::USER);
        assert!(e.waits_on(1, PAGE));
        e.page_arrived(PAGE);
        assert!(!e.waits_on(0, PAGE) && !e.waits_on(1, PAGE));
        assert!(!e.waits_on(7, PAGE), "unknown vCPU");
    }
}
