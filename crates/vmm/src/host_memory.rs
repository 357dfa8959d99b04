//! What guest memory costs the host, in the kernel's own accounts (through the procfs
//! crate): the resident, proportional (PSS: a page mapped by k mappings counts 1/k in each)
//! and anonymous (private copies: pages a guest wrote, or anonymous RAM) bytes of the
//! mappings that hold guest RAM, from `/proc/self/smaps`; and `MemAvailable`.

use std::ops::Range;

use procfs::Current;

use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

/// Host memory held by some mappings of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MappingUsage {
    /// Resident bytes (`Rss`).
    pub rss_bytes: u64,
    /// Proportional set size (`Pss`): a page shared by k mappings counts 1/k in each.
    pub pss_bytes: u64,
    /// Anonymous bytes (`Anonymous`): private copies (for a clone, the pages it wrote).
    pub anonymous_bytes: u64,
}

impl std::ops::Add for MappingUsage {
    type Output = MappingUsage;
    fn add(self, o: MappingUsage) -> MappingUsage {
        MappingUsage {
            rss_bytes: self.rss_bytes + o.rss_bytes,
            pss_bytes: self.pss_bytes + o.pss_bytes,
            anonymous_bytes: self.anonymous_bytes + o.anonymous_bytes,
        }
    }
}

fn os(what: &'static str) -> impl FnOnce(procfs::ProcError) -> VmmError {
    move |e| VmmError::Os {
        what,
        err: std::io::Error::other(e),
    }
}

/// `ranges` sorted, those that touch or overlap merged: the kernel may merge the mappings
/// of two RAM regions that lie side by side into one.
fn coalesce(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The usage of every mapping of this process that lies inside one of `ranges` (host
/// addresses; ranges side by side count as one).
pub fn usage_of(ranges: &[Range<u64>]) -> Result<MappingUsage> {
    let ranges = coalesce(ranges);
    let maps = procfs::process::Process::myself()
        .and_then(|p| p.smaps())
        .map_err(os("reading /proc/self/smaps"))?;
    let mut u = MappingUsage::default();
    for m in maps {
        let (start, end) = m.address;
        if !ranges.iter().any(|r| start >= r.start && end <= r.end) {
            continue;
        }
        let get = |k: &str| m.extension.map.get(k).copied().unwrap_or(0);
        u = u + MappingUsage {
            rss_bytes: get("Rss"),
            pss_bytes: get("Pss"),
            anonymous_bytes: get("Anonymous"),
        };
    }
    Ok(u)
}

/// The host address ranges of `ram`: one per RAM region (each its own mapping).
pub fn host_ranges(ram: &GuestRam) -> Result<Vec<Range<u64>>> {
    ram.regions()
        .iter()
        .map(|r| {
            let len = r.end - r.start;
            let start = ram.host_ptr(r.start, usize::try_from(len).unwrap_or(usize::MAX))? as u64;
            Ok(start..start + len)
        })
        .collect()
}

/// The usage of `ram`'s mappings, all regions together.
pub fn ram_usage(ram: &GuestRam) -> Result<MappingUsage> {
    usage_of(&host_ranges(ram)?)
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
pub fn mem_available() -> Result<u64> {
    let m = procfs::Meminfo::current().map_err(os("reading /proc/meminfo"))?;
    m.mem_available.ok_or_else(|| VmmError::Os {
        what: "reading /proc/meminfo",
        err: std::io::Error::other("no MemAvailable line"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_ram_counts_what_was_touched() {
        let ram = GuestRam::new(&crate::layout::ram_regions(4 << 20)).unwrap();
        assert_eq!(ram_usage(&ram).unwrap().rss_bytes, 0);
        ram.write(0, &[1u8; 3 * 4096]).unwrap();
        let u = ram_usage(&ram).unwrap();
        assert_eq!(u.rss_bytes, 3 * 4096, "{u:?}");
        assert_eq!(u.pss_bytes, 3 * 4096, "{u:?}");
        assert_eq!(u.anonymous_bytes, 3 * 4096, "{u:?}");
        assert!(mem_available().unwrap() > 0);
    }

    #[test]
    fn ranges_side_by_side_are_one() {
        assert_eq!(coalesce(&[8..12, 0..4, 4..6, 10..16]), [0..6, 8..16]);
        assert_eq!(coalesce(&[]), []);
    }

    #[test]
    fn clone_ram_above_the_hole_counts_in_every_region() {
        // A clone's RAM on both sides of the MMIO hole: two private mappings of one file
        // (at the offsets of their addresses), both measured; what the guest wrote is
        // anonymous, the file untouched.
        let regions = crate::layout::ram_regions((3 << 30) + (2 << 20));
        let file = tempfile::tempfile().unwrap();
        file.set_len(regions[1].end).unwrap();
        let file = std::sync::Arc::new(file);
        let ram = GuestRam::private_file(&file, &regions).unwrap();
        assert_eq!(host_ranges(&ram).unwrap().len(), 2);
        assert_eq!(ram_usage(&ram).unwrap().anonymous_bytes, 0);
        ram.write(0, &[1u8; 2 * 4096]).unwrap();
        ram.write(4 << 30, &[1u8; 3 * 4096]).unwrap();
        let u = ram_usage(&ram).unwrap();
        assert_eq!(u.anonymous_bytes, 5 * 4096, "{u:?}");
        assert!(u.rss_bytes >= 5 * 4096, "{u:?}");
    }
}
