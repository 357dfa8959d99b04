//! The three APF MSRs: reads, writes, and the enable/disable paths they trigger.

use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use apf_abi::{AsyncPfAck, AsyncPfEn, AsyncPfInt, MsrError, PvFeatures};

use crate::config::RamMap;
use crate::counters;
use crate::engine::{DropCause, Engine};
use crate::error::Error;

/// Parses a value for `_EN` and checks its area: "KVM answers a write with reserved bits, or
/// with bit 2/3 set without its CPUID bit, or with an area it cannot map, with #GP" (§3).
///
/// The area is checked only for a value that turns APF on (v1 or v2), the one KVM maps: a
/// write that disables APF is never refused for its address, so a guest can always turn APF
/// off, and an inert modern-mode value (ENABLED without DELIVERY_AS_INT) is accepted
/// whatever its address, as KVM accepts it (`kvm_pv_async_pf_enabled` is false for it, so
/// `kvm_pv_enable_async_pf` returns before `kvm_gfn_to_hva_cache_init`).
pub(crate) fn parse_en(
    raw: u64,
    features: PvFeatures,
    ram: &RamMap,
) -> Result<AsyncPfEn, MsrError> {
    let en = AsyncPfEn::parse(raw, features)?;
    // "bits 63..6: guest-physical address of a 64-byte aligned, 64-byte area, in guest RAM".
    if en.version().is_some() && !ram.contains_area(en.area_gpa()) {
        return Err(MsrError::AreaNotInRam { gpa: en.area_gpa() });
    }
    Ok(en)
}

impl Engine {
    /// The guest wrote `value` to MSR `msr` on vCPU `vcpu`.
    ///
    /// [`Error::Gp`]: answer #GP; nothing changed, the MSR keeps its previous value (KVM
    /// instead stores an `_EN` value whose area it cannot map; see `apf_abi::msr`). `_EN`
    /// with ENABLED (and, in modern mode, DELIVERY_AS_INT) queues a wake-all and keeps what
    /// is outstanding (the wake-all covers it when it is delivered); any other `_EN` value
    /// disables APF on the vCPU and drops everything outstanding. `_ACK` = 1 lets the next
    /// "page ready" go.
    pub fn msr_write(&mut self, vcpu: usize, msr: u32, value: u64) -> Result<(), Error> {
        self.check_vcpu(vcpu)?;
        let features = self.config.features;
        let result = match msr {
            MSR_KVM_ASYNC_PF_EN => {
                parse_en(value, features, &self.config.ram).map(|en| self.set_en(vcpu, en))
            }
            MSR_KVM_ASYNC_PF_INT => AsyncPfInt::parse(value, features).map(|int| {
                // "bits 7..0 vector, 63..8 reserved → #GP" (§3).
                self.vcpus[vcpu].int = Some(int);
                counters::bump(&mut self.counters.int_writes);
            }),
            MSR_KVM_ASYNC_PF_ACK => AsyncPfAck::parse(value, features).map(|ack| {
                if ack.ack() {
                    self.ack(vcpu);
                }
            }),
            _ => return Err(Error::NotApfMsr { msr }),
        };
        result.map_err(|e| {
            self.counters.gp.record(&e);
            Error::Gp(e)
        })
    }

    /// The guest reads MSR `msr` on vCPU `vcpu`: the last value written (0 if none); `_ACK`
    /// reads 0. An MSR whose CPUID bit is not offered does not exist: #GP.
    pub fn msr_read(&mut self, vcpu: usize, msr: u32) -> Result<u64, Error> {
        self.check_vcpu(vcpu)?;
        let f = self.config.features;
        let v = &self.vcpus[vcpu];
        let (exists, value) = match msr {
            MSR_KVM_ASYNC_PF_EN => (f.async_pf(), v.en.map_or(0, AsyncPfEn::raw)),
            MSR_KVM_ASYNC_PF_INT => (
                f.async_pf() && f.async_pf_int(),
                v.int.map_or(0, |i| u64::from(i.vector())),
            ),
            MSR_KVM_ASYNC_PF_ACK => (f.async_pf() && f.async_pf_int(), 0),
            _ => return Err(Error::NotApfMsr { msr }),
        };
        if exists {
            Ok(value)
        } else {
            let e = MsrError::NotAdvertised { msr };
            self.counters.gp.record(&e);
            Err(Error::Gp(e))
        }
    }

    /// Applies a valid `_EN` value: the enable path or the disable path.
    pub(crate) fn set_en(&mut self, vcpu: usize, en: AsyncPfEn) {
        counters::bump(&mut self.counters.en_writes);
        if en.version().is_some() {
            // Enabling (again): "Guest enables APF (write with bit 0) → host queues a "wake
            // all" (0xffffffff) so tasks left sleeping from before (e.g. after a restore)
            // retry" (§4). Nothing is dropped here: which tokens the wake-all covers ("no
            // individual type 2 APFs will be sent for those", §2) is decided when it is
            // delivered (`cover_by_wake_all`). A v2 "page ready" raised and not ACKed stays
            // so: the next delivery waits for the ACK, as KVM's `pageready_pending` does.
            let v = &mut self.vcpus[vcpu];
            v.en = Some(en);
            v.wake_all = true;
            counters::bump(&mut self.counters.wake_all_queued);
        } else {
            // "Guest disables → queue and gfn table cleared, nothing outstanding is
            // delivered" (§4); "If APF is disabled while APFs are outstanding, they are not
            // delivered" (§2). An inert modern-mode value disables likewise.
            self.drop_vcpu(vcpu, DropCause::Disable);
            self.vcpus[vcpu].en = Some(en);
        }
    }

    /// `_ACK` = 1: "the host delivers the next pending "page ready" only once the token slot
    /// is 0 (the ACK makes it re-scan its queue)" (§3). The guest writes 0 at offset 4
    /// before it ACKs, so the slot is known free.
    fn ack(&mut self, vcpu: usize) {
        counters::bump(&mut self.counters.acks);
        let v = &mut self.vcpus[vcpu];
        v.awaiting_ack = false;
        v.in_slot = None;
    }
}

#[cfg(test)]
mod tests {
    use apf_abi::cpuid::{FEATURE_ASYNC_PF, FEATURE_ASYNC_PF_INT, FEATURE_ASYNC_PF_VMEXIT};
    use apf_abi::{PvFeatures, Version};

    use super::*;
    use crate::testutil::{RAM_END, area, drain, engine, v1, v2};
    use crate::{Delivery, FaultOutcome, VcpuState};

    const EN: u32 = MSR_KVM_ASYNC_PF_EN;
    const INT: u32 = MSR_KVM_ASYNC_PF_INT;
    const ACK: u32 = MSR_KVM_ASYNC_PF_ACK;

    fn gp(r: Result<(), Error>) -> MsrError {
        match r {
            Err(Error::Gp(e)) => e,
            other => panic!("expected #GP, got {other:?}"),
        }
    }

    #[test]
    fn en_needs_cpuid_bit_4() {
        let mut e = engine(PvFeatures(0), 1);
        assert_eq!(
            gp(e.msr_write(0, EN, area(0) | 1)),
            MsrError::NotAdvertised { msr: EN }
        );
        assert_eq!(
            e.msr_read(0, EN),
            Err(Error::Gp(MsrError::NotAdvertised { msr: EN }))
        );
        assert_eq!(e.counters().gp.not_advertised, 2);
    }

    #[test]
    fn seed_mode_bits_5_to_2_reserved_gp_and_bit_1_accepted() {
        let mut e = engine(PvFeatures::SEED, 1);
        for bit in 2..=5 {
            assert!(matches!(
                gp(e.msr_write(0, EN, area(0) | 1 | 1 << bit)),
                MsrError::ReservedBits { .. }
            ));
        }
        assert_eq!(e.counters().gp.reserved_bits, 4);
        assert_eq!(e.version(0), None);
        // SEND_ALWAYS, as Linux hosts of 2.6.38 to 5.7 accepted it (issue 14 item 10).
        e.msr_write(0, EN, area(0) | 0b11).unwrap();
        assert_eq!(e.version(0), Some(Version::V1));
        assert!(
            e.pending_delivery(0),
            "the enable path ran: wake-all queued"
        );
    }

    /// Issue 14 item 12: KVM never maps the area of an inert value (ENABLED without
    /// DELIVERY_AS_INT in modern mode), so it accepts any address; so does apfvm.
    #[test]
    fn modern_inert_value_area_is_not_checked() {
        let mut e = engine(PvFeatures::MODERN, 1);
        for raw in [RAM_END | 1, RAM_END | 0b11, 0xdead_0000_0000 | 1] {
            e.msr_write(0, EN, raw).unwrap();
            assert_eq!(e.msr_read(0, EN), Ok(raw));
            assert_eq!(e.version(0), None);
            assert!(!e.pending_delivery(0));
        }
        // The same address with DELIVERY_AS_INT would be mapped: #GP, the inert value stays.
        assert_eq!(
            gp(e.msr_write(0, EN, RAM_END | 9)),
            MsrError::AreaNotInRam { gpa: RAM_END }
        );
        assert_eq!(e.msr_read(0, EN), Ok(0xdead_0000_0000 | 1));
        assert_eq!(e.counters().gp.total(), 1);
    }

    /// Issue 14 item 13: a refused value leaves the previous one readable (KVM would have
    /// stored the refused one).
    #[test]
    fn refused_en_keeps_the_previous_value() {
        for mut e in [v1(1), v2(1)] {
            let before = e.msr_read(0, EN).unwrap();
            let flags = before & 0x3f;
            assert!(e.msr_write(0, EN, RAM_END | flags).is_err());
            assert_eq!(e.msr_read(0, EN), Ok(before));
            assert!(e.version(0).is_some());
        }
    }

    /// Issue 14 item 11: a re-enable does not release a queued delivery while a raised one
    /// waits for its ACK (KVM keeps `pageready_pending` across the write).
    #[test]
    fn v2_reenable_keeps_waiting_for_the_ack() {
        let mut e = v2(1);
        let FaultOutcome::Injected(t) = e.fault(0, 0x4_2000, VcpuState::USER).unwrap() else {
            panic!()
        };
        drain(&mut e);
        e.page_arrived(0x4_2000);
        assert_eq!(
            e.delivery_window(0, VcpuState::USER),
            Ok(Delivery::Delivered {
                token: t,
                from_vcpu: 0
            })
        );
        drain(&mut e);
        e.msr_write(0, EN, area(0) | 9).unwrap();
        assert!(e.wake_all_pending(0));
        assert!(
            !e.pending_delivery(0),
            "the second wake-all waits for the ACK"
        );
        e.msr_write(0, ACK, 1).unwrap();
        assert!(e.pending_delivery(0));
        assert_eq!(
            e.delivery_window(0, VcpuState::USER),
            Ok(Delivery::Delivered {
                token: apf_abi::Token::WAKE_ALL,
                from_vcpu: 0
            })
        );
    }

    #[test]
    fn modern_mode_bits_5_4_reserved_and_bit_2_needs_bit_10_gp() {
        let mut e = engine(PvFeatures::MODERN, 1);
        assert!(matches!(
            gp(e.msr_write(0, EN, area(0) | 9 | 1 << 4)),
            MsrError::ReservedBits { .. }
        ));
        assert!(matches!(
            gp(e.msr_write(0, EN, area(0) | 9 | 1 << 5)),
            MsrError::ReservedBits { .. }
        ));
        assert_eq!(
            gp(e.msr_write(0, EN, area(0) | 0b1101)),
            MsrError::PfVmexitNotAdvertised
        );
        assert_eq!(e.counters().gp.pf_vmexit_not_advertised, 1);
        let mut e = engine(
            PvFeatures(FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT | FEATURE_ASYNC_PF_VMEXIT),
            1,
        );
        e.msr_write(0, EN, area(0) | 0b1101).unwrap();
        assert_eq!(e.version(0), Some(Version::V2));
    }

    #[test]
    fn area_must_lie_wholly_in_guest_ram_gp() {
        for features in [PvFeatures::SEED, PvFeatures::MODERN] {
            let mut e = engine(features, 1);
            let flags = if features == PvFeatures::SEED { 1 } else { 9 };
            for gpa in [RAM_END, RAM_END + 0x1000, !63, 0x8000_0000] {
                assert_eq!(
                    gp(e.msr_write(0, EN, gpa | flags)),
                    MsrError::AreaNotInRam { gpa }
                );
            }
            // The last 64 bytes of RAM are fine.
            e.msr_write(0, EN, (RAM_END - 64) | flags).unwrap();
            assert_eq!(e.counters().gp.area_not_in_ram, 4);
        }
    }

    #[test]
    fn area_straddling_the_end_of_ram_gp() {
        let mut e = Engine::new(crate::EngineConfig::new(
            PvFeatures::SEED,
            1,
            RamMap::single(0..0x1020),
        ));
        assert_eq!(
            gp(e.msr_write(0, EN, 0x1000 | 1)),
            MsrError::AreaNotInRam { gpa: 0x1000 }
        );
        e.msr_write(0, EN, 0xfc0 | 1).unwrap();
    }

    #[test]
    fn disable_is_never_refused_for_its_address() {
        let mut e = v1(1);
        e.msr_write(0, EN, 0xdead_0000_0000).unwrap();
        assert_eq!(e.version(0), None);
        assert_eq!(e.msr_read(0, EN), Ok(0xdead_0000_0000));
    }

    #[test]
    fn int_and_ack_exist_only_in_modern_mode() {
        let mut e = engine(PvFeatures::SEED, 1);
        assert_eq!(
            gp(e.msr_write(0, INT, 0xf3)),
            MsrError::NotAdvertised { msr: INT }
        );
        assert_eq!(
            gp(e.msr_write(0, ACK, 1)),
            MsrError::NotAdvertised { msr: ACK }
        );
        assert_eq!(
            e.msr_read(0, INT),
            Err(Error::Gp(MsrError::NotAdvertised { msr: INT }))
        );
        assert_eq!(
            e.msr_read(0, ACK),
            Err(Error::Gp(MsrError::NotAdvertised { msr: ACK }))
        );
        assert_eq!(e.counters().gp.not_advertised, 4);
    }

    #[test]
    fn int_bits_63_8_reserved_and_exception_vectors_gp() {
        let mut e = engine(PvFeatures::MODERN, 1);
        assert!(matches!(
            gp(e.msr_write(0, INT, 0x1f3)),
            MsrError::ReservedBits { .. }
        ));
        assert_eq!(
            gp(e.msr_write(0, INT, 14)),
            MsrError::ExceptionVector { vector: 14 }
        );
        assert_eq!(e.counters().gp.exception_vector, 1);
        assert_eq!(e.msr_read(0, INT), Ok(0));
    }

    #[test]
    fn ack_bits_63_1_reserved_gp() {
        let mut e = v2(1);
        assert!(matches!(
            gp(e.msr_write(0, ACK, 2)),
            MsrError::ReservedBits { .. }
        ));
        assert!(matches!(
            gp(e.msr_write(0, ACK, u64::MAX)),
            MsrError::ReservedBits { .. }
        ));
        e.msr_write(0, ACK, 0).unwrap();
    }

    #[test]
    fn gp_changes_no_state() {
        let mut e = v2(2);
        let before = e.clone();
        let _ = e.msr_write(0, EN, area(0) | 9 | 1 << 5);
        let _ = e.msr_write(0, EN, RAM_END | 9);
        let _ = e.msr_write(1, INT, 3);
        let _ = e.msr_write(1, ACK, 7);
        assert_eq!(e.vcpus, before.vcpus);
        assert_eq!(e.tokens, before.tokens);
        assert_eq!(e.actions, before.actions);
        assert_eq!(e.counters().gp.total(), 4);
    }

    #[test]
    fn reads_return_the_last_written_values_and_ack_reads_0() {
        let mut e = engine(PvFeatures::MODERN, 1);
        assert_eq!(e.msr_read(0, EN), Ok(0));
        assert_eq!(e.msr_read(0, INT), Ok(0));
        e.msr_write(0, INT, 0xf3).unwrap();
        e.msr_write(0, EN, area(0) | 0b1011).unwrap();
        e.msr_write(0, ACK, 1).unwrap();
        assert_eq!(e.msr_read(0, EN), Ok(area(0) | 0b1011));
        assert_eq!(e.msr_read(0, INT), Ok(0xf3));
        assert_eq!(e.msr_read(0, ACK), Ok(0));
    }

    #[test]
    fn other_msrs_are_not_routed_here() {
        let mut e = v1(1);
        assert_eq!(
            e.msr_write(0, 0x4b56_4d03, 0),
            Err(Error::NotApfMsr { msr: 0x4b56_4d03 })
        );
        assert_eq!(e.msr_read(0, 0x10), Err(Error::NotApfMsr { msr: 0x10 }));
        assert_eq!(e.counters().gp.total(), 0);
    }

    #[test]
    fn unknown_vcpu_is_an_error_not_a_panic() {
        let mut e = v1(2);
        let no = Err(Error::NoSuchVcpu { vcpu: 2, vcpus: 2 });
        assert_eq!(e.msr_write(2, EN, 0), no);
        assert_eq!(e.msr_read(2, EN).map(|_| ()), no);
        assert_eq!(e.fault(2, 0, VcpuState::USER).map(|_| ()), no);
        assert_eq!(e.delivery_window(2, VcpuState::USER).map(|_| ()), no);
        assert_eq!(
            e.reset(usize::MAX),
            Err(Error::NoSuchVcpu {
                vcpu: usize::MAX,
                vcpus: 2
            })
        );
        assert!(!e.pending_delivery(2));
        assert_eq!(e.outstanding(2), 0);
        assert_eq!(e.version(2), None);
    }

    #[test]
    fn modern_enabled_without_delivery_as_int_is_accepted_but_inert() {
        let mut e = engine(PvFeatures::MODERN, 1);
        e.msr_write(0, INT, 0xf3).unwrap();
        e.msr_write(0, EN, area(0) | 1).unwrap();
        assert_eq!(e.msr_read(0, EN), Ok(area(0) | 1));
        assert_eq!(e.version(0), None);
        // No wake-all queued, nothing to deliver.
        assert!(!e.pending_delivery(0));
        assert_eq!(e.delivery_window(0, VcpuState::USER), Ok(Delivery::Nothing));
        assert!(drain(&mut e).is_empty());
    }

    #[test]
    fn int_write_is_counted_and_kept_across_en_writes() {
        let mut e = v2(1);
        e.msr_write(0, EN, 0).unwrap();
        assert_eq!(e.msr_read(0, INT), Ok(0xf3));
        assert_eq!(e.counters().int_writes, 1);
        assert_eq!(e.counters().en_writes, 2);
    }
}
