//! Guest-physical layout owned by the VMM: RAM size rules, the identity page tables and the
//! boot GDT, written into the reserved region `guest_abi::VMM_RESERVED_GPA..BOOT_STACKS_GPA`.
//!
//! Paging (guest-abi "Entry"): `[0, 4 GiB)` identity-mapped with 2 MiB pages,
//! present | writable | user; the 2 MiB page holding the LAPIC (0xfee0_0000) uncached
//! (PCD | PWT). Guest RAM stays below [`MAX_RAM`] (under the 32-bit MMIO hole), so no map
//! above 4 GiB is needed yet.

use guest_abi::{BOOT_STACKS_GPA, LAPIC_GPA, VMM_RESERVED_GPA, WORKLOAD_GPA};

use crate::error::{Result, VmmError};
use crate::memory::GuestRam;

/// 2 MiB: the page size of the identity map, and the RAM size granule.
pub const HUGE_PAGE: u64 = 2 << 20;
/// Most RAM accepted: everything must lie below the 32-bit MMIO hole at 3 GiB.
pub const MAX_RAM: u64 = 0xc000_0000;
/// Least RAM accepted: the fixed layout below `WORKLOAD_GPA` plus one 2 MiB page of workload
/// memory.
pub const MIN_RAM: u64 = WORKLOAD_GPA + HUGE_PAGE;

/// The boot GDT: null, 64-bit code at 0x08, flat data at 0x10.
pub const GDT_GPA: u64 = VMM_RESERVED_GPA;
/// Page-map level 4.
pub const PML4_GPA: u64 = VMM_RESERVED_GPA + 0x1000;
/// Page-directory-pointer table (one: 512 GiB).
pub const PDPT_GPA: u64 = VMM_RESERVED_GPA + 0x2000;
/// Four page directories, one per GiB of `[0, 4 GiB)`.
pub const PD_GPA: u64 = VMM_RESERVED_GPA + 0x3000;
const PD_COUNT: u64 = 4;
const _: () = assert!(PD_GPA + PD_COUNT * 0x1000 <= BOOT_STACKS_GPA);

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
            "memory size {} MiB is too large: at most {} MiB (RAM must stay below the MMIO hole at 3 GiB)",
            size >> 20,
            MAX_RAM >> 20
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

/// Writes the GDT and the identity page tables into guest RAM.
pub fn write_boot_tables(ram: &GuestRam) -> Result<()> {
    for (i, d) in GDT.iter().enumerate() {
        ram.write_u64(GDT_GPA + 8 * i as u64, *d)?;
    }
    let table = pte::P | pte::RW | pte::US;
    ram.write_u64(PML4_GPA, PDPT_GPA | table)?;
    for gib in 0..PD_COUNT {
        let pd = PD_GPA + gib * 0x1000;
        ram.write_u64(PDPT_GPA + 8 * gib, pd | table)?;
        for i in 0..512 {
            let addr = (gib << 30) + i * HUGE_PAGE;
            ram.write_u64(pd + 8 * i, pd_entry(addr))?;
        }
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
    fn identity_map_is_user_writable_and_lapic_uncached() {
        let ram = GuestRam::new(MIN_RAM).unwrap();
        write_boot_tables(&ram).unwrap();
        let mut b = [0u8; 8];
        ram.read(PD_GPA + 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), HUGE_PAGE | 0x87);
        // 0xfee0_0000 is in GiB 3, entry (0xfee0_0000 - 3 GiB) / 2 MiB = 503.
        ram.read(PD_GPA + 3 * 0x1000 + 8 * 503, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xfee0_0000 | 0x9f);
        ram.read(PML4_GPA, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), PDPT_GPA | 7);
    }
}
