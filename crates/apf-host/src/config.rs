//! What the VMM tells the engine about the VM once, at creation.

use core::ops::Range;

use apf_abi::PvFeatures;
use apf_abi::area::AREA_SIZE;

/// Linux's `ASYNC_PF_PER_VCPU`: "At most 64 outstanding APFs per vCPU; past that the fault is
/// handled synchronously" (§4).
pub const DEFAULT_MAX_OUTSTANDING_PER_VCPU: usize = 64;

/// The guest's RAM as guest-physical address ranges (half-open, `start..end`).
///
/// Used for one rule: the area "must be in guest RAM" (§2), and KVM answers "an area it cannot
/// map" with #GP (§3). Ranges may be given in any order and may touch; an area spanning two
/// touching ranges is *not* accepted (it must lie wholly inside one region, as one mapping).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RamMap {
    regions: Vec<Range<u64>>,
}

impl RamMap {
    /// A map of the given regions. Empty ranges are ignored.
    pub fn new(regions: impl IntoIterator<Item = Range<u64>>) -> RamMap {
        let mut regions: Vec<Range<u64>> =
            regions.into_iter().filter(|r| r.start < r.end).collect();
        regions.sort_by_key(|r| (r.start, r.end));
        RamMap { regions }
    }

    /// A map of one region.
    pub fn single(region: Range<u64>) -> RamMap {
        RamMap::new(core::iter::once(region))
    }

    /// The regions, sorted by start.
    pub fn regions(&self) -> &[Range<u64>] {
        &self.regions
    }

    /// True when `gpa..gpa + len` lies wholly inside one region. Overflow is "not in RAM".
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.regions.iter().any(|r| r.start <= gpa && end <= r.end)
    }

    /// True when the 64-byte APF area at `gpa` lies wholly in guest RAM.
    pub fn contains_area(&self, gpa: u64) -> bool {
        self.contains(gpa, AREA_SIZE)
    }
}

/// The VM as the engine needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EngineConfig {
    /// What CPUID leaf 0x40000001 EAX offers the guest; decides seed (v1) or modern (v2) mode
    /// and which MSRs exist.
    pub features: PvFeatures,
    /// Number of vCPUs; they are indexed `0..vcpus`.
    pub vcpus: usize,
    /// Outstanding APFs allowed per vCPU before a fault falls back to synchronous
    /// ([`DEFAULT_MAX_OUTSTANDING_PER_VCPU`] by default). A token counts from its "not
    /// present" until its "page ready" has been handed out.
    pub max_outstanding_per_vcpu: usize,
    /// Guest RAM, for the "area must be in guest RAM" check.
    pub ram: RamMap,
    /// v1 only: let a vCPU with nothing of its own take the "page ready" of another v1 vCPU
    /// whose last window was held ("the guest must not rely on" same-vCPU delivery, §2).
    /// Off by default, as KVM does: a cross-vCPU ready is the one way a guest gets a
    /// wake-before-wait dummy, and a wake-all on the thief vCPU that runs before the owner's
    /// task waits (a thief that re-enables APF) clears that dummy — the owner's task then
    /// sleeps forever (tests/lost_wakeup.rs shows it with apf-guest's table). Turn it on
    /// only for a guest whose wake-all keeps dummies.
    pub v1_ready_on_other_vcpus: bool,
}

impl EngineConfig {
    /// A configuration with the default outstanding limit.
    pub fn new(features: PvFeatures, vcpus: usize, ram: RamMap) -> EngineConfig {
        EngineConfig {
            features,
            vcpus,
            max_outstanding_per_vcpu: DEFAULT_MAX_OUTSTANDING_PER_VCPU,
            ram,
            v1_ready_on_other_vcpus: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_must_lie_wholly_in_one_region() {
        let ram = RamMap::new([0x10_0000..0x20_0000, 0..0x9_f000]);
        assert!(ram.contains_area(0));
        assert!(ram.contains_area(0x9_f000 - 64));
        assert!(!ram.contains_area(0x9_f000 - 32));
        assert!(!ram.contains_area(0x9_f000));
        assert!(ram.contains_area(0x10_0000));
        assert!(!ram.contains_area(0x20_0000 - 32));
        assert!(!ram.contains_area(u64::MAX - 63));
    }

    #[test]
    fn touching_regions_do_not_merge() {
        let ram = RamMap::new([0..0x1000, 0x1000..0x2000]);
        assert!(!ram.contains(0xfe0, 64));
        assert!(ram.contains(0xfc0, 64));
    }

    #[test]
    fn empty_ranges_are_ignored() {
        #[allow(clippy::reversed_empty_ranges)]
        let ram = RamMap::new([5..5, 9..3]);
        assert!(ram.regions().is_empty());
        assert!(!ram.contains_area(5));
    }

    #[test]
    fn default_limit_is_linux_async_pf_per_vcpu() {
        let c = EngineConfig::new(PvFeatures::MODERN, 2, RamMap::default());
        assert_eq!(c.max_outstanding_per_vcpu, 64);
    }
}
