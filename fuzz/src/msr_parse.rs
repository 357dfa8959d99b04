//! `msr_parse`: `apf_abi::{AsyncPfEn, AsyncPfInt, AsyncPfAck}::parse` over any `(u64,
//! PvFeatures)` never panics, and its verdict (error value included) and the accessors of an
//! accepted value match an oracle written from the rules of `docs/protocol.md`
//! (quoted in `apf_abi::msr`), not from apf-abi's code:
//!
//! - none of the three MSRs exists without CPUID bit 4; `_INT`/`_ACK` also need bit 14;
//! - `_EN`, seed mode (bit 4 only): bits 5..2 reserved (bit 1, SEND_ALWAYS, is accepted as
//!   Linux hosts of 2.6.38 to 5.7 accepted it);
//! - `_EN`, modern mode (bits 4 and 14): bits 5..4 reserved, bit 2 only with CPUID bit 10;
//! - `_INT`: bits 63..8 reserved; vectors 0..31 refused;
//! - `_ACK`: bits 63..1 reserved.

use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use apf_abi::{AsyncPfAck, AsyncPfEn, AsyncPfInt, HostMode, MsrError, PvFeatures, Version};
use arbitrary::Unstructured;

use crate::take;

const BIT4: u32 = 1 << 4;
const BIT10: u32 = 1 << 10;
const BIT14: u32 = 1 << 14;

/// The decoded input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Input {
    /// The value written.
    pub raw: u64,
    /// CPUID 0x40000001 EAX.
    pub features: u32,
}

/// Decodes `raw` (8 bytes LE), then `features` (4 bytes LE).
pub fn decode(data: &[u8]) -> Input {
    let mut u = Unstructured::new(data);
    Input {
        raw: take(&mut u),
        features: take(&mut u),
    }
}

/// The bytes that [`decode`] turns into `input`.
pub fn encode(input: Input) -> Vec<u8> {
    let mut v = input.raw.to_le_bytes().to_vec();
    v.extend_from_slice(&input.features.to_le_bytes());
    v
}

/// What `_EN` must answer, from the rules.
pub fn oracle_en(raw: u64, f: u32) -> Result<(), MsrError> {
    let msr = MSR_KVM_ASYNC_PF_EN;
    if f & BIT4 == 0 {
        return Err(MsrError::NotAdvertised { msr });
    }
    if f & BIT14 == 0 {
        // Seed mode as Linux hosts shipped it: "Bits 2:5 are reserved".
        let bits = raw & 0b11_1100;
        if bits != 0 {
            return Err(MsrError::ReservedBits { msr, bits });
        }
        return Ok(());
    }
    // Modern mode: bits 5..4 reserved; bit 2 needs CPUID bit 10.
    let bits = raw & 0b11_0000;
    if bits != 0 {
        return Err(MsrError::ReservedBits { msr, bits });
    }
    if raw & 0b100 != 0 && f & BIT10 == 0 {
        return Err(MsrError::PfVmexitNotAdvertised);
    }
    Ok(())
}

/// What `_INT` must answer, from the rules.
pub fn oracle_int(raw: u64, f: u32) -> Result<u8, MsrError> {
    let msr = MSR_KVM_ASYNC_PF_INT;
    if f & BIT4 == 0 || f & BIT14 == 0 {
        return Err(MsrError::NotAdvertised { msr });
    }
    if raw >> 8 != 0 {
        return Err(MsrError::ReservedBits {
            msr,
            bits: raw & !0xff,
        });
    }
    let vector = u8::try_from(raw).expect("bits 63..8 are zero");
    if vector < 32 {
        return Err(MsrError::ExceptionVector { vector });
    }
    Ok(vector)
}

/// What `_ACK` must answer, from the rules.
pub fn oracle_ack(raw: u64, f: u32) -> Result<bool, MsrError> {
    let msr = MSR_KVM_ASYNC_PF_ACK;
    if f & BIT4 == 0 || f & BIT14 == 0 {
        return Err(MsrError::NotAdvertised { msr });
    }
    if raw >> 1 != 0 {
        return Err(MsrError::ReservedBits {
            msr,
            bits: raw & !1,
        });
    }
    Ok(raw == 1)
}

/// Parses `data`'s value as each of the three MSRs and compares with the oracle.
pub fn check(data: &[u8]) {
    let Input { raw, features: f } = decode(data);
    let features = PvFeatures(f);

    let en = AsyncPfEn::parse(raw, features);
    assert_eq!(
        en.map(|_| ()),
        oracle_en(raw, f),
        "_EN {raw:#x} features {f:#x}"
    );
    match en {
        Ok(en) => {
            assert_eq!(en.raw(), raw);
            assert_eq!(en.area_gpa(), raw & !0x3f);
            assert_eq!(en.area_gpa() % 64, 0);
            assert_eq!(en.enabled(), raw & 1 != 0);
            assert_eq!(en.send_always(), raw & 2 != 0);
            assert_eq!(en.delivery_as_pf_vmexit(), raw & 4 != 0);
            assert_eq!(en.delivery_as_int(), raw & 8 != 0);
            let modern = f & BIT14 != 0;
            let want_mode = if modern {
                HostMode::Modern {
                    vmexit: f & BIT10 != 0,
                }
            } else {
                HostMode::Seed
            };
            assert_eq!(en.mode(), want_mode);
            // Seed: enabled → v1. Modern: enabled + DELIVERY_AS_INT → v2, else inert.
            let want_version = match (raw & 1 != 0, modern, raw & 8 != 0) {
                (false, _, _) | (true, true, false) => None,
                (true, false, _) => Some(Version::V1),
                (true, true, true) => Some(Version::V2),
            };
            assert_eq!(en.version(), want_version);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    let int = AsyncPfInt::parse(raw, features);
    assert_eq!(
        int.map(AsyncPfInt::vector),
        oracle_int(raw, f),
        "_INT {raw:#x} features {f:#x}"
    );
    if let Err(e) = int {
        let _ = e.to_string();
    }

    let ack = AsyncPfAck::parse(raw, features);
    assert_eq!(
        ack.map(AsyncPfAck::ack),
        oracle_ack(raw, f),
        "_ACK {raw:#x} features {f:#x}"
    );
    if let Err(e) = ack {
        let _ = e.to_string();
    }
}
