//! Token allocation: unique among every outstanding token of the VM, never 0, never the
//! broadcast 0xffffffff.
//!
//! "Token = `(apf.id++ << 12) | vcpu_id`, forced non-zero" (§4). The id is a per-vCPU
//! counter that wraps after 2^20 tokens; the low 12 bits name the vCPU (its index modulo
//! 4096), so two vCPUs below 4096 never collide and a vCPU's tokens repeat only after 2^20
//! allocations. Wrap-around and vCPU indices ≥ 4096 can still meet a token that is in use, so
//! every candidate is checked against the in-use set and skipped if taken — as are 0 and
//! 0xffffffff. The search is bounded: each skipped candidate is either in use or one of the
//! two reserved values, so `in_use + 3` candidates always suffice unless the vCPU's 2^20
//! candidates are all taken, and then allocation fails (the fault falls back).

use apf_abi::Token;

/// Bits of a token that carry the vCPU index.
pub const VCPU_BITS: u32 = 12;
/// Distinct ids per vCPU before its tokens repeat.
pub const IDS_PER_VCPU: u32 = 1 << (32 - VCPU_BITS);

/// The token that id `id` of vCPU `vcpu` names (before the reserved-value check).
pub fn candidate(vcpu: usize, id: u32) -> u32 {
    let low = u32::try_from(vcpu % (1 << VCPU_BITS)).unwrap_or_default();
    (id % IDS_PER_VCPU) << VCPU_BITS | low
}

/// Allocates the next free token for `vcpu`, advancing its id counter `next_id`.
///
/// `in_use(t)` says whether `t` is still outstanding anywhere in the VM; `in_use_count` bounds
/// how many such tokens exist (it bounds the search). Returns `None` only when no candidate
/// of this vCPU is free.
pub fn allocate(
    vcpu: usize,
    next_id: &mut u32,
    in_use_count: usize,
    in_use: impl Fn(Token) -> bool,
) -> Option<Token> {
    let tries = in_use_count
        .saturating_add(3)
        .min(usize::try_from(IDS_PER_VCPU).unwrap_or(usize::MAX));
    for _ in 0..tries {
        let raw = candidate(vcpu, *next_id);
        *next_id = next_id.wrapping_add(1) % IDS_PER_VCPU;
        // "forced non-zero (zero means "slot free"; a 2022 fix)" (§4); 0xffffffff is the
        // broadcast and "never allocated to a single fault".
        let Some(token) = Token::new(raw) else {
            continue;
        };
        if token.is_wake_all() || in_use(token) {
            continue;
        }
        return Some(token);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn token_is_id_shifted_12_or_vcpu_like_linux() {
        let mut id = 1;
        let t = allocate(0, &mut id, 0, |_| false).unwrap();
        assert_eq!(
            t.get(),
            0x1000,
            "measured with KVM's own APF: the first token of vCPU 0 is 0x1000"
        );
        let mut id = 5;
        assert_eq!(allocate(3, &mut id, 0, |_| false).unwrap().get(), 0x5003);
        assert_eq!(id, 6);
    }

    #[test]
    fn token_zero_is_never_allocated() {
        let mut id = 0;
        let t = allocate(0, &mut id, 0, |_| false).unwrap();
        assert_ne!(t.get(), 0);
        assert_eq!(t.get(), 0x1000);
    }

    #[test]
    fn token_wake_all_is_never_allocated() {
        // vCPU 4095 with id 0xfffff would be 0xffffffff.
        let mut id = IDS_PER_VCPU - 1;
        let t = allocate(4095, &mut id, 0, |_| false).unwrap();
        assert!(t.is_individual());
        assert_eq!(t.get(), 0x0fff, "wrapped to id 0");
    }

    #[test]
    fn token_in_use_is_skipped_after_wrap_around() {
        let mut used = BTreeSet::new();
        used.insert(Token::new(0x1000).unwrap());
        used.insert(Token::new(0x2000).unwrap());
        let mut id = IDS_PER_VCPU; // wraps to 0 (reserved), 1 and 2 (in use), then 3
        let t = allocate(0, &mut id, used.len(), |t| used.contains(&t)).unwrap();
        assert_eq!(t.get(), 0x3000);
    }

    #[test]
    fn token_vcpus_beyond_4096_alias_but_never_collide() {
        let mut used = BTreeSet::new();
        let mut a = 1;
        let t0 = allocate(1, &mut a, 0, |_| false).unwrap();
        used.insert(t0);
        let mut b = 1;
        let t1 = allocate(4097, &mut b, used.len(), |t| used.contains(&t)).unwrap();
        assert_ne!(t0, t1);
    }

    #[test]
    fn token_allocation_fails_cleanly_when_all_are_taken() {
        let mut id = 0;
        assert_eq!(allocate(0, &mut id, usize::MAX, |_| true), None);
    }
}
