//! Guest-physical layout owned by the VMM: RAM size rules and RAM regions, the identity page
//! tables and the boot GDT, written into the reserved region
//! `guest_abi::VMM_RESERVED_GPA..BOOT_STACKS_GPA`.
//!
//! RAM (guest-abi "RAM"): `[0, min(size, 3 GiB))` and, above 3 GiB of RAM, the rest at
//! `[4 GiB, 4 GiB + size - 3 GiB)`; `[3 GiB, 4 GiB)` is the MMIO hole (LAPIC, IOAPIC).
//!
//! Paging (guest-abi "Entry"): `[0, 4 GiB)` and the RAM above it identity-mapped with 2 MiB
//! pages, present | writable | user; the 2 MiB page holding the LAPIC (0xfee0_0000)
//! uncached (PCD | PWT). 2 MiB pages need no CPUID feature (1 GiB pages would need
//! `pdpe1gb`, which our hosts offer, but would save nothing that matters here: 64 GiB take
//! 65 page directories, 260 KiB of the reserved region).

use std::ops::Range;

use guest_abi::{BOOT_STACKS_GPA, LAPIC_GPA, VMM_RESERVED_GPA, WORKLOAD_GPA};
use zerocopy::IntoBytes;

use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

/// 2 MiB: the page size of the identity map, and the RAM size granule.
pub const HUGE_PAGE: u64 = 2 << 20;
/// Start of the 32-bit MMIO hole, and the most RAM below it: 3 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole: RAM beyond the first 3 GiB starts here (4 GiB).
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Most RAM accepted: 64 GiB (the page tables have room for it; the host may refuse less,
/// see `machine`).
pub const MAX_RAM: u64 = 64 << 30;
/// Least RAM accepted: the fixed layout below `WORKLOAD_GPA` plus one 2 MiB page of workload
/// memory.
pub const MIN_RAM: u64 = WORKLOAD_GPA + HUGE_PAGE;

/// The boot GDT: null, 64-bit code at 0x08, flat data at 0x10.
pub const GDT_GPA: u64 = VMM_RESERVED_GPA;
/// Page-map level 4.
pub const PML4_GPA: u64 = VMM_RESERVED_GPA + 0x1000;
/// Page-directory-pointer table (one: 512 GiB).
pub const PDPT_GPA: u64 = VMM_RESERVED_GPA + 0x2000;
/// Page directories, one per GiB: GiB 0..4 always (RAM below the hole, the hole), then one
/// per GiB of RAM above 4 GiB.
pub const PD_GPA: u64 = VMM_RESERVED_GPA + 0x3000;
/// Page directories for [`MAX_RAM`].
const MAX_PDS: u64 = (HIGH_RAM_START + MAX_RAM - MMIO_HOLE_START).div_ceil(1 << 30);
const _: () = assert!(PD_GPA + MAX_PDS * 0x1000 <= BOOT_STACKS_GPA);

/// The RAM regions of a guest of `size` bytes (see the module doc), in address order.
pub fn ram_regions(size: u64) -> Vec<Range<u64>> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = Vec::with_capacity(2);
    regions.push(0..low);
    if size > low {
        regions.push(HIGH_RAM_START..HIGH_RAM_START + (size - low));
    }
    regions
}

/// One past the last byte of RAM of a guest of `size` bytes.
pub fn ram_end(size: u64) -> u64 {
    ram_regions(size).last().map_or(0, |r| r.end)
}

/// True when `[gpa, gpa + len)` touches the MMIO hole.
pub fn in_mmio_hole(gpa: u64, len: u64) -> bool {
    let end = gpa.saturating_add(len);
    gpa < HIGH_RAM_START && end > MMIO_HOLE_START
}

/// Code segment selector of the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector of the boot GDT.
pub const DATA_SELECTOR: u16 = 0x10;
/// The GDT's entries.
pub const GDT: [u64; 3] = [
    0,
    0x00af_9b00_0000_ffff, // code: P, DPL 0, S, type 0xb (exec/read, accessed), L, G
    0x00cf_9300_0000_ffff, // data: P, DPL 0, S, type 0x3 (read/write, accessed), D/B, G
];

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// User-accessible.
    pub const US: u64 = 1 << 2;
    /// Write-through.
    pub const PWT: u64 = 1 << 3;
    /// Cache disable.
    pub const PCD: u64 = 1 << 4;
    /// 2 MiB page (in a page-directory entry).
    pub const PS: u64 = 1 << 7;
}

/// Control register and EFER values for 64-bit long mode with paging.
pub mod cr {
    /// CR0: PG | WP | NE | ET | MP | PE.
    pub const CR0: u64 = (1 << 31) | (1 << 16) | (1 << 5) | (1 << 4) | (1 << 1) | 1;
    /// CR4: PAE.
    pub const CR4: u64 = 1 << 5;
    /// EFER: LME | LMA.
    pub const EFER: u64 = (1 << 8) | (1 << 10);
}

/// Parses a size such as `256M`, `1G`, `4096K` or `268435456` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(VmmError::Config(format!(
                        "size {s:?}: unknown unit {c:?} (K, M or G)"
                    )));
                }
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        VmmError::Config(format!(
            "size {s:?} is not a number with an optional K/M/G unit"
        ))
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| VmmError::Config(format!("size {s:?} is absurdly large")))
}

/// Checks a RAM size: a multiple of 2 MiB, at least [`MIN_RAM`], at most [`MAX_RAM`].
pub fn check_ram_size(size: u64) -> Result<()> {
    if !size.is_multiple_of(HUGE_PAGE) {
        return Err(VmmError::Config(format!(
            "memory size {} is not a multiple of 2 MiB",
            human_size(size)
        )));
    }
    if size < MIN_RAM {
        return Err(VmmError::Config(format!(
            "memory size {} MiB is too small: the layout needs at least {} MiB",
            size >> 20,
            MIN_RAM >> 20
        )));
    }
    if size > MAX_RAM {
        return Err(VmmError::Config(format!(
            "memory size {} is too large: at most {}",
            human_size(size),
            human_size(MAX_RAM)
        )));
    }
    Ok(())
}

/// `size` in the largest unit that divides it: `17 MiB`, `1537 KiB`, `100 bytes`.
pub fn human_size(size: u64) -> String {
    if size != 0 && size.is_multiple_of(1 << 30) {
        format!("{} GiB", size >> 30)
    } else if size != 0 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size != 0 && size.is_multiple_of(1 << 10) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} bytes")
    }
}

/// The page-directory entry mapping the 2 MiB page at `addr`.
pub fn pd_entry(addr: u64) -> u64 {
    let mut e = addr | pte::P | pte::RW | pte::US | pte::PS;
    if addr == LAPIC_GPA & !(HUGE_PAGE - 1) {
        e |= pte::PCD | pte::PWT;
    }
    e
}

/// Writes the GDT and the identity page tables into guest RAM: `[0, 4 GiB)` whole, then
/// every 2 MiB page of RAM above it (nothing past the end of RAM).
pub fn write_boot_tables(ram: &GuestRam) -> Result<()> {
    for (i, d) in GDT.iter().enumerate() {
        ram.write_u64(GDT_GPA + 8 * i as u64, *d)?;
    }
    let table = pte::P | pte::RW | pte::US;
    ram.write_u64(PML4_GPA, PDPT_GPA | table)?;
    let end = ram.end().max(HIGH_RAM_START);
    let pds = end.div_ceil(1 << 30);
    if pds > MAX_PDS {
        return Err(VmmError::Config(format!(
            "RAM ends at {end:#x}: the boot page tables map at most {MAX_PDS} GiB"
        )));
    }
    for gib in 0..pds {
        let pd = PD_GPA + gib * 0x1000;
        ram.write_u64(PDPT_GPA + 8 * gib, pd | table)?;
        let mut entries = [0u64; 512];
        for (i, e) in (0u64..).zip(entries.iter_mut()) {
            let addr = (gib << 30) + i * HUGE_PAGE;
            if addr < end {
                *e = pd_entry(addr);
            }
        }
        ram.write(pd, entries.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
        assert_eq!(parse_size("2097152").unwrap(), 2 << 20);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("18446744073709551615G").is_err());
    }

    #[test]
    fn ram_size_rules() {
        assert!(check_ram_size(256 << 20).is_ok());
        assert!(check_ram_size(MIN_RAM).is_ok());
        assert!(check_ram_size(MAX_RAM).is_ok());
        assert!(check_ram_size((256 << 20) + 4096).is_err());
        assert!(check_ram_size(MIN_RAM - HUGE_PAGE).is_err());
        assert!(check_ram_size(MAX_RAM + HUGE_PAGE).is_err());
        assert!(check_ram_size(1 << 50).is_err());
        let e = check_ram_size(0x110_0000 + 0x1000).unwrap_err().to_string();
        assert!(e.contains("17412 KiB is not a multiple of 2 MiB"), "{e}");
        let e = check_ram_size(17 << 20).unwrap_err().to_string();
        assert!(e.contains("17 MiB"), "{e}");
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(100), "100 bytes");
    }

    #[test]
    fn regions_follow_the_x86_convention() {
        let one = |end| vec![Range { start: 0, end }];
        assert_eq!(ram_regions(256 << 20), one(256 << 20));
        assert_eq!(ram_regions(3 << 30), one(3 << 30));
        assert_eq!(
            ram_regions((3 << 30) + HUGE_PAGE),
            [0..3 << 30, 4 << 30..(4 << 30) + HUGE_PAGE]
        );
        assert_eq!(ram_regions(4 << 30), [0..3 << 30, 4 << 30..5 << 30]);
        assert_eq!(ram_end(8 << 30), 9 << 30);
        assert_eq!(ram_end(64 << 20), 64 << 20);
        assert!(in_mmio_hole(LAPIC_GPA, 4096));
        assert!(in_mmio_hole((3 << 30) - 64, 128));
        assert!(!in_mmio_hole((3 << 30) - 64, 64));
        assert!(!in_mmio_hole(4 << 30, 64));
    }

    fn pde(ram: &GuestRam, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        ram.read(
            PD_GPA + (gpa >> 30) * 0x1000 + 8 * ((gpa >> 21) & 511),
            &mut b,
        )
        .unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn identity_map_is_user_writable_and_lapic_uncached() {
        let ram = GuestRam::new(&ram_regions(MIN_RAM)).unwrap();
        write_boot_tables(&ram).unwrap();
        assert_eq!(pde(&ram, HUGE_PAGE), HUGE_PAGE | 0x87);
        // 0xfee0_0000 is in GiB 3, entry (0xfee0_0000 - 3 GiB) / 2 MiB = 503.
        assert_eq!(pde(&ram, 0xfee0_0000), 0xfee0_0000 | 0x9f);
        let mut b = [0u8; 8];
        ram.read(PML4_GPA, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), PDPT_GPA | 7);
        // Nothing above 4 GiB for a small guest.
        ram.read(PDPT_GPA + 8 * 4, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0);
    }

    #[test]
    fn ram_above_the_hole_is_mapped_to_its_end() {
        // 5 GiB + 4 MiB: region 1 is [4 GiB, 6 GiB + 4 MiB).
        let size = (5 << 30) + 2 * HUGE_PAGE;
        let ram = GuestRam::new(&ram_regions(size)).unwrap();
        write_boot_tables(&ram).unwrap();
        assert_eq!(
            pde(&ram, 0xc000_0000),
            0xc000_0000 | 0x87,
            "the hole stays mapped"
        );
        assert_eq!(pde(&ram, 4 << 30), (4 << 30) | 0x87);
        assert_eq!(
            pde(&ram, (6 << 30) + HUGE_PAGE),
            ((6 << 30) + HUGE_PAGE) | 0x87
        );
        assert_eq!(
            pde(&ram, (6 << 30) + 2 * HUGE_PAGE),
            0,
            "past the end of RAM"
        );
        let mut b = [0u8; 8];
        ram.read(PDPT_GPA + 8 * 6, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), (PD_GPA + 6 * 0x1000) | 7);
        ram.read(PDPT_GPA + 8 * 7, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0);
    }
}
