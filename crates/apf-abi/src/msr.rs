//! The APF MSRs and typed parsing of the values a guest writes to them.
//!
//! A host answers every [`MsrError`] with #GP ("KVM answers a write with reserved bits, or
//! with bit 2/3 set without its CPUID bit, or with an area it cannot map, with #GP", §3) and
//! keeps the MSR's previous value. That second half is this project's rule, not KVM's: KVM
//! stores an `_EN` value whose area it then fails to map (`kvm_pv_enable_async_pf` assigns
//! `msr_en_val` before `kvm_gfn_to_hva_cache_init` fails), so its RDMSR returns the refused
//! value. Keeping the old one means a refused write changes nothing a guest can observe.
//!
//! "v1" (seed mode) is the seed's protocol as Linux hosts shipped it (2.6.38 to 5.7): the seed
//! reserved bits 5..1, but `SEND_ALWAYS` (bit 1) was added in 2.6.38 and those hosts accepted
//! it, and Linux guests of 2.6.38 to 5.8 built with CONFIG_PREEMPT write it. Seed mode
//! therefore accepts bit 1 with its meaning and reserves bits 5..2.

use core::fmt;

use crate::cpuid::{HostMode, PvFeatures};

/// `MSR_KVM_ASYNC_PF_EN`: area address, enable and delivery flags, per vCPU.
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// `MSR_KVM_ASYNC_PF_INT`: the page-ready interrupt vector (v2).
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// `MSR_KVM_ASYNC_PF_ACK`: "page ready handled, deliver the next" (v2).
pub const MSR_KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;
/// The three MSRs a VMM intercepts.
pub const ALL: [u32; 3] = [
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_KVM_ASYNC_PF_ACK,
];

/// Bit 0 of `_EN`: APF enabled on this vCPU.
pub const EN_ENABLED: u64 = 1 << 0;
/// Bit 1 of `_EN`: deliver "page not present" even at CPL 0 (both modes; see the module doc).
pub const EN_SEND_ALWAYS: u64 = 1 << 1;
/// Bit 2 of `_EN`: deliver page-not-present as a #PF VM exit to a nested hypervisor.
pub const EN_DELIVERY_AS_PF_VMEXIT: u64 = 1 << 2;
/// Bit 3 of `_EN`: deliver page-ready as an interrupt (v2).
pub const EN_DELIVERY_AS_INT: u64 = 1 << 3;
/// Bits 5..0 of `_EN` are flags; the area address is bits 63..6.
pub const EN_FLAGS_MASK: u64 = 0x3f;
/// Seed mode: bits 5..2 reserved. The seed reserved bits 5..1; Linux hosts from 2.6.38 on
/// took bit 1 as `SEND_ALWAYS` ("Bits 2:5 are reserved, Should be zero", `data & 0x3c`).
pub const EN_RESERVED_SEED: u64 = 0x3c;
/// Modern mode: "bits 5..4 reserved".
pub const EN_RESERVED_MODERN: u64 = 0x30;
/// `_INT`: "bits 7..0 vector, 63..8 reserved → #GP".
pub const INT_RESERVED: u64 = !0xff;
/// `_ACK`: bit 0 is the acknowledgement; this project treats bits 63..1 as reserved (KVM
/// ignores them; see [`AsyncPfAck::parse`]).
pub const ACK_RESERVED: u64 = !1;
/// Lowest vector accepted in `_INT`: 0..31 are the CPU's exception vectors.
pub const MIN_INT_VECTOR: u8 = 32;

/// Why a value written to an APF MSR is invalid. Each is answered with #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsrError {
    /// The host does not advertise the CPUID bit that makes this MSR exist (bit 4 for `_EN`,
    /// bit 14 for `_INT` and `_ACK`).
    NotAdvertised {
        /// The MSR written.
        msr: u32,
    },
    /// Bits that are reserved in the host's mode are set.
    ReservedBits {
        /// The MSR written.
        msr: u32,
        /// The offending bits.
        bits: u64,
    },
    /// `DELIVERY_AS_PF_VMEXIT` (bit 2) without `ASYNC_PF_VMEXIT` (CPUID bit 10).
    PfVmexitNotAdvertised,
    /// `_INT` names an exception vector (0..31).
    ExceptionVector {
        /// The vector written.
        vector: u8,
    },
    /// The area does not lie wholly in guest RAM (checked by the host against its RAM map).
    AreaNotInRam {
        /// Guest-physical address of the area.
        gpa: u64,
    },
}

impl fmt::Display for MsrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MsrError::NotAdvertised { msr } => {
                write!(
                    f,
                    "MSR {msr:#x} written but its CPUID feature is not offered"
                )
            }
            MsrError::ReservedBits { msr, bits } => {
                write!(f, "MSR {msr:#x}: reserved bits {bits:#x} set")
            }
            MsrError::PfVmexitNotAdvertised => f.write_str(
                "MSR_KVM_ASYNC_PF_EN: DELIVERY_AS_PF_VMEXIT set but ASYNC_PF_VMEXIT is not offered",
            ),
            MsrError::ExceptionVector { vector } => write!(
                f,
                "MSR_KVM_ASYNC_PF_INT: vector {vector} is an exception vector (must be >= 32)"
            ),
            MsrError::AreaNotInRam { gpa } => write!(
                f,
                "MSR_KVM_ASYNC_PF_EN: area {gpa:#x}..{:#x} is not wholly in guest RAM",
                gpa.wrapping_add(crate::area::AREA_SIZE)
            ),
        }
    }
}

impl core::error::Error for MsrError {}

/// Which protocol an enabled vCPU speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// Seed patch: page ready as #PF with reason 2.
    V1,
    /// Page ready as token at offset 4 + interrupt + ACK.
    V2,
}

/// A valid value of `MSR_KVM_ASYNC_PF_EN`, parsed against what the host advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AsyncPfEn {
    raw: u64,
    mode: HostMode,
}

impl AsyncPfEn {
    /// Parses a value the guest wrote.
    ///
    /// Seed mode: bit 1 (`SEND_ALWAYS`) accepted, bits 5..2 reserved (the seed reserved 5..1;
    /// see the module doc). Modern mode: bits 1 and 3 accepted, bit 2 only if CPUID bit 10
    /// is offered, bits 5..4 reserved.
    pub const fn parse(raw: u64, features: PvFeatures) -> Result<AsyncPfEn, MsrError> {
        let msr = MSR_KVM_ASYNC_PF_EN;
        let Some(mode) = features.host_mode() else {
            return Err(MsrError::NotAdvertised { msr });
        };
        match mode {
            HostMode::Seed => {
                if raw & EN_RESERVED_SEED != 0 {
                    return Err(MsrError::ReservedBits {
                        msr,
                        bits: raw & EN_RESERVED_SEED,
                    });
                }
            }
            HostMode::Modern { vmexit } => {
                if raw & EN_RESERVED_MODERN != 0 {
                    return Err(MsrError::ReservedBits {
                        msr,
                        bits: raw & EN_RESERVED_MODERN,
                    });
                }
                if raw & EN_DELIVERY_AS_PF_VMEXIT != 0 && !vmexit {
                    return Err(MsrError::PfVmexitNotAdvertised);
                }
            }
        }
        Ok(AsyncPfEn { raw, mode })
    }

    /// The value as written (what a RDMSR returns).
    pub const fn raw(self) -> u64 {
        self.raw
    }
    /// The dialect this value was parsed under.
    pub const fn mode(self) -> HostMode {
        self.mode
    }
    /// Guest-physical address of the 64-byte area (bits 63..6).
    pub const fn area_gpa(self) -> u64 {
        self.raw & !EN_FLAGS_MASK
    }
    /// Bit 0.
    pub const fn enabled(self) -> bool {
        self.raw & EN_ENABLED != 0
    }
    /// Bit 1: deliver "page not present" even at CPL 0 (in both modes).
    pub const fn send_always(self) -> bool {
        self.raw & EN_SEND_ALWAYS != 0
    }
    /// Bit 2.
    pub const fn delivery_as_pf_vmexit(self) -> bool {
        self.raw & EN_DELIVERY_AS_PF_VMEXIT != 0
    }
    /// Bit 3.
    pub const fn delivery_as_int(self) -> bool {
        self.raw & EN_DELIVERY_AS_INT != 0
    }

    /// The protocol this value turns on, or `None` when it leaves APF inert.
    ///
    /// Seed mode: enabled → v1. Modern mode: enabled and `DELIVERY_AS_INT` → v2; enabled
    /// without it is accepted but delivers nothing, as current KVM does ("only v2 guests get
    /// it (ENABLED alone: nothing injected)", docs/host.md).
    pub const fn version(self) -> Option<Version> {
        if !self.enabled() {
            return None;
        }
        match self.mode {
            HostMode::Seed => Some(Version::V1),
            HostMode::Modern { .. } if self.delivery_as_int() => Some(Version::V2),
            HostMode::Modern { .. } => None,
        }
    }
}

/// A valid value of `MSR_KVM_ASYNC_PF_INT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AsyncPfInt {
    vector: u8,
}

impl AsyncPfInt {
    /// Parses a value the guest wrote: bits 63..8 reserved; the MSR exists only with CPUID
    /// bit 14.
    ///
    /// Vectors 0..31 are refused with #GP, unlike KVM, which accepts them: a page-ready raised
    /// on an exception vector enters the guest's exception handler without the error code it
    /// expects (vector 14 would run the #PF handler with a misaligned frame), so no correct
    /// guest writes one, and refusing it turns a silent stack corruption into a visible #GP.
    pub const fn parse(raw: u64, features: PvFeatures) -> Result<AsyncPfInt, MsrError> {
        let msr = MSR_KVM_ASYNC_PF_INT;
        if !features.async_pf() || !features.async_pf_int() {
            return Err(MsrError::NotAdvertised { msr });
        }
        if raw & INT_RESERVED != 0 {
            return Err(MsrError::ReservedBits {
                msr,
                bits: raw & INT_RESERVED,
            });
        }
        #[allow(clippy::cast_possible_truncation)] // bits 63..8 checked zero above
        let vector = raw as u8;
        if vector < MIN_INT_VECTOR {
            return Err(MsrError::ExceptionVector { vector });
        }
        Ok(AsyncPfInt { vector })
    }

    /// The page-ready vector.
    pub const fn vector(self) -> u8 {
        self.vector
    }
}

/// A valid value of `MSR_KVM_ASYNC_PF_ACK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AsyncPfAck {
    ack: bool,
}

impl AsyncPfAck {
    /// Parses a value the guest wrote. The MSR exists only with CPUID bit 14. KVM acts on bit 0
    /// and ignores the rest; this project answers bits 63..1 with #GP so a guest bug is seen.
    pub const fn parse(raw: u64, features: PvFeatures) -> Result<AsyncPfAck, MsrError> {
        let msr = MSR_KVM_ASYNC_PF_ACK;
        if !features.async_pf() || !features.async_pf_int() {
            return Err(MsrError::NotAdvertised { msr });
        }
        if raw & ACK_RESERVED != 0 {
            return Err(MsrError::ReservedBits {
                msr,
                bits: raw & ACK_RESERVED,
            });
        }
        Ok(AsyncPfAck { ack: raw & 1 != 0 })
    }

    /// Bit 0: the guest has consumed the page-ready token; deliver the next.
    pub const fn ack(self) -> bool {
        self.ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::{FEATURE_ASYNC_PF, FEATURE_ASYNC_PF_INT, FEATURE_ASYNC_PF_VMEXIT};

    const NONE: PvFeatures = PvFeatures(0);
    const SEED: PvFeatures = PvFeatures::SEED;
    const MODERN: PvFeatures = PvFeatures::MODERN;
    const MODERN_VMEXIT: PvFeatures =
        PvFeatures(FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT | FEATURE_ASYNC_PF_VMEXIT);
    const AREA: u64 = 0x7100;

    #[test]
    fn en_not_advertised() {
        for raw in [0, 1, AREA | 1] {
            assert_eq!(
                AsyncPfEn::parse(raw, NONE),
                Err(MsrError::NotAdvertised {
                    msr: MSR_KVM_ASYNC_PF_EN
                })
            );
        }
        // Bit 14 without bit 4 offers nothing either.
        assert!(AsyncPfEn::parse(AREA | 9, PvFeatures(FEATURE_ASYNC_PF_INT)).is_err());
    }

    #[test]
    fn seed_mode_every_reserved_bit_is_refused() {
        for bit in 2..=5 {
            let raw = AREA | 1 | (1 << bit);
            assert_eq!(
                AsyncPfEn::parse(raw, SEED),
                Err(MsrError::ReservedBits {
                    msr: MSR_KVM_ASYNC_PF_EN,
                    bits: 1 << bit
                }),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn seed_mode_valid_values() {
        let en = AsyncPfEn::parse(AREA | 1, SEED).unwrap();
        assert_eq!(en.area_gpa(), AREA);
        assert!(en.enabled());
        assert_eq!(en.version(), Some(Version::V1));
        assert_eq!(en.raw(), AREA | 1);
        let off = AsyncPfEn::parse(AREA, SEED).unwrap();
        assert!(!off.enabled());
        assert_eq!(off.version(), None);
        assert_eq!(AsyncPfEn::parse(0, SEED).unwrap().version(), None);
    }

    /// Linux guests of 2.6.38 to 5.8 built with CONFIG_PREEMPT write bit 1 in seed mode.
    #[test]
    fn seed_mode_accepts_send_always_with_its_meaning() {
        let en = AsyncPfEn::parse(AREA | 0b11, SEED).unwrap();
        assert!(en.send_always());
        assert_eq!(en.version(), Some(Version::V1));
        assert_eq!(en.area_gpa(), AREA);
        assert!(!AsyncPfEn::parse(AREA | 1, SEED).unwrap().send_always());
        // Disabled with bit 1 is a valid disable.
        assert_eq!(AsyncPfEn::parse(AREA | 0b10, SEED).unwrap().version(), None);
        // Bit 1 next to a reserved bit is still refused, for the reserved bit only.
        assert_eq!(
            AsyncPfEn::parse(AREA | 0b111, SEED),
            Err(MsrError::ReservedBits {
                msr: MSR_KVM_ASYNC_PF_EN,
                bits: 0b100
            })
        );
    }

    #[test]
    fn modern_mode_reserved_bits_4_and_5() {
        for bit in [4, 5] {
            assert_eq!(
                AsyncPfEn::parse(AREA | 9 | (1 << bit), MODERN),
                Err(MsrError::ReservedBits {
                    msr: MSR_KVM_ASYNC_PF_EN,
                    bits: 1 << bit
                })
            );
            assert!(AsyncPfEn::parse(AREA | 9 | (1 << bit), MODERN_VMEXIT).is_err());
        }
    }

    #[test]
    fn modern_mode_pf_vmexit_needs_bit_10() {
        assert_eq!(
            AsyncPfEn::parse(AREA | 0b1101, MODERN),
            Err(MsrError::PfVmexitNotAdvertised)
        );
        let en = AsyncPfEn::parse(AREA | 0b1101, MODERN_VMEXIT).unwrap();
        assert!(en.delivery_as_pf_vmexit());
        assert_eq!(en.version(), Some(Version::V2));
    }

    #[test]
    fn modern_mode_valid_values_and_versions() {
        let v2 = AsyncPfEn::parse(AREA | 0b1001, MODERN).unwrap();
        assert_eq!(v2.version(), Some(Version::V2));
        assert!(!v2.send_always());
        let always = AsyncPfEn::parse(AREA | 0b1011, MODERN).unwrap();
        assert!(always.send_always() && always.delivery_as_int());
        // ENABLED alone in modern mode: accepted, but inert (what KVM does).
        let inert = AsyncPfEn::parse(AREA | 1, MODERN).unwrap();
        assert!(inert.enabled());
        assert_eq!(inert.version(), None);
    }

    #[test]
    fn int_msr() {
        assert_eq!(
            AsyncPfInt::parse(0xf3, SEED),
            Err(MsrError::NotAdvertised {
                msr: MSR_KVM_ASYNC_PF_INT
            })
        );
        assert_eq!(AsyncPfInt::parse(0xf3, MODERN).unwrap().vector(), 0xf3);
        assert_eq!(AsyncPfInt::parse(32, MODERN).unwrap().vector(), 32);
        for raw in [0x1f3, 1 << 8, 1 << 63, u64::MAX] {
            assert!(matches!(
                AsyncPfInt::parse(raw, MODERN),
                Err(MsrError::ReservedBits { .. })
            ));
        }
        for v in [0, 14, 31] {
            assert_eq!(
                AsyncPfInt::parse(v, MODERN),
                Err(MsrError::ExceptionVector {
                    vector: u8::try_from(v).unwrap()
                })
            );
        }
    }

    #[test]
    fn ack_msr() {
        assert!(matches!(
            AsyncPfAck::parse(1, SEED),
            Err(MsrError::NotAdvertised { .. })
        ));
        assert!(AsyncPfAck::parse(1, MODERN).unwrap().ack());
        assert!(!AsyncPfAck::parse(0, MODERN).unwrap().ack());
        assert_eq!(
            AsyncPfAck::parse(3, MODERN),
            Err(MsrError::ReservedBits {
                msr: MSR_KVM_ASYNC_PF_ACK,
                bits: 2
            })
        );
    }

    /// Exhaustive over the six flag bits in every mode: parse never panics, and accepts
    /// exactly the values the rules allow.
    #[test]
    fn every_flag_combination_in_every_mode() {
        for features in [NONE, SEED, MODERN, MODERN_VMEXIT] {
            for flags in 0..64u64 {
                let ok = AsyncPfEn::parse(AREA | flags, features).is_ok();
                let expected = match features.host_mode() {
                    None => false,
                    Some(HostMode::Seed) => flags & EN_RESERVED_SEED == 0,
                    Some(HostMode::Modern { vmexit }) => {
                        flags & EN_RESERVED_MODERN == 0
                            && (vmexit || flags & EN_DELIVERY_AS_PF_VMEXIT == 0)
                    }
                };
                assert_eq!(ok, expected, "features {features:?} flags {flags:#b}");
            }
        }
    }
}
