//! What a snapshot keeps of the protocol: the three MSR values per vCPU, nothing else.
//!
//! "Migration/snapshot: `_EN`, `_INT`, `_ACK` are saved and restored; in-flight faults are not
//! migrated — restoring `_EN` re-runs the enable path, whose "wake all" makes sleepers
//! retry" (§4).

/// The APF MSRs of one vCPU, as a RDMSR returns them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SavedVcpu {
    /// `MSR_KVM_ASYNC_PF_EN` (0 if never written).
    pub async_pf_en: u64,
    /// `MSR_KVM_ASYNC_PF_INT` (0 if never written).
    pub async_pf_int: u64,
    /// `MSR_KVM_ASYNC_PF_ACK` (reads 0: the ACK is an event, not a state).
    pub async_pf_ack: u64,
}

/// The engine's saved state: one [`SavedVcpu`] per vCPU, in index order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SavedState {
    /// Per vCPU.
    pub vcpus: Vec<SavedVcpu>,
}

use apf_abi::{AsyncPfAck, AsyncPfEn, AsyncPfInt};

use crate::counters;
use crate::engine::{DropCause, Engine};
use crate::error::Error;
use crate::msr::parse_en;

impl Engine {
    /// The MSR values of every vCPU. Outstanding tokens are not saved: "in-flight faults are
    /// not migrated" (§4).
    pub fn save(&self) -> SavedState {
        SavedState {
            vcpus: self
                .vcpus
                .iter()
                .map(|v| SavedVcpu {
                    async_pf_en: v.en.map_or(0, AsyncPfEn::raw),
                    async_pf_int: v.int.map_or(0, |i| u64::from(i.vector())),
                    async_pf_ack: 0,
                })
                .collect(),
        }
    }

    /// Loads a saved state: drops every outstanding token and queued action, forgets every
    /// arrival (the snapshot's memory arrives anew), sets the MSRs, and "restoring `_EN`
    /// re-runs the enable path, whose "wake all" makes sleepers retry" (§4). `_INT` is
    /// restored before `_EN`, as a guest writes them. The wake-all is only queued here: it
    /// covers the tokens injected before it is delivered, e.g. the first faults of a lazy
    /// restore that reach the engine ahead of it.
    ///
    /// All-or-nothing: a state with another vCPU count or an invalid value (checked against
    /// this engine's features and RAM map, as a guest write would be) changes nothing. A
    /// value of 0 means "never written".
    pub fn restore(&mut self, saved: &SavedState) -> Result<(), Error> {
        if saved.vcpus.len() != self.vcpus.len() {
            return Err(Error::SavedVcpuCount {
                saved: saved.vcpus.len(),
                vcpus: self.vcpus.len(),
            });
        }
        let features = self.config.features;
        let mut parsed = Vec::with_capacity(saved.vcpus.len());
        for (vcpu, s) in saved.vcpus.iter().enumerate() {
            let bad = |error| Error::SavedMsr { vcpu, error };
            let en = match s.async_pf_en {
                0 => None,
                raw => Some(parse_en(raw, features, &self.config.ram).map_err(bad)?),
            };
            let int = match s.async_pf_int {
                0 => None,
                raw => Some(AsyncPfInt::parse(raw, features).map_err(bad)?),
            };
            if s.async_pf_ack != 0 {
                AsyncPfAck::parse(s.async_pf_ack, features).map_err(bad)?;
            }
            parsed.push((en, int));
        }
        self.arrived.clear();
        for (vcpu, (en, int)) in parsed.into_iter().enumerate() {
            self.drop_vcpu(vcpu, DropCause::Restore);
            self.vcpus[vcpu].en = None;
            self.vcpus[vcpu].int = int;
            if let Some(en) = en {
                self.set_en(vcpu, en);
            }
        }
        counters::bump(&mut self.counters.restores);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use apf_abi::msr::{MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
    use apf_abi::{MsrError, PvFeatures, Token, Version};

    use super::*;
    use crate::testutil::{PAGE, VECTOR, area, drain, engine, v1, v2};
    use crate::{Delivery, FaultOutcome, VcpuState};

    #[test]
    fn save_records_the_msr_values_only() {
        let mut e = v2(2);
        e.msr_write(1, MSR_KVM_ASYNC_PF_EN, 0).unwrap();
        let _ = e.fault(0, PAGE, VcpuState::USER).unwrap();
        let saved = e.save();
        assert_eq!(
            saved.vcpus,
            [
                SavedVcpu {
                    async_pf_en: area(0) | 9,
                    async_pf_int: u64::from(VECTOR),
                    async_pf_ack: 0
                },
                SavedVcpu {
                    async_pf_en: 0,
                    async_pf_int: u64::from(VECTOR),
                    async_pf_ack: 0
                },
            ]
        );
    }

    #[test]
    fn restore_reruns_the_enable_path_and_no_tokens_survive() {
        for mut e in [v1(2), v2(2)] {
            let FaultOutcome::Injected(t) = e.fault(0, PAGE, VcpuState::USER).unwrap() else {
                panic!()
            };
            let saved = e.save();
            e.restore(&saved).unwrap();
            assert!(drain(&mut e).is_empty(), "undrained actions dropped");
            assert!(!e.is_outstanding(t));
            assert_eq!(e.counters().dropped.restore, 1);
            assert_eq!(e.page_arrived(PAGE), 0);
            for v in 0..2 {
                assert!(e.pending_delivery(v), "wake-all queued on vCPU {v}");
                assert_eq!(
                    e.delivery_window(v, VcpuState::USER),
                    Ok(Delivery::Delivered {
                        token: Token::WAKE_ALL,
                        from_vcpu: v
                    })
                );
            }
            assert_eq!(e.save(), saved);
            e.check_invariants().unwrap();
        }
    }

    /// A restore brings back the snapshot's memory, which arrives anew: faults on frames
    /// that had arrived before get tokens again.
    #[test]
    fn restore_forgets_arrivals() {
        let mut e = v1(1);
        e.page_arrived(PAGE);
        assert!(e.is_arrived(PAGE));
        let saved = e.save();
        e.restore(&saved).unwrap();
        assert!(!e.is_arrived(PAGE));
        e.delivery_window(0, VcpuState::USER).unwrap();
        drain(&mut e);
        assert!(matches!(
            e.fault(0, PAGE, VcpuState::USER),
            Ok(FaultOutcome::Injected(_))
        ));
    }

    #[test]
    fn restore_into_a_fresh_engine() {
        let saved = v2(1).save();
        let mut fresh = engine(PvFeatures::MODERN, 1);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.version(0), Some(Version::V2));
        assert_eq!(
            fresh.msr_read(0, MSR_KVM_ASYNC_PF_INT),
            Ok(u64::from(VECTOR))
        );
        assert!(fresh.pending_delivery(0));
        assert_eq!(fresh.counters().restores, 1);
    }

    #[test]
    fn restore_of_a_disabled_vcpu_queues_nothing() {
        let mut e = engine(PvFeatures::SEED, 1);
        e.restore(&SavedState {
            vcpus: vec![SavedVcpu::default()],
        })
        .unwrap();
        assert!(!e.pending_delivery(0));
        assert_eq!(e.version(0), None);
    }

    #[test]
    fn restore_is_all_or_nothing() {
        let mut e = v1(2);
        let before = e.clone();
        assert_eq!(
            e.restore(&SavedState {
                vcpus: vec![SavedVcpu::default()]
            }),
            Err(Error::SavedVcpuCount { saved: 1, vcpus: 2 })
        );
        let bad = SavedState {
            vcpus: vec![
                SavedVcpu {
                    async_pf_en: area(0) | 1,
                    ..SavedVcpu::default()
                },
                SavedVcpu {
                    async_pf_en: 0x4000_0000 | 1,
                    ..SavedVcpu::default()
                },
            ],
        };
        assert_eq!(
            e.restore(&bad),
            Err(Error::SavedMsr {
                vcpu: 1,
                error: MsrError::AreaNotInRam { gpa: 0x4000_0000 }
            })
        );
        let seed_int = SavedState {
            vcpus: vec![
                SavedVcpu {
                    async_pf_int: 0xf3,
                    ..SavedVcpu::default()
                };
                2
            ],
        };
        assert!(matches!(
            e.restore(&seed_int),
            Err(Error::SavedMsr { vcpu: 0, .. })
        ));
        assert_eq!(e, before);
    }
}
