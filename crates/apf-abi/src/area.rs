//! The 64-byte area shared by host and guest, at the address written to `MSR_KVM_ASYNC_PF_EN`.
//!
//! v1 (§2): "its first 4 bytes (u32, the reason) are written by the host when it injects an
//! async page fault". v2 (§3, `struct kvm_vcpu_pv_apf_data`): `u32 flags` at 0, `u32 token`
//! at 4, 56 bytes of padding. Both are little-endian guest memory.

/// Size of the area in bytes.
pub const AREA_SIZE: u64 = 64;
/// Required alignment of the area: bits 5..0 of the MSR hold flags, not address bits.
pub const AREA_ALIGN: u64 = 64;
/// Offset of the v1 "reason" / v2 "flags" u32.
pub const REASON_OFFSET: u64 = 0;
/// Offset of the v2 page-ready token u32 (0 = slot free).
pub const TOKEN_OFFSET: u64 = 4;

/// What an asynchronous page fault says, in the area's reason/flags word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Reason {
    /// "0 = this #PF is a normal page fault" — also "the guest has consumed the last reason".
    None = 0,
    /// Type 1: "page not present"; CR2 holds the token.
    PageNotPresent = 1,
    /// Type 2 (v1 only): "page ready"; CR2 holds the token of the page now available.
    PageReady = 2,
}

impl Reason {
    /// The u32 stored at [`REASON_OFFSET`].
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// Decodes the reason word; `None` for a value the protocol does not define.
    pub const fn from_raw(raw: u32) -> Option<Reason> {
        match raw {
            0 => Some(Reason::None),
            1 => Some(Reason::PageNotPresent),
            2 => Some(Reason::PageReady),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_round_trips_and_rejects_unknown() {
        for r in [Reason::None, Reason::PageNotPresent, Reason::PageReady] {
            assert_eq!(Reason::from_raw(r.raw()), Some(r));
        }
        assert_eq!(Reason::PageNotPresent.raw(), 1);
        assert_eq!(Reason::PageReady.raw(), 2);
        assert_eq!(Reason::from_raw(3), None);
    }

    #[test]
    fn layout_matches_kvm_vcpu_pv_apf_data() {
        assert_eq!((REASON_OFFSET, TOKEN_OFFSET, AREA_SIZE), (0, 4, 64));
    }
}
