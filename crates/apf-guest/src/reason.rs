//! Reading the area: what a #PF means (§2) and what the v2 page-ready slot holds (§3).
//!
//! Pure functions: the kernel does the memory reads and writes. The order it must follow:
//! - #PF handler (v1 and v2): read the reason/flags u32 at offset 0, write 0 back, *then*
//!   [`classify`] — "the guest's #PF handler must read the reason first and reset it to 0
//!   before doing anything that can raise a normal page fault" (§2), and with IF = 0
//!   throughout (the interrupt gate gives that), or another APF may overwrite the reason.
//! - v2 page-ready interrupt: read the u32 at offset 4, [`take_ready_token`], act on it, write
//!   [`SLOT_FREE`] back at offset 4, then write 1 to `MSR_KVM_ASYNC_PF_ACK` — "the host
//!   delivers the next pending page ready only once the token slot is 0" (§3).

use apf_abi::{Reason, Token, Version};

/// The value that marks the v2 token slot (offset 4) free; the guest writes it after handling.
pub const SLOT_FREE: u32 = 0;

/// A "page ready": one token, or the broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ready {
    /// The page behind this individual token is now available: wake its sleeper.
    Page(Token),
    /// "Token 0xffffffff in a type 2: wake up every task waiting for any APF" (§2).
    WakeAll,
}

impl Ready {
    /// Sorts a token into individual or broadcast.
    pub const fn from_token(token: Token) -> Ready {
        if token.is_wake_all() {
            Ready::WakeAll
        } else {
            Ready::Page(token)
        }
    }
}

/// What one #PF means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PfKind {
    /// Reason 0: "this #PF is a normal page fault"; CR2 is the faulting address.
    Normal,
    /// Reason 1: "page not present"; "CR2 holds a token". Sleep the current task on it
    /// ([`crate::SleeperTable::wait`]).
    NotPresent(Token),
    /// Reason 2 (v1 only): "CR2 holds the token of the page that is now available".
    Ready(Ready),
    /// Not a valid APF: an unknown reason; a CR2 that is 0 or wider than 32 bits with reason
    /// 1 or 2; the broadcast token in a "not present"; or reason 2 under v2, where page ready
    /// comes by interrupt. A host bug: the handler should count it and return, never panic.
    Invalid {
        /// The reason word as read.
        reason: u32,
        /// CR2 as read.
        cr2: u64,
    },
}

/// Classifies a #PF from the reason word (already read and reset to 0 by the caller) and CR2.
///
/// `version` is the delivery the guest enabled: under [`Version::V2`] a reason 2 is
/// [`PfKind::Invalid`], since "page ready" arrives as token + interrupt there (§3).
pub fn classify(version: Version, reason_word: u32, cr2: u64) -> PfKind {
    let token = u32::try_from(cr2).ok().and_then(Token::new);
    match (Reason::from_raw(reason_word), token) {
        (Some(Reason::None), _) => PfKind::Normal,
        // "Type 1: CR2 holds a token" — an individual one; the broadcast never names a fault.
        (Some(Reason::PageNotPresent), Some(t)) if t.is_individual() => PfKind::NotPresent(t),
        (Some(Reason::PageReady), Some(t)) if version == Version::V1 => {
            PfKind::Ready(Ready::from_token(t))
        }
        _ => PfKind::Invalid {
            reason: reason_word,
            cr2,
        },
    }
}

/// Reads the v2 token slot (the u32 at offset 4) on the page-ready interrupt.
///
/// `None` when the slot is [`SLOT_FREE`] (a spurious interrupt: nothing to wake, but still
/// ACK so the host re-scans its queue). Otherwise the token, sorted into one page or the
/// broadcast: "Token 0xffffffff is still the broadcast wake all" (§3).
pub const fn take_ready_token(slot: u32) -> Option<Ready> {
    match Token::new(slot) {
        Some(t) => Some(Ready::from_token(t)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(raw: u32) -> Token {
        Token::new(raw).unwrap()
    }

    #[test]
    fn reason_zero_is_a_normal_fault_whatever_cr2_holds() {
        for v in [Version::V1, Version::V2] {
            assert_eq!(classify(v, 0, 0), PfKind::Normal);
            assert_eq!(classify(v, 0, 0xffff_8000_dead_b000), PfKind::Normal);
        }
    }

    #[test]
    fn not_present_carries_the_token_from_cr2() {
        for v in [Version::V1, Version::V2] {
            assert_eq!(classify(v, 1, 0x1001), PfKind::NotPresent(tok(0x1001)));
        }
    }

    #[test]
    fn not_present_with_a_bad_token_is_invalid() {
        // 0 is never a token; CR2 wider than 32 bits is not one; the broadcast names no fault.
        for cr2 in [0, 0x1_0000_1001, 0xffff_ffff] {
            assert_eq!(
                classify(Version::V1, 1, cr2),
                PfKind::Invalid { reason: 1, cr2 }
            );
        }
    }

    #[test]
    fn v1_page_ready_sorts_individual_and_broadcast() {
        assert_eq!(
            classify(Version::V1, 2, 0x2002),
            PfKind::Ready(Ready::Page(tok(0x2002)))
        );
        assert_eq!(
            classify(Version::V1, 2, 0xffff_ffff),
            PfKind::Ready(Ready::WakeAll)
        );
        assert_eq!(
            classify(Version::V1, 2, 0),
            PfKind::Invalid { reason: 2, cr2: 0 }
        );
    }

    #[test]
    fn v2_never_takes_page_ready_as_a_fault() {
        assert_eq!(
            classify(Version::V2, 2, 0x2002),
            PfKind::Invalid {
                reason: 2,
                cr2: 0x2002
            }
        );
    }

    #[test]
    fn unknown_reasons_are_invalid() {
        for reason in [3, 4, 0x8000_0000, u32::MAX] {
            assert_eq!(
                classify(Version::V1, reason, 0x1001),
                PfKind::Invalid {
                    reason,
                    cr2: 0x1001
                }
            );
        }
    }

    #[test]
    fn v2_slot_free_individual_and_broadcast() {
        assert_eq!(take_ready_token(SLOT_FREE), None);
        assert_eq!(take_ready_token(0x3003), Some(Ready::Page(tok(0x3003))));
        assert_eq!(take_ready_token(0xffff_ffff), Some(Ready::WakeAll));
    }
}
