//! The memory file's description in the manifest: its size, its chunk checksums, and the
//! guest RAM regions it holds back to back (format 2; the MMIO hole is not stored).
//!
//! ```text
//! memory.raw:  [ region 0: gpa 0 .. 3 GiB ][ region 1: gpa 4 GiB .. 4 GiB + rest ]
//!              ^ file_offset 0             ^ file_offset 3 GiB
//! crc32[i]:    bytes [i * chunk_size, (i + 1) * chunk_size) of the file
//! ```
//! [`MemoryInfo::file_offset`] is the one place where a guest-physical address becomes a
//! file offset ([`crate::source`] serves guest pages through it; snapshot taking writes the
//! regions in the same order).

use std::ops::Range;

use guest_abi::MAX_RAM_REGIONS;
use serde::{Deserialize, Serialize};

use crate::layout;

/// One region of guest RAM and where it lies in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// First guest-physical byte.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of its first byte in the memory file.
    pub file_offset: u64,
}

/// The memory file's description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// File name inside the snapshot directory.
    pub file: String,
    /// Bytes of the file (= RAM size: the regions' sizes added up).
    pub size: u64,
    /// Bytes per checksum.
    pub chunk_size: u64,
    /// The RAM regions the file holds, back to back (format 2; a format 1 manifest has none
    /// and is read as one region `[0, size)` at offset 0).
    #[serde(default)]
    pub regions: Vec<MemoryRegion>,
    /// CRC-32 (IEEE, crc32fast) of each chunk of the file, in file order.
    pub crc32: Vec<u32>,
}

/// The file layout of guest RAM `ram` (regions in address order): back to back, in address
/// order, from offset 0.
pub fn regions_of(ram: &[Range<u64>]) -> Vec<MemoryRegion> {
    let mut file_offset = 0;
    ram.iter()
        .map(|r| {
            let region = MemoryRegion {
                gpa: r.start,
                size: r.end - r.start,
                file_offset,
            };
            file_offset += region.size;
            region
        })
        .collect()
}

impl MemoryInfo {
    /// The file offset of guest-physical `[gpa, gpa + len)`, when it lies wholly in one
    /// region; `None` otherwise (outside RAM, in the hole, across a region's end).
    pub fn file_offset(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa.saturating_add(r.size))
            .map(|r| r.file_offset + (gpa - r.gpa))
    }

    /// The guest-physical address held at file offset `offset` (for messages about what
    /// was read at an offset).
    pub fn gpa_at(&self, offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| offset >= r.file_offset && offset - r.file_offset < r.size)
            .map(|r| r.gpa + (offset - r.file_offset))
    }

    /// The manifest's memory checks against the configured RAM size `mem_size`; the error
    /// names the field.
    pub(crate) fn check(&self, mem_size: u64) -> Result<(), String> {
        if self.size != mem_size {
            return Err(format!(
                "memory size {} differs from the configured {}",
                self.size, mem_size
            ));
        }
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(4096) {
            return Err(format!(
                "chunk size {} is not a multiple of 4096",
                self.chunk_size
            ));
        }
        // Restore reads the memory one chunk-sized buffer at a time: a chunk of 1 TiB (with
        // the one checksum it then needs) aborted it on the allocation.
        if self.chunk_size > self.size.max(4096) {
            return Err(format!(
                "chunk size {} is larger than the memory ({} bytes)",
                self.chunk_size, self.size
            ));
        }
        if self.crc32.len() as u64 != self.size.div_ceil(self.chunk_size) {
            return Err(format!(
                "{} chunk checksums for {} bytes in chunks of {}",
                self.crc32.len(),
                self.size,
                self.chunk_size
            ));
        }
        if self.file.contains('/') || self.file.is_empty() {
            return Err(format!("memory file name {:?}", self.file));
        }
        self.check_regions(mem_size)
    }

    fn check_regions(&self, mem_size: u64) -> Result<(), String> {
        const FIELD: &str = "memory.regions";
        let regions = &self.regions;
        if regions.is_empty() {
            return Err(format!("{FIELD} is empty"));
        }
        if regions.len() > MAX_RAM_REGIONS {
            return Err(format!(
                "{FIELD} has {} regions, at most {MAX_RAM_REGIONS}",
                regions.len()
            ));
        }
        let chunk = self.chunk_size;
        for (i, r) in regions.iter().enumerate() {
            let (Some(end), Some(file_end)) =
                (r.gpa.checked_add(r.size), r.file_offset.checked_add(r.size))
            else {
                return Err(format!("{FIELD}[{i}]: size {:#x} overflows", r.size));
            };
            if r.size == 0 {
                return Err(format!("{FIELD}[{i}] is empty"));
            }
            if layout::in_mmio_hole(r.gpa, r.size) {
                return Err(format!(
                    "{FIELD}[{i}] ({:#x}..{end:#x}) lies in the MMIO hole {:#x}..{:#x}",
                    r.gpa,
                    layout::MMIO_HOLE_START,
                    layout::HIGH_RAM_START
                ));
            }
            let ends_the_file = file_end == self.size;
            if !r.gpa.is_multiple_of(chunk)
                || !r.file_offset.is_multiple_of(chunk)
                || !(r.size.is_multiple_of(chunk) || ends_the_file)
            {
                return Err(format!(
                    "{FIELD}[{i}] (gpa {:#x}, size {:#x}, file_offset {:#x}): a chunk of {chunk} \
                     bytes would cross its boundary (only the region that ends the file may end \
                     in a partial chunk)",
                    r.gpa, r.size, r.file_offset
                ));
            }
        }
        for (i, a) in regions.iter().enumerate() {
            for (j, b) in regions.iter().enumerate().skip(i + 1) {
                if a.gpa < b.gpa + b.size && b.gpa < a.gpa + a.size {
                    return Err(format!("{FIELD}[{i}] and {FIELD}[{j}] overlap"));
                }
            }
        }
        let mut by_offset: Vec<(usize, &MemoryRegion)> = regions.iter().enumerate().collect();
        by_offset.sort_by_key(|(_, r)| r.file_offset);
        let mut at = 0;
        for (i, r) in by_offset {
            if r.file_offset != at {
                return Err(format!(
                    "{FIELD}[{i}] starts at file offset {:#x}, expected {at:#x}: the regions must \
                     cover the memory file back to back",
                    r.file_offset
                ));
            }
            at += r.size;
        }
        if at != self.size {
            return Err(format!(
                "{FIELD} cover {at} bytes, not the memory file's {}",
                self.size
            ));
        }
        let mut got: Vec<Range<u64>> = regions.iter().map(|r| r.gpa..r.gpa + r.size).collect();
        got.sort_by_key(|r| r.start);
        let want = layout::ram_regions(mem_size);
        if got != want {
            return Err(format!(
                "{FIELD} {got:#x?} are not the RAM of a {} guest: {want:#x?}",
                layout::human_size(mem_size)
            ));
        }
        Ok(())
    }
}

/// Computes the chunk checksums of a memory image being written, chunk by chunk.
#[derive(Debug)]
pub struct ChunkHasher {
    chunk_size: u64,
    crcs: Vec<u32>,
    current: crc32fast::Hasher,
    filled: u64,
}

impl ChunkHasher {
    /// A hasher for chunks of `chunk_size` bytes.
    pub fn new(chunk_size: u64) -> ChunkHasher {
        ChunkHasher {
            chunk_size,
            crcs: Vec::new(),
            current: crc32fast::Hasher::new(),
            filled: 0,
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = usize::try_from(self.chunk_size - self.filled).unwrap_or(usize::MAX);
            let n = room.min(data.len());
            self.current.update(&data[..n]);
            self.filled += n as u64;
            data = &data[n..];
            if self.filled == self.chunk_size {
                let h = std::mem::replace(&mut self.current, crc32fast::Hasher::new());
                self.crcs.push(h.finalize());
                self.filled = 0;
            }
        }
    }

    /// The checksums, the last (partial) chunk included.
    pub fn finish(mut self) -> Vec<u32> {
        if self.filled > 0 {
            self.crcs.push(self.current.finalize());
        }
        self.crcs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format::CHUNK_SIZE;

    #[test]
    fn chunk_hasher_matches_per_chunk_crcs() {
        let data: Vec<u8> = (0..(3 * CHUNK_SIZE + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut h = ChunkHasher::new(CHUNK_SIZE);
        for piece in data.chunks(7777) {
            h.update(piece);
        }
        let crcs = h.finish();
        let expected: Vec<u32> = data
            .chunks(usize::try_from(CHUNK_SIZE).unwrap())
            .map(crc32fast::hash)
            .collect();
        assert_eq!(crcs, expected);
    }

    fn info(mem: u64) -> MemoryInfo {
        MemoryInfo {
            file: "memory.raw".into(),
            size: mem,
            chunk_size: CHUNK_SIZE,
            regions: regions_of(&layout::ram_regions(mem)),
            crc32: vec![0; usize::try_from(mem / CHUNK_SIZE).unwrap()],
        }
    }

    #[test]
    fn guest_addresses_map_to_file_offsets_without_the_hole() {
        let m = info(5 << 30);
        assert_eq!(m.check(5 << 30), Ok(()));
        assert_eq!(m.file_offset(0x1000, 4096), Some(0x1000));
        assert_eq!(
            m.file_offset((3 << 30) - 4096, 4096),
            Some((3 << 30) - 4096)
        );
        assert_eq!(m.file_offset(4 << 30, 4096), Some(3 << 30));
        assert_eq!(
            m.file_offset((6 << 30) - 4096, 4096),
            Some((5 << 30) - 4096)
        );
        assert_eq!(m.file_offset(3 << 30, 4096), None, "the hole");
        assert_eq!(
            m.file_offset((3 << 30) - 4096, 8192),
            None,
            "across the hole"
        );
        assert_eq!(m.file_offset(6 << 30, 4096), None, "past the end");
        assert_eq!(m.file_offset(u64::MAX, 2), None);
        assert_eq!(m.gpa_at(3 << 30), Some(4 << 30));
        assert_eq!(m.gpa_at(5 << 30), None);
    }

    #[test]
    fn inconsistent_regions_are_refused_naming_the_field() {
        let mem = 4 << 30;
        let refused = |edit: &dyn Fn(&mut MemoryInfo), why: &str| {
            let mut m = info(mem);
            edit(&mut m);
            let e = m.check(mem).unwrap_err();
            assert!(e.contains(why), "{e:?} does not say {why:?}");
        };
        refused(&|m| m.regions.clear(), "memory.regions is empty");
        refused(
            &|m| m.regions[1].gpa = 3 << 30,
            "memory.regions[1] (0xc0000000..",
        );
        refused(
            &|m| m.regions[1].gpa = 0x1000_0000,
            "memory.regions[0] and memory.regions[1] overlap",
        );
        refused(
            &|m| m.regions[1].file_offset += CHUNK_SIZE,
            "memory.regions[1] starts at file offset",
        );
        refused(
            &|m| m.regions[1].gpa += 4096,
            "memory.regions[1] (gpa 0x100001000",
        );
        refused(&|m| m.regions[1].size = u64::MAX, "memory.regions[1]: size");
        refused(
            &|m| {
                m.regions[0].size -= 4096;
                m.regions[1].file_offset -= 4096;
            },
            "a chunk of 65536 bytes would cross its boundary",
        );
        refused(
            &|m| m.regions[1].size -= 2 << 20,
            "cover 4292870144 bytes, not the memory file's",
        );
        refused(
            &|m| {
                m.regions[1].gpa = 6 << 30;
            },
            "are not the RAM of a 4 GiB guest",
        );
        refused(&|m| m.regions[0].size = 0, "memory.regions[0] is empty");
    }
}
