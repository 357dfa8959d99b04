//! How many clones this host can hold, decided before anything starts.
//!
//! The assumption is the worst case: every clone writes every page of its RAM (so holds a
//! private copy of each), and the shared cache holds every page once besides. So
//! `(clones + 1) × guest size` must fit in `MemAvailable`. Typical clones write little (the
//! measured figures are in docs/remote-memory.md); a platform that knows its guests' write
//! sets could admit more.

/// Bytes the clones may need at worst: the cache plus a private copy of every page in each.
pub fn worst_case_bytes(clones: u32, mem_size: u64) -> u64 {
    (u64::from(clones) + 1).saturating_mul(mem_size)
}

/// Refuses `clones` clones of a `mem_size`-byte guest on a host with `available` bytes
/// available, with a message that says why.
pub fn check(clones: u32, mem_size: u64, available: u64) -> Result<(), String> {
    if clones == 0 {
        return Err("--clones 0: at least one clone".into());
    }
    let need = worst_case_bytes(clones, mem_size);
    if need > available {
        return Err(format!(
            "--clones {clones}: {clones} clones of a {} MiB guest may need {} MiB at worst (the \
             shared page cache plus a private copy of every page in each clone, if each wrote \
             all of its memory), and this host has {} MiB available (MemAvailable); at most {} \
             clones fit",
            mem_size >> 20,
            need >> 20,
            available >> 20,
            (available / mem_size.max(1)).saturating_sub(1)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn refuses_zero_and_more_than_fits() {
        assert!(
            check(0, 256 * MIB, u64::MAX)
                .unwrap_err()
                .contains("at least one")
        );
        assert_eq!(worst_case_bytes(8, 256 * MIB), 9 * 256 * MIB);
        assert!(check(8, 256 * MIB, 9 * 256 * MIB).is_ok());
        let e = check(9, 256 * MIB, 9 * 256 * MIB).unwrap_err();
        assert!(e.contains("--clones 9"), "{e}");
        assert!(e.contains("2560 MiB at worst"), "{e}");
        assert!(e.contains("2304 MiB available"), "{e}");
        assert!(e.contains("at most 8 clones fit"), "{e}");
        assert!(check(u32::MAX, u64::MAX, u64::MAX - 1).is_err());
    }
}
