//! Arrival memory: which frames of guest RAM have arrived for good.
//!
//! One bit per 4 KiB frame, one bitmap per [`RamMap`] region. A fault reaches the engine
//! through a channel (a userfaultfd message, a kick, a mailbox) that may deliver it after
//! the page it names has arrived; remembering arrivals lets the engine answer such a fault
//! "already present" instead of issuing a token for a page that will never arrive again.

use crate::config::RamMap;
use crate::page::{PAGE_SIZE, page_of};

/// The frames of one region, `first_frame..` (frame addresses), one bit each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RegionBits {
    /// Guest-physical range of the region (as the RAM map gives it).
    start: u64,
    end: u64,
    /// Frame address of the first frame the region touches.
    first_frame: u64,
    bits: Vec<u64>,
}

impl RegionBits {
    fn new(start: u64, end: u64) -> RegionBits {
        let first_frame = page_of(start);
        let frames = (page_of(end - 1) - first_frame) / PAGE_SIZE + 1;
        let words = usize::try_from(frames.div_ceil(64)).unwrap_or(0);
        RegionBits {
            start,
            end,
            first_frame,
            bits: vec![0; words],
        }
    }

    /// (word, mask) of the frame holding `gpa`, which lies in the region.
    fn slot(&self, gpa: u64) -> Option<(usize, u64)> {
        let frame = (page_of(gpa) - self.first_frame) / PAGE_SIZE;
        let word = usize::try_from(frame / 64).ok()?;
        (word < self.bits.len()).then_some((word, 1 << (frame % 64)))
    }
}

/// The frames that have arrived, for every RAM region.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ArrivalMap {
    regions: Vec<RegionBits>,
}

/// What [`ArrivalMap::insert`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Insert {
    /// The frame had not arrived before; it is recorded now.
    New,
    /// The frame had already arrived.
    Duplicate,
    /// The address is not in guest RAM; nothing is recorded.
    OutsideRam,
}

impl ArrivalMap {
    /// An empty map over every region of `ram`.
    pub fn new(ram: &RamMap) -> ArrivalMap {
        ArrivalMap {
            regions: ram
                .regions()
                .iter()
                .map(|r| RegionBits::new(r.start, r.end))
                .collect(),
        }
    }

    fn find(&self, gpa: u64) -> Option<(usize, usize, u64)> {
        self.regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.start <= gpa && gpa < r.end)
            .find_map(|(i, r)| r.slot(gpa).map(|(w, m)| (i, w, m)))
    }

    /// True when the frame holding `gpa` has arrived (false outside RAM).
    pub fn contains(&self, gpa: u64) -> bool {
        self.find(gpa)
            .is_some_and(|(i, w, m)| self.regions[i].bits[w] & m != 0)
    }

    /// Records that the frame holding `gpa` has arrived.
    pub fn insert(&mut self, gpa: u64) -> Insert {
        let Some((i, w, m)) = self.find(gpa) else {
            return Insert::OutsideRam;
        };
        let word = &mut self.regions[i].bits[w];
        if *word & m != 0 {
            return Insert::Duplicate;
        }
        *word |= m;
        Insert::New
    }

    /// Forgets the arrival of the frame holding `gpa`. Returns whether it had arrived.
    pub fn remove(&mut self, gpa: u64) -> bool {
        let Some((i, w, m)) = self.find(gpa) else {
            return false;
        };
        let word = &mut self.regions[i].bits[w];
        let was = *word & m != 0;
        *word &= !m;
        was
    }

    /// Forgets every arrival.
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.bits.fill(0);
        }
    }

    /// Number of frames that have arrived.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_remembered_per_region_and_outside_ram_is_ignored() {
        let ram = RamMap::new([0..0x10_0000, 0x1_0000_0000..0x1_0001_0000]);
        let mut m = ArrivalMap::new(&ram);
        assert!(!m.contains(0x4_2000));
        assert_eq!(m.insert(0x4_2123), Insert::New);
        assert!(m.contains(0x4_2000) && m.contains(0x4_2fff));
        assert!(!m.contains(0x4_1fff) && !m.contains(0x4_3000));
        assert_eq!(m.insert(0x4_2000), Insert::Duplicate);
        assert_eq!(m.insert(0x1_0000_f000), Insert::New);
        assert!(m.contains(0x1_0000_fff8));
        for outside in [0x10_0000, 0x2000_0000, 0x1_0001_0000, u64::MAX] {
            assert_eq!(m.insert(outside), Insert::OutsideRam);
            assert!(!m.contains(outside));
        }
        assert_eq!(m.count(), 2);
        assert!(m.remove(0x4_2000));
        assert!(!m.remove(0x4_2000));
        assert!(!m.contains(0x4_2000));
        m.clear();
        assert_eq!(m.count(), 0);
    }

    #[test]
    fn unaligned_region_edges_cover_their_partial_frames() {
        let ram = RamMap::single(0x800..0x2800);
        let mut m = ArrivalMap::new(&ram);
        assert_eq!(m.insert(0x7ff), Insert::OutsideRam);
        assert_eq!(m.insert(0x800), Insert::New);
        // 0x800 and 0xfff share frame 0.
        assert_eq!(m.insert(0xfff), Insert::Duplicate);
        assert_eq!(m.insert(0x27ff), Insert::New);
        assert_eq!(m.insert(0x2800), Insert::OutsideRam);
        assert_eq!(m.count(), 2);
    }
}
