//! A counter for every decision the engine makes.
//!
//! With the `serde` feature every type here is `Serialize`, so a VMM reports the engine's
//! counters as they are: [`FallbackCounts`] and [`HoldCounts`] as maps from the reason's
//! stable [`name`](FallbackReason::name) to its count (`{"not_enabled": 0, "inert": 0, ..}`),
//! the rest as structs of named fields.

use apf_abi::MsrError;

use crate::action::{FallbackReason, HoldReason};

/// Faults handled synchronously, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FallbackCounts([u64; FallbackReason::ALL.len()]);

#[cfg(feature = "serde")]
impl serde::Serialize for FallbackCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter().map(|(r, n)| (r.name(), n)))
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for HoldCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter().map(|(r, n)| (r.name(), n)))
    }
}

impl FallbackCounts {
    /// Faults that fell back for `reason`.
    pub const fn get(&self, reason: FallbackReason) -> u64 {
        self.0[reason.index()]
    }
    /// All fallbacks.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (FallbackReason, u64)> + '_ {
        FallbackReason::ALL.iter().map(|&r| (r, self.get(r)))
    }
    pub(crate) fn record(&mut self, reason: FallbackReason) {
        let c = &mut self.0[reason.index()];
        *c = c.saturating_add(1);
    }
}

/// Delivery windows at which something waited but was held, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HoldCounts([u64; HoldReason::ALL.len()]);

impl HoldCounts {
    /// Windows held for `reason`.
    pub const fn get(&self, reason: HoldReason) -> u64 {
        self.0[reason.index()]
    }
    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (HoldReason, u64)> + '_ {
        HoldReason::ALL.iter().map(|&r| (r, self.get(r)))
    }
    pub(crate) fn record(&mut self, reason: HoldReason) {
        let c = &mut self.0[reason.index()];
        *c = c.saturating_add(1);
    }
}

/// Outstanding tokens that got no "page ready" of their own, by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DropCounts {
    /// "If APF is disabled while APFs are outstanding, they are not delivered" (§2).
    pub disable: u64,
    /// Covered by a wake-all: outstanding on the wake-all's vCPU when the wake-all was
    /// delivered (handed out by a delivery window), so its "not present" came before it; the
    /// guest's wake-all wakes its task ("no individual type 2 APFs will be sent for those",
    /// §2). Counted at the wake-all's delivery, not when an enable queued it.
    pub wake_all: u64,
    /// "vCPU reset → both MSRs 0, queue cleared" (§4).
    pub reset: u64,
    /// "in-flight faults are not migrated" (§4).
    pub restore: u64,
}

impl DropCounts {
    /// All tokens that got no "page ready" of their own.
    pub const fn total(&self) -> u64 {
        self.disable
            .saturating_add(self.wake_all)
            .saturating_add(self.reset)
            .saturating_add(self.restore)
    }
}

/// MSR accesses answered with #GP, by class of [`MsrError`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GpCounts {
    /// [`MsrError::NotAdvertised`].
    pub not_advertised: u64,
    /// [`MsrError::ReservedBits`].
    pub reserved_bits: u64,
    /// [`MsrError::PfVmexitNotAdvertised`].
    pub pf_vmexit_not_advertised: u64,
    /// [`MsrError::ExceptionVector`].
    pub exception_vector: u64,
    /// [`MsrError::AreaNotInRam`].
    pub area_not_in_ram: u64,
}

impl GpCounts {
    /// All #GPs.
    pub const fn total(&self) -> u64 {
        self.not_advertised
            .saturating_add(self.reserved_bits)
            .saturating_add(self.pf_vmexit_not_advertised)
            .saturating_add(self.exception_vector)
            .saturating_add(self.area_not_in_ram)
    }

    pub(crate) fn record(&mut self, e: &MsrError) {
        let c = match e {
            MsrError::NotAdvertised { .. } => &mut self.not_advertised,
            MsrError::ReservedBits { .. } => &mut self.reserved_bits,
            MsrError::PfVmexitNotAdvertised => &mut self.pf_vmexit_not_advertised,
            MsrError::ExceptionVector { .. } => &mut self.exception_vector,
            MsrError::AreaNotInRam { .. } => &mut self.area_not_in_ram,
        };
        *c = c.saturating_add(1);
    }
}

/// Every decision the engine has made since it was created. Counters saturate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Counters {
    /// Faults reported with [`Engine::fault`](crate::Engine::fault).
    pub faults: u64,
    /// "Page not present" injected.
    pub injected: u64,
    /// Faults handled synchronously, by reason.
    pub fallback: FallbackCounts,
    /// Faults on a frame that had already arrived, answered
    /// [`FaultOutcome::AlreadyPresent`](crate::FaultOutcome::AlreadyPresent).
    pub faults_on_arrived: u64,
    /// Faults on a page that already had a token in flight, which got their own token.
    pub second_fault_same_page: u64,
    /// Pages reported arrived (first reports only; see `duplicate_arrivals`).
    pub pages_arrived: u64,
    /// Reports of an arrival for a frame that had already arrived: no-ops.
    pub duplicate_arrivals: u64,
    /// Arrived frames reported evicted ([`Engine::page_evicted`](crate::Engine::page_evicted)).
    pub pages_evicted: u64,
    /// Tokens made ready by an arrival.
    pub tokens_ready: u64,
    /// Individual "page ready" delivered.
    pub page_ready_delivered: u64,
    /// Of those, v1 ready delivered on another vCPU than the one that faulted.
    pub page_ready_cross_vcpu: u64,
    /// Wake-alls (token 0xffffffff) queued by an enable.
    pub wake_all_queued: u64,
    /// Wake-alls delivered.
    pub wake_all_delivered: u64,
    /// Delivery windows held, by reason.
    pub held: HoldCounts,
    /// Outstanding tokens that got no "page ready" of their own, by cause (covered by a
    /// wake-all at its delivery, or dropped by a disable, reset or restore).
    pub dropped: DropCounts,
    /// Queued wake-alls dropped by a disable, reset or restore.
    pub wake_all_dropped: u64,
    /// MSR accesses answered with #GP, by class.
    pub gp: GpCounts,
    /// Valid writes to `MSR_KVM_ASYNC_PF_EN`.
    pub en_writes: u64,
    /// Valid writes to `MSR_KVM_ASYNC_PF_INT`.
    pub int_writes: u64,
    /// Writes of 1 to `MSR_KVM_ASYNC_PF_ACK`.
    pub acks: u64,
    /// vCPU resets.
    pub resets: u64,
    /// Restores.
    pub restores: u64,
}

pub(crate) fn bump(c: &mut u64) {
    *c = c.saturating_add(1);
}

pub(crate) fn add(c: &mut u64, n: usize) {
    *c = c.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_stable_unique_snake_case() {
        let fallback: Vec<&str> = FallbackReason::ALL.iter().map(|r| r.name()).collect();
        let hold: Vec<&str> = HoldReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(fallback[0], "not_enabled");
        assert_eq!(fallback[8], "wake_all_in_flight");
        assert_eq!(hold[4], "token_slot_busy");
        for names in [&fallback, &hold] {
            for (i, n) in names.iter().enumerate() {
                assert!(
                    n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{n}"
                );
                assert!(!names[..i].contains(n), "{n} twice");
            }
        }
        for (i, r) in FallbackReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in HoldReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn counters_serialize_with_reasons_as_named_maps() {
        let mut c = Counters::default();
        c.fallback.record(FallbackReason::WakeAllInFlight);
        c.fallback.record(FallbackReason::WakeAllInFlight);
        c.held.record(HoldReason::NoVector);
        c.dropped.wake_all = 3;
        c.faults_on_arrived = 4;
        let v = serde_json::to_value(&c).unwrap();
        let fallback = v["fallback"].as_object().unwrap();
        assert_eq!(fallback.len(), FallbackReason::ALL.len());
        assert_eq!(fallback["wake_all_in_flight"], 2);
        assert_eq!(fallback["not_enabled"], 0);
        assert_eq!(v["held"]["no_vector"], 1);
        assert_eq!(v["held"].as_object().unwrap().len(), HoldReason::ALL.len());
        assert_eq!(v["dropped"]["wake_all"], 3);
        assert_eq!(v["faults_on_arrived"], 4);
        assert_eq!(v["gp"]["area_not_in_ram"], 0);
        // The enums serialize as the same names.
        for r in FallbackReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
            let back: FallbackReason = serde_json::from_value(r.name().into()).unwrap();
            assert_eq!(back, r);
        }
        for r in HoldReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn outcomes_serialize_with_the_token_as_a_number() {
        use apf_abi::Token;

        use crate::{Delivery, FaultOutcome};
        let t = Token::new(0x1000).unwrap();
        assert_eq!(
            serde_json::to_string(&FaultOutcome::Injected(t)).unwrap(),
            r#"{"injected":4096}"#
        );
        assert_eq!(
            serde_json::to_string(&FaultOutcome::Sync(FallbackReason::Inert)).unwrap(),
            r#"{"sync":"inert"}"#
        );
        assert_eq!(
            serde_json::to_string(&FaultOutcome::AlreadyPresent).unwrap(),
            r#""already_present""#
        );
        assert_eq!(
            serde_json::to_string(&Delivery::Delivered {
                token: Token::WAKE_ALL,
                from_vcpu: 1
            })
            .unwrap(),
            r#"{"delivered":{"token":4294967295,"from_vcpu":1}}"#
        );
        assert_eq!(
            serde_json::to_string(&Delivery::Held(HoldReason::TokenSlotBusy)).unwrap(),
            r#"{"held":"token_slot_busy"}"#
        );
    }
}
