//! "Page ready" delivery: v1 as #PF reason 2, v2 as token at offset 4 plus an interrupt.

use apf_abi::area::{REASON_OFFSET, TOKEN_OFFSET};
use apf_abi::{Reason, Token, Version};

use crate::action::{APF_ERROR_CODE, Action, Delivery, HoldReason};
use crate::counters;
use crate::engine::Engine;
use crate::error::Error;
use crate::state::VcpuState;

impl Engine {
    /// vCPU `vcpu` is about to enter the guest in state `state` and may take a delivery now.
    ///
    /// Hands out at most one "page ready" (or wake-all) per call, as actions in the order to
    /// perform them: the area write, then the #PF (v1) or the interrupt (v2). Call it again
    /// after the guest has run while [`pending_delivery`](Engine::pending_delivery) is true.
    ///
    /// A queued wake-all goes first. Handing it out is the moment it covers tokens: every
    /// token of the vCPU outstanding then (its "not present" injected before) leaves the
    /// tables and gets no "page ready" of its own; later tokens are not covered. When a fault
    /// of this vCPU waits too, open the window first
    /// ([`wake_all_pending`](Engine::wake_all_pending)).
    ///
    /// v1 rules: IF = 1, no interrupt shadow, no event pending, reason at offset 0 consumed;
    /// any CPL (KVM's page-present check is "interrupts allowed, no re-injection" only),
    /// paging not required. A ready goes to the vCPU that faulted, as KVM does. With
    /// [`EngineConfig::v1_ready_on_other_vcpus`](crate::EngineConfig::v1_ready_on_other_vcpus)
    /// a vCPU with nothing of its own also takes the oldest ready token of another v1 vCPU
    /// whose last window was held ("Type 2 is delivered on the same vCPU as its type 1
    /// today, but the guest must not rely on it", §2), so a ready is not stuck behind a
    /// vCPU that cannot take it; see that field for why it is off by default.
    ///
    /// v2 rules: the slot at offset 4 is free (0) and a vector was written to `_INT`; the
    /// interrupt controller holds the interrupt until IF = 1, so CPL/IF do not matter here.
    pub fn delivery_window(&mut self, vcpu: usize, state: VcpuState) -> Result<Delivery, Error> {
        self.check_vcpu(vcpu)?;
        Ok(match self.vcpus[vcpu].version() {
            None => Delivery::Nothing,
            Some(Version::V1) => self.deliver_v1(vcpu, &state),
            Some(Version::V2) => self.deliver_v2(vcpu, &state),
        })
    }

    /// True when vCPU `vcpu` has something to deliver and the VMM should make it exit (kick,
    /// interrupt window) to call [`delivery_window`](Engine::delivery_window).
    ///
    /// v2: false while a raised "page ready" awaits its ACK (the ACK exit is the next
    /// chance; kicking before it only burns exits) and while no vector is set.
    pub fn pending_delivery(&self, vcpu: usize) -> bool {
        let Some(v) = self.vcpus.get(vcpu) else {
            return false;
        };
        match v.version() {
            None => false,
            Some(Version::V1) => v.has_own_pending() || self.stealable_from(vcpu).is_some(),
            Some(Version::V2) => v.has_own_pending() && !v.awaiting_ack && v.int.is_some(),
        }
    }

    /// Every vCPU for which [`pending_delivery`](Engine::pending_delivery) is true.
    pub fn pending_deliveries(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.vcpus.len()).filter(|&v| self.pending_delivery(v))
    }

    /// The v1 vCPU (other than `thief`) whose ready tokens `thief` may take, scanning from
    /// `thief + 1` round-robin: its last window was held and it has a ready token.
    fn stealable_from(&self, thief: usize) -> Option<usize> {
        if !self.config.v1_ready_on_other_vcpus {
            return None;
        }
        let n = self.vcpus.len();
        (1..n).map(|k| (thief + k) % n).find(|&u| {
            let v = &self.vcpus[u];
            v.blocked && !v.ready.is_empty() && v.version() == Some(Version::V1)
        })
    }

    fn hold(&mut self, vcpu: usize, reason: HoldReason) -> Delivery {
        self.counters.held.record(reason);
        if let Some(v) = self.vcpus.get_mut(vcpu)
            && v.has_own_pending()
        {
            v.blocked = true;
        }
        Delivery::Held(reason)
    }

    fn deliver_v1(&mut self, vcpu: usize, state: &VcpuState) -> Delivery {
        let v = &self.vcpus[vcpu];
        let foreign = if v.has_own_pending() {
            None
        } else {
            match self.stealable_from(vcpu) {
                Some(u) => Some(u),
                None => return Delivery::Nothing,
            }
        };
        // A v1 "page ready" is a #PF: "the host must never inject while IF = 0, and never
        // overwrite a reason the guest has not consumed" (§2); and like any injection, not
        // in an interrupt shadow or over a pending event.
        if !state.interrupts_enabled {
            return self.hold(vcpu, HoldReason::InterruptsDisabled);
        }
        if state.interrupt_shadow {
            return self.hold(vcpu, HoldReason::InterruptShadow);
        }
        if state.event_pending || self.undrained_injection(vcpu) {
            return self.hold(vcpu, HoldReason::EventPending);
        }
        if state.area_reason != 0 {
            return self.hold(vcpu, HoldReason::ReasonNotConsumed);
        }
        let Some(area) = self.vcpus[vcpu].area() else {
            return Delivery::Nothing;
        };
        let (token, from_vcpu) = if let Some(u) = foreign {
            let Some(t) = self.vcpus[u].ready.pop_front() else {
                return Delivery::Nothing;
            };
            counters::bump(&mut self.counters.page_ready_cross_vcpu);
            (t, u)
        } else {
            let Some(t) = self.take_own(vcpu) else {
                return Delivery::Nothing;
            };
            self.vcpus[vcpu].blocked = false;
            (t, vcpu)
        };
        self.retire_delivered(vcpu, token);
        // "Type 2: CR2 holds the token of the page that is now available" (§2).
        self.actions.push_back(Action::WriteArea {
            vcpu,
            gpa: area.wrapping_add(REASON_OFFSET),
            value: Reason::PageReady.raw(),
        });
        self.actions.push_back(Action::InjectPf {
            vcpu,
            cr2: u64::from(token.get()),
            error_code: APF_ERROR_CODE,
        });
        Delivery::Delivered { token, from_vcpu }
    }

    fn deliver_v2(&mut self, vcpu: usize, state: &VcpuState) -> Delivery {
        let v = &mut self.vcpus[vcpu];
        if state.area_token == 0 && !v.awaiting_ack {
            v.in_slot = None;
        }
        if !v.has_own_pending() {
            return Delivery::Nothing;
        }
        // "The guest writes `_INT` before `_EN`, or interrupt 0 could be injected" (§3): the
        // engine never raises a vector that was not written; the ready waits for `_INT`.
        let Some(int) = v.int else {
            return self.hold(vcpu, HoldReason::NoVector);
        };
        // "the host delivers the next pending "page ready" only once the token slot is 0"
        // (§3); a slot write handed out but not drained yet counts as occupied.
        let undrained = self
            .actions
            .iter()
            .any(|a| matches!(*a, Action::RaiseInterrupt { vcpu: x, .. } if x == vcpu));
        if state.area_token != 0 || undrained {
            return self.hold(vcpu, HoldReason::TokenSlotBusy);
        }
        let Some(area) = self.vcpus[vcpu].area() else {
            return Delivery::Nothing;
        };
        let Some(token) = self.take_own(vcpu) else {
            return Delivery::Nothing;
        };
        self.retire_delivered(vcpu, token);
        let v = &mut self.vcpus[vcpu];
        v.awaiting_ack = true;
        v.in_slot = Some(token);
        // "the host writes the token at offset 4 and raises the interrupt vector given in
        // `MSR_KVM_ASYNC_PF_INT`" (§3).
        self.actions.push_back(Action::WriteArea {
            vcpu,
            gpa: area.wrapping_add(TOKEN_OFFSET),
            value: token.get(),
        });
        self.actions.push_back(Action::RaiseInterrupt {
            vcpu,
            vector: int.vector(),
        });
        Delivery::Delivered {
            token,
            from_vcpu: vcpu,
        }
    }

    /// The next of `vcpu`'s own deliveries: the wake-all first (it covers every token of
    /// the vCPU outstanding when it goes out, ready ones included), then ready tokens in
    /// arrival order.
    fn take_own(&mut self, vcpu: usize) -> Option<Token> {
        let v = &mut self.vcpus[vcpu];
        if v.wake_all {
            v.wake_all = false;
            return Some(Token::WAKE_ALL);
        }
        v.ready.pop_front()
    }

    /// `token`'s delivery on `vcpu` is handed out now.
    fn retire_delivered(&mut self, vcpu: usize, token: Token) {
        if token.is_wake_all() {
            counters::bump(&mut self.counters.wake_all_delivered);
            self.cover_by_wake_all(vcpu);
        } else {
            self.retire(token);
            counters::bump(&mut self.counters.page_ready_delivered);
        }
    }
}

#[cfg(test)]
mod tests {
    use apf_abi::PvFeatures;
    use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};

    use super::*;
    use crate::testutil::{PAGE, VECTOR, area, drain, engine, v1, v2};
    use crate::{FallbackReason, FaultOutcome, VcpuState};

    fn inject(e: &mut Engine, vcpu: usize, gpa: u64) -> Token {
        let FaultOutcome::Injected(t) = e.fault(vcpu, gpa, VcpuState::USER).unwrap() else {
            panic!("fell back")
        };
        drain(e);
        t
    }

    fn delivered(d: Delivery) -> Token {
        match d {
            Delivery::Delivered { token, .. } => token,
            other => panic!("not delivered: {other:?}"),
        }
    }

    fn held(e: &mut Engine, vcpu: usize, s: VcpuState) -> HoldReason {
        match e.delivery_window(vcpu, s).unwrap() {
            Delivery::Held(r) => r,
            other => panic!("not held: {other:?}"),
        }
    }

    #[test]
    fn v1_page_ready_is_pf_with_reason_2_and_cr2_token() {
        let mut e = v1(1);
        let t = inject(&mut e, 0, PAGE);
        assert!(!e.pending_delivery(0), "nothing before the page arrives");
        assert_eq!(e.delivery_window(0, VcpuState::USER), Ok(Delivery::Nothing));
        e.page_arrived(PAGE);
        assert!(e.pending_delivery(0));
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), t);
        assert_eq!(
            drain(&mut e),
            [
                Action::WriteArea {
                    vcpu: 0,
                    gpa: area(0),
                    value: 2
                },
                Action::InjectPf {
                    vcpu: 0,
                    cr2: u64::from(t.get()),
                    error_code: 0
                },
            ]
        );
        assert!(!e.is_outstanding(t));
        assert!(!e.pending_delivery(0));
        assert_eq!(e.counters().page_ready_delivered, 1);
    }

    #[test]
    fn v1_page_ready_never_while_if_0() {
        let mut e = v1(1);
        inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        let s = VcpuState {
            interrupts_enabled: false,
            ..VcpuState::USER
        };
        assert_eq!(held(&mut e, 0, s), HoldReason::InterruptsDisabled);
        assert!(drain(&mut e).is_empty());
        assert!(e.pending_delivery(0));
    }

    #[test]
    fn v1_page_ready_never_in_an_interrupt_shadow() {
        let mut e = v1(1);
        inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        let s = VcpuState {
            interrupt_shadow: true,
            ..VcpuState::USER
        };
        assert_eq!(held(&mut e, 0, s), HoldReason::InterruptShadow);
    }

    #[test]
    fn v1_page_ready_never_with_an_event_pending() {
        let mut e = v1(1);
        inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        let s = VcpuState {
            event_pending: true,
            ..VcpuState::USER
        };
        assert_eq!(held(&mut e, 0, s), HoldReason::EventPending);
        // Nor over an injection handed out and not drained yet.
        e.fault(0, PAGE + 0x1000, VcpuState::USER).unwrap();
        assert_eq!(held(&mut e, 0, VcpuState::USER), HoldReason::EventPending);
        assert_eq!(e.counters().held.get(HoldReason::EventPending), 2);
    }

    #[test]
    fn v1_page_ready_never_overwrites_an_unconsumed_reason() {
        let mut e = v1(1);
        inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        let s = VcpuState {
            area_reason: 1,
            ..VcpuState::USER
        };
        assert_eq!(held(&mut e, 0, s), HoldReason::ReasonNotConsumed);
        delivered(e.delivery_window(0, VcpuState::USER).unwrap());
    }

    #[test]
    fn v1_page_ready_at_cpl_0_is_allowed_like_kvm() {
        let mut e = v1(1);
        let t = inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        let s = VcpuState {
            paging: false,
            ..VcpuState::KERNEL
        };
        assert_eq!(delivered(e.delivery_window(0, s).unwrap()), t);
    }

    #[test]
    fn v1_one_delivery_per_window() {
        let mut e = v1(1);
        let a = inject(&mut e, 0, PAGE);
        let b = inject(&mut e, 0, PAGE + 0x1000);
        e.page_arrived(PAGE + 0x1000);
        e.page_arrived(PAGE);
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), b);
        assert_eq!(drain(&mut e).len(), 2);
        assert!(e.pending_delivery(0));
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), a);
    }

    #[test]
    fn v1_page_ready_prefers_the_faulting_vcpu() {
        let mut e = v1(2);
        e.config.v1_ready_on_other_vcpus = true;
        let t = inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        assert!(e.pending_delivery(0));
        assert!(
            !e.pending_delivery(1),
            "vCPU 1 is not invited while vCPU 0 may take it"
        );
        assert_eq!(e.delivery_window(1, VcpuState::USER), Ok(Delivery::Nothing));
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), t);
    }

    #[test]
    fn v1_page_ready_stays_on_the_faulting_vcpu_by_default() {
        let mut e = v1(2);
        inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        held(
            &mut e,
            0,
            VcpuState {
                interrupts_enabled: false,
                ..VcpuState::USER
            },
        );
        assert!(!e.pending_delivery(1));
        assert_eq!(e.delivery_window(1, VcpuState::USER), Ok(Delivery::Nothing));
        assert!(e.pending_delivery(0));
    }

    #[test]
    fn v1_page_ready_goes_to_another_vcpu_when_the_faulting_one_is_blocked() {
        let mut e = v1(2);
        e.config.v1_ready_on_other_vcpus = true;
        let t = inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        let cli = VcpuState {
            interrupts_enabled: false,
            ..VcpuState::USER
        };
        held(&mut e, 0, cli);
        assert!(e.pending_delivery(1), "vCPU 1 is invited now");
        assert_eq!(
            e.delivery_window(1, VcpuState::KERNEL),
            Ok(Delivery::Delivered {
                token: t,
                from_vcpu: 0
            })
        );
        assert_eq!(
            drain(&mut e),
            [
                Action::WriteArea {
                    vcpu: 1,
                    gpa: area(1),
                    value: 2
                },
                Action::InjectPf {
                    vcpu: 1,
                    cr2: u64::from(t.get()),
                    error_code: 0
                },
            ]
        );
        assert_eq!(e.counters().page_ready_cross_vcpu, 1);
        assert!(!e.pending_delivery(0) && !e.pending_delivery(1));
        e.check_invariants().unwrap();
    }

    #[test]
    fn v1_wake_all_stays_on_the_vcpu_that_enabled() {
        let mut e = engine(PvFeatures::SEED, 2);
        e.config.v1_ready_on_other_vcpus = true;
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        e.msr_write(1, MSR_KVM_ASYNC_PF_EN, area(1) | 1).unwrap();
        e.delivery_window(1, VcpuState::USER).unwrap();
        drain(&mut e);
        held(
            &mut e,
            0,
            VcpuState {
                interrupts_enabled: false,
                ..VcpuState::USER
            },
        );
        assert_eq!(e.delivery_window(1, VcpuState::USER), Ok(Delivery::Nothing));
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
    }

    #[test]
    fn v2_page_ready_is_token_at_offset_4_then_interrupt() {
        let mut e = v2(1);
        let t = inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        assert!(e.pending_delivery(0));
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), t);
        assert_eq!(
            drain(&mut e),
            [
                Action::WriteArea {
                    vcpu: 0,
                    gpa: area(0) + 4,
                    value: t.get()
                },
                Action::RaiseInterrupt {
                    vcpu: 0,
                    vector: VECTOR
                },
            ]
        );
        assert!(!e.is_outstanding(t));
    }

    #[test]
    fn v2_page_ready_waits_for_the_token_slot_to_be_free() {
        let mut e = v2(1);
        let a = inject(&mut e, 0, PAGE);
        let b = inject(&mut e, 0, PAGE + 0x1000);
        e.page_arrived(PAGE);
        e.page_arrived(PAGE + 0x1000);
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), a);
        // Not drained yet: the slot counts as busy.
        assert_eq!(held(&mut e, 0, VcpuState::USER), HoldReason::TokenSlotBusy);
        drain(&mut e);
        let busy = VcpuState {
            area_token: a.get(),
            ..VcpuState::USER
        };
        assert_eq!(held(&mut e, 0, busy), HoldReason::TokenSlotBusy);
        // The guest wrote 0 at offset 4: the next may go (KVM's rule), ACK or not.
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), b);
    }

    #[test]
    fn v2_ack_makes_the_host_rescan() {
        let mut e = v2(1);
        inject(&mut e, 0, PAGE);
        inject(&mut e, 0, PAGE + 0x1000);
        e.page_arrived(PAGE);
        e.page_arrived(PAGE + 0x1000);
        delivered(e.delivery_window(0, VcpuState::USER).unwrap());
        drain(&mut e);
        assert!(
            !e.pending_delivery(0),
            "no kick while the raised ready awaits its ACK"
        );
        e.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1).unwrap();
        assert!(e.pending_delivery(0));
        assert_eq!(e.counters().acks, 2);
    }

    #[test]
    fn v2_page_ready_ignores_if_the_interrupt_controller_holds_it() {
        let mut e = v2(1);
        let t = inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        let s = VcpuState {
            interrupts_enabled: false,
            cpl: 0,
            ..VcpuState::USER
        };
        assert_eq!(delivered(e.delivery_window(0, s).unwrap()), t);
    }

    #[test]
    fn v2_never_raises_vector_0_when_int_was_never_written() {
        let mut e = engine(PvFeatures::MODERN, 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 9).unwrap();
        assert!(!e.pending_delivery(0), "no kick while no vector is set");
        assert_eq!(held(&mut e, 0, VcpuState::USER), HoldReason::NoVector);
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.counters().held.get(HoldReason::NoVector), 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_INT, 0x40).unwrap();
        assert!(e.pending_delivery(0));
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        assert_eq!(
            drain(&mut e)[1],
            Action::RaiseInterrupt {
                vcpu: 0,
                vector: 0x40
            }
        );
    }

    #[test]
    fn enable_queues_a_wake_all_v1() {
        let mut e = engine(PvFeatures::SEED, 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        assert!(e.pending_delivery(0));
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        assert_eq!(
            drain(&mut e),
            [
                Action::WriteArea {
                    vcpu: 0,
                    gpa: area(0),
                    value: 2
                },
                Action::InjectPf {
                    vcpu: 0,
                    cr2: 0xffff_ffff,
                    error_code: 0
                },
            ]
        );
        assert_eq!(e.counters().wake_all_delivered, 1);
    }

    #[test]
    fn enable_queues_a_wake_all_v2() {
        let mut e = engine(PvFeatures::MODERN, 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_INT, u64::from(VECTOR))
            .unwrap();
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 9).unwrap();
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        assert_eq!(
            drain(&mut e),
            [
                Action::WriteArea {
                    vcpu: 0,
                    gpa: area(0) + 4,
                    value: 0xffff_ffff
                },
                Action::RaiseInterrupt {
                    vcpu: 0,
                    vector: VECTOR
                },
            ]
        );
    }

    #[test]
    fn wake_all_goes_before_individual_readies() {
        let mut e = v1(1);
        inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        e.vcpus[0].wake_all = true;
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
    }

    /// An enable queues the wake-all and drops nothing; the tokens it covers are decided
    /// when it is delivered.
    #[test]
    fn reenable_covers_tokens_when_its_wake_all_is_delivered() {
        let mut e = v1(1);
        let a = inject(&mut e, 0, PAGE);
        let b = inject(&mut e, 0, PAGE + 0x1000);
        e.page_arrived(PAGE);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        assert!(
            e.is_outstanding(a) && e.is_outstanding(b),
            "nothing dropped yet"
        );
        assert_eq!(e.counters().dropped.wake_all, 0);
        assert!(e.wake_all_pending(0));
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        assert!(!e.wake_all_pending(0));
        assert!(!e.is_outstanding(a) && !e.is_outstanding(b));
        assert_eq!(e.counters().dropped.wake_all, 2);
        assert_eq!(e.outstanding(0), 0);
        drain(&mut e);
        // a was ready: its queue entry went with it. b's page still arrives, to no one.
        assert!(!e.pending_delivery(0));
        assert_eq!(e.page_arrived(PAGE + 0x1000), 0);
        assert_eq!(e.delivery_window(0, VcpuState::USER), Ok(Delivery::Nothing));
        e.check_invariants().unwrap();
    }

    /// Issue 15: after a lazy restore of a v1 guest, the first "not present" APFs go out
    /// before the restore's wake-all; the wake-all covers them, so none of them gets a
    /// "page ready" of its own, and a token injected after it does.
    #[test]
    fn v1_wake_all_after_restore_covers_the_tokens_injected_before_it() {
        let saved = v1(2).save();
        let mut e = engine(PvFeatures::SEED, 2);
        e.restore(&saved).unwrap();
        assert!(e.wake_all_pending(0) && e.wake_all_pending(1));
        let first = inject(&mut e, 0, PAGE);
        let second = inject(&mut e, 0, PAGE + 0x1000);
        let other = inject(&mut e, 1, PAGE + 0x2000);
        assert_eq!(
            e.page_arrived(PAGE),
            1,
            "first is ready before the wake-all"
        );
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        drain(&mut e);
        assert_eq!(e.counters().dropped.wake_all, 2);
        assert!(!e.is_outstanding(first) && !e.is_outstanding(second));
        assert!(e.is_outstanding(other), "vCPU 1's wake-all is its own");
        assert!(
            !e.pending_delivery(0),
            "no individual ready for the first token"
        );
        assert_eq!(e.page_arrived(PAGE + 0x1000), 0);
        // A token injected after the wake-all's delivery is not covered.
        let later = inject(&mut e, 0, PAGE + 0x3000);
        assert_eq!(e.page_arrived(PAGE + 0x3000), 1);
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            later
        );
        assert_eq!(e.counters().dropped.wake_all, 2);
        assert_eq!(e.counters().page_ready_delivered, 1);
        e.check_invariants().unwrap();
    }

    /// v1: a "not present" handed out and not drained holds the wake-all (one exception per
    /// entry), so the token is injected first and the wake-all covers it.
    #[test]
    fn v1_wake_all_and_not_present_never_go_at_one_entry() {
        let mut e = v1(1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        let FaultOutcome::Injected(t) = e.fault(0, PAGE, VcpuState::USER).unwrap() else {
            panic!("fell back")
        };
        assert_eq!(held(&mut e, 0, VcpuState::USER), HoldReason::EventPending);
        assert!(e.wake_all_pending(0));
        assert!(e.is_outstanding(t));
        drain(&mut e);
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        assert!(!e.is_outstanding(t));
        assert_eq!(e.counters().dropped.wake_all, 1);
    }

    #[test]
    fn v2_wake_all_covers_the_tokens_injected_before_it_is_raised() {
        let mut e = v2(1);
        let a = inject(&mut e, 0, PAGE);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 9).unwrap();
        let b = inject(&mut e, 0, PAGE + 0x1000);
        e.page_arrived(PAGE + 0x1000);
        assert!(e.is_outstanding(a) && e.is_outstanding(b));
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        assert!(!e.is_outstanding(a) && !e.is_outstanding(b));
        assert_eq!(e.counters().dropped.wake_all, 2);
        assert_eq!(e.page_arrived(PAGE), 0);
        e.check_invariants().unwrap();
    }

    /// v2: until the guest takes the wake-all's interrupt (and frees the slot) it has not
    /// run it; a token injected then would be woken by it without being covered by it. So
    /// "not present" waits while the wake-all is in the slot.
    #[test]
    fn v2_not_present_falls_back_while_the_wake_all_is_in_the_slot() {
        let mut e = engine(PvFeatures::MODERN, 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_INT, u64::from(VECTOR))
            .unwrap();
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 9).unwrap();
        assert_eq!(
            delivered(e.delivery_window(0, VcpuState::USER).unwrap()),
            Token::WAKE_ALL
        );
        let in_flight = Ok(FaultOutcome::Sync(FallbackReason::WakeAllInFlight));
        // Handed out, not drained: the slot is about to hold it.
        assert_eq!(e.fault(0, PAGE, VcpuState::USER), in_flight);
        drain(&mut e);
        let slot_holds_it = VcpuState {
            area_token: u32::MAX,
            ..VcpuState::USER
        };
        assert_eq!(e.fault(0, PAGE, slot_holds_it), in_flight);
        // A late ACK (of an earlier ready) does not say the guest took this one.
        e.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1).unwrap();
        assert_eq!(e.fault(0, PAGE, slot_holds_it), in_flight);
        assert_eq!(
            e.counters().fallback.get(FallbackReason::WakeAllInFlight),
            3
        );
        // The guest took it (slot free): injected, ACK or not.
        let t = inject(&mut e, 0, PAGE);
        // An individual ready in the slot does not hold "not present".
        e.page_arrived(PAGE);
        assert_eq!(delivered(e.delivery_window(0, VcpuState::USER).unwrap()), t);
        drain(&mut e);
        let ready_in_slot = VcpuState {
            area_token: t.get(),
            ..VcpuState::USER
        };
        assert!(matches!(
            e.fault(0, PAGE + 0x1000, ready_in_slot),
            Ok(FaultOutcome::Injected(_))
        ));
        e.check_invariants().unwrap();
    }

    /// A snapshot may carry a raised wake-all in the slot that the restored engine never
    /// handed out: the slot still tells.
    #[test]
    fn v2_a_restored_wake_all_in_the_slot_holds_not_present_too() {
        let saved = v2(1).save();
        let mut e = engine(PvFeatures::MODERN, 1);
        e.restore(&saved).unwrap();
        let s = VcpuState {
            area_token: u32::MAX,
            ..VcpuState::USER
        };
        assert_eq!(
            e.fault(0, PAGE, s),
            Ok(FaultOutcome::Sync(FallbackReason::WakeAllInFlight))
        );
        inject(&mut e, 0, PAGE);
    }

    #[test]
    fn v1_never_falls_back_for_a_wake_all_in_flight() {
        let mut e = engine(PvFeatures::SEED, 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        delivered(e.delivery_window(0, VcpuState::USER).unwrap());
        drain(&mut e);
        // The guest has taken the wake-all's #PF and returned: the next fault injects,
        // whatever offset 4 holds (v1 has no token slot).
        let s = VcpuState {
            area_token: u32::MAX,
            ..VcpuState::USER
        };
        assert!(matches!(e.fault(0, PAGE, s), Ok(FaultOutcome::Injected(_))));
        drain(&mut e);
        assert_eq!(
            e.counters().fallback.get(FallbackReason::WakeAllInFlight),
            0
        );
    }

    #[test]
    fn wake_all_pending_until_handed_out() {
        let mut e = engine(PvFeatures::SEED, 2);
        assert!(!e.wake_all_pending(0), "APF never enabled");
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        assert!(e.wake_all_pending(0) && !e.wake_all_pending(1));
        let cli = VcpuState {
            interrupts_enabled: false,
            ..VcpuState::USER
        };
        held(&mut e, 0, cli);
        assert!(e.wake_all_pending(0), "held, still queued");
        delivered(e.delivery_window(0, VcpuState::USER).unwrap());
        assert!(!e.wake_all_pending(0));
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, 0).unwrap();
        assert!(!e.wake_all_pending(0), "a disable drops it");
        assert!(!e.wake_all_pending(5));
    }

    #[test]
    fn disable_drops_everything_outstanding_and_delivers_nothing() {
        for mut e in [v1(2), v2(2)] {
            let a = inject(&mut e, 0, PAGE);
            let b = inject(&mut e, 0, PAGE + 0x1000);
            let other = inject(&mut e, 1, PAGE);
            e.page_arrived(PAGE);
            e.msr_write(0, MSR_KVM_ASYNC_PF_EN, 0).unwrap();
            assert!(!e.is_outstanding(a) && !e.is_outstanding(b));
            assert!(e.is_outstanding(other), "other vCPUs keep theirs");
            assert_eq!(e.counters().dropped.disable, 2);
            assert_eq!(e.outstanding(0), 0);
            assert!(!e.pending_delivery(0));
            assert_eq!(e.delivery_window(0, VcpuState::USER), Ok(Delivery::Nothing));
            assert_eq!(e.page_arrived(PAGE + 0x1000), 0);
            assert!(drain(&mut e).is_empty());
            e.check_invariants().unwrap();
        }
    }

    #[test]
    fn disable_drops_a_queued_wake_all() {
        let mut e = engine(PvFeatures::SEED, 1);
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1).unwrap();
        e.msr_write(0, MSR_KVM_ASYNC_PF_EN, 0).unwrap();
        assert!(!e.pending_delivery(0));
        assert_eq!(e.counters().wake_all_dropped, 1);
    }

    #[test]
    fn disabled_vcpu_cannot_take_a_blocked_vcpus_ready() {
        let mut e = v1(2);
        e.config.v1_ready_on_other_vcpus = true;
        inject(&mut e, 0, PAGE);
        e.page_arrived(PAGE);
        held(
            &mut e,
            0,
            VcpuState {
                interrupts_enabled: false,
                ..VcpuState::USER
            },
        );
        e.msr_write(1, MSR_KVM_ASYNC_PF_EN, 0).unwrap();
        assert!(!e.pending_delivery(1));
        assert_eq!(e.delivery_window(1, VcpuState::USER), Ok(Delivery::Nothing));
    }
}
