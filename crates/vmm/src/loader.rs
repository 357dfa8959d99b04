//! Loads the guest kernel: an ELF64 x86-64 executable whose `PT_LOAD` segments go to their
//! physical addresses, all inside `[KERNEL_MIN_GPA, KERNEL_END_GPA)` (guest-abi layout).
//!
//! The guest runs on an identity map, so each segment's virtual address must equal its
//! physical address, and the entry point must lie in an executable segment.

use guest_abi::{KERNEL_END_GPA, KERNEL_MIN_GPA};
use object::elf::{EM_X86_64, ET_DYN, ET_EXEC, PF_X, PT_LOAD};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object};

use crate::memory::GuestRam;

/// Why a guest image was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    /// The image is empty.
    #[error("the image is empty (no guest kernel was built or given)")]
    Empty,
    /// No ELF magic.
    #[error("not an ELF file (bad magic)")]
    NotElf,
    /// An ELF, but not 64-bit little-endian x86-64.
    #[error("not an ELF64 x86-64 executable: {0}")]
    WrongKind(String),
    /// The ELF is damaged or truncated.
    #[error("malformed or truncated ELF: {0}")]
    Malformed(String),
    /// A segment falls outside the kernel region.
    #[error(
        "segment {index} at {start:#x}..{end:#x} lies outside the kernel region {KERNEL_MIN_GPA:#x}..{KERNEL_END_GPA:#x}"
    )]
    OutOfRegion {
        /// Program-header index.
        index: usize,
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// A segment's virtual and physical addresses differ.
    #[error(
        "segment {index}: virtual address {vaddr:#x} differs from physical {paddr:#x} (the guest runs identity-mapped)"
    )]
    NotIdentity {
        /// Program-header index.
        index: usize,
        /// `p_vaddr`.
        vaddr: u64,
        /// `p_paddr`.
        paddr: u64,
    },
    /// Two segments overlap.
    #[error("segments overlap at {0:#x}")]
    Overlap(u64),
    /// No loadable segment.
    #[error("no PT_LOAD segment")]
    NoSegments,
    /// The entry point is not in an executable segment.
    #[error("entry point {0:#x} is not inside an executable loaded segment")]
    BadEntry(u64),
    /// The segment could not be written (guest RAM too small?).
    #[error("cannot write segment {index} into guest RAM: {reason}")]
    Write {
        /// Program-header index.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// One `PT_LOAD` segment, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub gpa: u64,
    /// Bytes from the file.
    pub data: Vec<u8>,
    /// Size in memory (the rest beyond `data` is zero).
    pub mem_size: u64,
    /// Executable.
    pub exec: bool,
}

/// A validated kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    /// Entry point (guest-physical = virtual).
    pub entry: u64,
    /// Segments to load.
    pub segments: Vec<Segment>,
}

/// Parses and validates an image.
pub fn parse(data: &[u8]) -> Result<KernelImage, LoadError> {
    if data.is_empty() {
        return Err(LoadError::Empty);
    }
    if data.len() < 4 || data[..4] != *b"\x7fELF" {
        return Err(LoadError::NotElf);
    }
    if data.len() < 6 {
        return Err(LoadError::Malformed("header truncated".into()));
    }
    if data[4] != 2 {
        return Err(LoadError::WrongKind("not a 64-bit ELF".into()));
    }
    if data[5] != 1 {
        return Err(LoadError::WrongKind("not little-endian".into()));
    }
    let file =
        ElfFile64::<Endianness>::parse(data).map_err(|e| LoadError::Malformed(e.to_string()))?;
    let endian = file.endian();
    let hdr = file.elf_header();
    if hdr.e_machine(endian) != EM_X86_64 {
        return Err(LoadError::WrongKind(format!(
            "machine {} is not x86-64",
            hdr.e_machine(endian)
        )));
    }
    let ty = hdr.e_type(endian);
    if ty != ET_EXEC && ty != ET_DYN {
        return Err(LoadError::WrongKind(format!(
            "ELF type {ty} is not an executable"
        )));
    }
    let mut segments: Vec<Segment> = Vec::new();
    for (index, ph) in file.elf_program_headers().iter().enumerate() {
        if ph.p_type(endian) != PT_LOAD || ph.p_memsz(endian) == 0 {
            continue;
        }
        let (paddr, vaddr) = (ph.p_paddr(endian), ph.p_vaddr(endian));
        let (filesz, memsz) = (ph.p_filesz(endian), ph.p_memsz(endian));
        if filesz > memsz {
            return Err(LoadError::Malformed(format!(
                "segment {index}: file size exceeds memory size"
            )));
        }
        if vaddr != paddr {
            return Err(LoadError::NotIdentity {
                index,
                vaddr,
                paddr,
            });
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| LoadError::Malformed(format!("segment {index}: address overflow")))?;
        if paddr < KERNEL_MIN_GPA || end > KERNEL_END_GPA {
            return Err(LoadError::OutOfRegion {
                index,
                start: paddr,
                end,
            });
        }
        let bytes = ph.data(endian, data).map_err(|()| {
            LoadError::Malformed(format!(
                "segment {index}: file data out of bounds (truncated?)"
            ))
        })?;
        segments.push(Segment {
            gpa: paddr,
            data: bytes.to_vec(),
            mem_size: memsz,
            exec: ph.p_flags(endian) & PF_X != 0,
        });
    }
    if segments.is_empty() {
        return Err(LoadError::NoSegments);
    }
    segments.sort_by_key(|s| s.gpa);
    for w in segments.windows(2) {
        if w[0].gpa + w[0].mem_size > w[1].gpa {
            return Err(LoadError::Overlap(w[1].gpa));
        }
    }
    let entry = file.entry();
    if !segments
        .iter()
        .any(|s| s.exec && entry >= s.gpa && entry < s.gpa + s.mem_size)
    {
        return Err(LoadError::BadEntry(entry));
    }
    Ok(KernelImage { entry, segments })
}

impl KernelImage {
    /// Copies the segments into guest RAM (the tail beyond the file data is zeroed).
    pub fn load(&self, ram: &GuestRam) -> Result<(), LoadError> {
        for (index, seg) in self.segments.iter().enumerate() {
            let write = |gpa, bytes: &[u8]| {
                ram.write(gpa, bytes).map_err(|e| LoadError::Write {
                    index,
                    reason: e.to_string(),
                })
            };
            write(seg.gpa, &seg.data)?;
            let zeros = usize::try_from(seg.mem_size).unwrap_or(usize::MAX) - seg.data.len();
            write(seg.gpa + seg.data.len() as u64, &vec![0; zeros])?;
        }
        Ok(())
    }
}

/// Builds a minimal ELF64 x86-64 executable with one RWX segment holding `code` at `gpa`,
/// entered at its first byte. For tests (a crafted guest that faults on purpose).
pub fn build_tiny_elf(gpa: u64, code: &[u8]) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&ET_EXEC.to_le_bytes());
    f.extend_from_slice(&EM_X86_64.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&gpa.to_le_bytes()); // e_entry
    f.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    f.extend_from_slice(&PT_LOAD.to_le_bytes());
    f.extend_from_slice(&7u32.to_le_bytes()); // p_flags RWX
    f.extend_from_slice(&(EHDR + PHDR).to_le_bytes()); // p_offset
    f.extend_from_slice(&gpa.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&gpa.to_le_bytes()); // p_paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const UD2: [u8; 2] = [0x0f, 0x0b];

    #[test]
    fn tiny_elf_parses() {
        let img = parse(&build_tiny_elf(KERNEL_MIN_GPA, &UD2)).unwrap();
        assert_eq!(img.entry, KERNEL_MIN_GPA);
        assert_eq!(img.segments.len(), 1);
        assert_eq!(img.segments[0].data, UD2);
    }

    #[test]
    fn broken_images_are_refused_clearly() {
        assert_eq!(parse(b""), Err(LoadError::Empty));
        assert_eq!(parse(b"#!/bin/sh\necho hi\n"), Err(LoadError::NotElf));
        let elf = build_tiny_elf(KERNEL_MIN_GPA, &UD2);
        for cut in [5, 20, 64, 100, elf.len() - 1] {
            assert!(parse(&elf[..cut]).is_err(), "cut at {cut}");
        }
        let mut elf32 = elf.clone();
        elf32[4] = 1;
        assert!(matches!(parse(&elf32), Err(LoadError::WrongKind(_))));
        let mut arm = elf.clone();
        arm[18] = 183; // EM_AARCH64
        assert!(matches!(parse(&arm), Err(LoadError::WrongKind(_))));
    }

    #[test]
    fn segments_must_lie_in_the_kernel_region() {
        assert!(matches!(
            parse(&build_tiny_elf(0x1000, &UD2)),
            Err(LoadError::OutOfRegion { .. })
        ));
        assert!(matches!(
            parse(&build_tiny_elf(KERNEL_END_GPA - 1, &UD2)),
            Err(LoadError::OutOfRegion { .. })
        ));
    }

    #[test]
    fn load_writes_the_segment() {
        let ram = GuestRam::new(&crate::layout::ram_regions(crate::layout::MIN_RAM)).unwrap();
        parse(&build_tiny_elf(KERNEL_MIN_GPA, &UD2))
            .unwrap()
            .load(&ram)
            .unwrap();
        let mut b = [0; 2];
        ram.read(KERNEL_MIN_GPA, &mut b).unwrap();
        assert_eq!(b, UD2);
    }
}
