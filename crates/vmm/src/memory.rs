//! Guest RAM: one anonymous mapping per region of guest-physical RAM (the regions
//! [`crate::layout::ram_regions`] gives: below the MMIO hole and above 4 GiB), each
//! registered with KVM as a memory slot.
//!
//! This is the one module that deals in host pointers to guest memory (the KVM memory slot
//! needs the mapping's host address). Everything else reads and writes guest memory through
//! [`GuestRam`]'s bounds-checked accessors, by [`GuestAddress`].

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A guest memory operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `size` bytes cannot be mapped.
    #[error("the host cannot map {size} bytes of guest RAM: {reason}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// Why.
        reason: String,
    },
    /// An access that does not lie wholly in one RAM region (outside RAM, in the MMIO
    /// hole, or across it).
    #[error("access {gpa:#x}+{len} is not inside one guest RAM region ({regions})")]
    OutOfRange {
        /// First byte.
        gpa: u64,
        /// Bytes.
        len: usize,
        /// The regions, as `[start, end)` ranges.
        regions: String,
    },
    /// vm-memory refused an access inside RAM.
    #[error("{op} {gpa:#x}+{len}: {reason}")]
    Access {
        /// `read`, `write`, `host address of`.
        op: &'static str,
        /// First byte.
        gpa: u64,
        /// Bytes.
        len: usize,
        /// What vm-memory said.
        reason: String,
    },
    /// A KVM memory slot could not be registered.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot}: {err}")]
    Slot {
        /// The slot.
        slot: u32,
        /// The errno.
        err: kvm_ioctls::Error,
    },
}

type Result<T, E = MemoryError> = std::result::Result<T, E>;

fn access(op: &'static str, gpa: u64, len: usize, e: &impl std::fmt::Display) -> MemoryError {
    MemoryError::Access {
        op,
        gpa,
        len,
        reason: e.to_string(),
    }
}

/// Marks every mapping of `mem` `MADV_DONTFORK`, as VMMs do with guest RAM: a child the VMM
/// starts (an NBD server, say) never inherits it, and the kernel never merges it with a
/// neighbouring mapping of this process, so its own accounts (`/proc/self/smaps`, read by
/// [`crate::host_memory`]) describe guest RAM alone.
fn keep_apart(mem: &GuestMemoryMmap) -> std::result::Result<(), String> {
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| e.to_string())?;
        let len = usize::try_from(region.len()).map_err(|e| e.to_string())?;
        // SAFETY: `[host, host + len)` is exactly one live mapping owned by `mem`;
        // MADV_DONTFORK changes how fork treats it, never its contents.
        if unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTFORK) } != 0 {
            return Err(format!(
                "madvise(MADV_DONTFORK): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Guest RAM: one or more regions of guest-physical memory, in address order.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<Range<u64>>,
    size: u64,
}

impl GuestRam {
    /// Maps zeroed anonymous memory for each of `regions` (page aligned, ascending, not
    /// overlapping). The regions are validated by the caller
    /// ([`crate::layout::check_ram_size`], [`crate::layout::ram_regions`]).
    pub fn new(regions: &[Range<u64>]) -> Result<GuestRam> {
        let size: u64 = regions.iter().map(|r| r.end - r.start).sum();
        let map = |reason: String| MemoryError::Map { size, reason };
        let ranges = regions
            .iter()
            .map(|r| {
                usize::try_from(r.end - r.start)
                    .map(|len| (GuestAddress(r.start), len))
                    .map_err(|_| map("does not fit the address space".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| map(e.to_string()))?;
        keep_apart(&mem).map_err(map)?;
        Ok(GuestRam {
            mem,
            regions: regions.to_vec(),
            size,
        })
    }

    /// Maps `file` privately (copy on write) as RAM of `regions` (as for [`GuestRam::new`]),
    /// each region at the file offset equal to its guest-physical address: the guest reads
    /// the file's pages, its writes are its own. The file must reach the end of the last
    /// region (where it holds nothing, as in the MMIO hole, a sparse file costs nothing).
    /// Clones of one snapshot each map the shared page cache this way (`crate::clones`).
    pub fn private_file(file: &Arc<File>, regions: &[Range<u64>]) -> Result<GuestRam> {
        let size: u64 = regions.iter().map(|r| r.end - r.start).sum();
        let map = |reason: String| MemoryError::Map { size, reason };
        let end = regions.last().map_or(0, |r| r.end);
        let file_len = file.metadata().map_err(|e| map(e.to_string()))?.len();
        if file_len < end {
            // Pages past the end of the file would raise SIGBUS, not read as RAM.
            return Err(map(format!(
                "the file holds {file_len} bytes, RAM ends at {end:#x}"
            )));
        }
        let mapped = regions
            .iter()
            .map(|r| {
                let len = usize::try_from(r.end - r.start)
                    .map_err(|_| map("does not fit the address space".into()))?;
                let region = vm_memory::MmapRegion::build(
                    Some(FileOffset::from_arc(Arc::clone(file), r.start)),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                )
                .map_err(|e| map(e.to_string()))?;
                vm_memory::GuestRegionMmap::new(region, GuestAddress(r.start))
                    .ok_or_else(|| map("the region does not fit the guest address space".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| map(e.to_string()))?;
        keep_apart(&mem).map_err(map)?;
        Ok(GuestRam {
            mem,
            regions: regions.to_vec(),
            size,
        })
    }

    /// Bytes of RAM, all regions together.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The regions, in address order.
    pub fn regions(&self) -> &[Range<u64>] {
        &self.regions
    }

    /// One past the last byte of RAM.
    pub fn end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.end)
    }

    /// The vm-memory view, for code that wants the `GuestMemory` trait.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// True when `[gpa, gpa + len)` lies wholly in one region (never across the MMIO hole).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len)
            .is_some_and(|end| self.regions.iter().any(|r| r.start <= gpa && end <= r.end))
    }

    /// The host address of `[gpa, gpa + len)`, for registering it with userfaultfd (lazy
    /// restore). Nothing else may use host pointers to guest memory.
    pub fn host_ptr(&self, gpa: u64, len: usize) -> Result<*mut u8> {
        self.check(gpa, len)?;
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| access("host address of", gpa, len, &e))
    }

    /// Registers every region as a KVM memory slot of `vm`. Only for [`crate::kvm::vm::Vm`],
    /// which holds this RAM alive for as long as the VM exists.
    pub(crate) fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| access("host address of", region.start_addr().0, 0, &e))?;
            let desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by
            // `self.mem`. The VM (and so the slot) never outlives it: the only caller,
            // `Vm::create`, keeps an `Arc` of this RAM in the `Vm` that owns the VM fd.
            unsafe { vm.set_user_memory_region(desc) }.map_err(|err| MemoryError::Slot {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                err,
            })?;
        }
        Ok(())
    }

    /// Writes `bytes` at `gpa`; errors when any byte falls outside RAM.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<()> {
        self.check(gpa, bytes.len())?;
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| access("write", gpa, bytes.len(), &e))
    }

    /// Reads `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| access("read", gpa, buf.len(), &e))
    }

    /// Writes a little-endian u32.
    pub fn write_u32(&self, gpa: u64, value: u32) -> Result<()> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, gpa: u64) -> Result<u32> {
        let mut b = [0; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<()> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Writes a plain-old-data structure.
    pub fn write_obj<T: IntoBytes + Immutable>(&self, gpa: u64, value: &T) -> Result<()> {
        self.write(gpa, value.as_bytes())
    }

    /// Reads a plain-old-data structure.
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, gpa: u64) -> Result<T> {
        let mut value = T::new_zeroed();
        self.read(gpa, value.as_mut_bytes())?;
        Ok(value)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<()> {
        if self.contains(gpa, len as u64) {
            Ok(())
        } else {
            Err(MemoryError::OutOfRange {
                gpa,
                len,
                regions: self
                    .regions
                    .iter()
                    .map(|r| format!("[{:#x}, {:#x})", r.start, r.end))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }
}

/// True when `bytes` are all zero. A comparison with a zeroed block (`memcmp`), fast in
/// debug builds too: snapshot writing and eager restore skip zero blocks of big guests.
pub fn is_zero(bytes: &[u8]) -> bool {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    bytes
        .chunks(ZEROS.len())
        .all(|piece| piece == &ZEROS[..piece.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked() {
        let ram = GuestRam::new(&crate::layout::ram_regions(2 << 20)).unwrap();
        ram.write_u32(0x1000, 0xdead_beef).unwrap();
        assert_eq!(ram.read_u32(0x1000).unwrap(), 0xdead_beef);
        assert!(ram.write_u32((2 << 20) - 2, 1).is_err());
        assert!(ram.read_u32(u64::MAX - 1).is_err());
        assert!(ram.contains(0, 2 << 20));
        assert!(!ram.contains(1, 2 << 20));
    }

    #[test]
    fn accesses_by_address_refuse_the_hole() {
        let ram = GuestRam::new(&crate::layout::ram_regions((3 << 30) + (2 << 20))).unwrap();
        assert_eq!(
            (ram.size(), ram.end()),
            ((3 << 30) + (2 << 20), (4 << 30) + (2 << 20))
        );
        ram.write_u64(4 << 30, 7).unwrap();
        let mut b = [0u8; 8];
        ram.read(4 << 30, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 7);
        ram.write_u32((3 << 30) - 4, 1).unwrap();
        let e = ram.write_u32(3 << 30, 1).unwrap_err().to_string();
        assert!(
            e.contains("[0x0, 0xc0000000), [0x100000000, 0x100200000)"),
            "{e}"
        );
        assert!(ram.read(0xfee0_0000, &mut b).is_err());
        assert!(!ram.contains((3 << 30) - 8, 16), "across the hole");
        assert!(!ram.contains((4 << 30) + (2 << 20) - 4, 8), "past the end");
        assert!(ram.host_ptr(0xd000_0000, 4096).is_err());
    }

    #[test]
    fn a_private_file_maps_each_region_at_the_offset_of_its_address() {
        use std::os::unix::fs::FileExt;
        let regions = crate::layout::ram_regions((3 << 30) + (2 << 20));
        let file = tempfile::tempfile().unwrap();
        file.set_len(regions[1].end).unwrap();
        file.write_all_at(&[5u8; 8], 4 << 30).unwrap();
        file.write_all_at(&[6u8; 8], 0x1000).unwrap();
        let file = Arc::new(file);
        let ram = GuestRam::private_file(&file, &regions).unwrap();
        assert_eq!(
            (ram.regions(), ram.size()),
            (&regions[..], (3 << 30) + (2 << 20))
        );
        assert_eq!(ram.read_u32(4 << 30).unwrap(), 0x0505_0505);
        assert_eq!(ram.read_u32(0x1000).unwrap(), 0x0606_0606);
        assert_eq!(
            ram.read_u32((3 << 30) - 4).unwrap(),
            0,
            "a hole of the file"
        );
        // Copy on write: the guest's writes are its own.
        ram.write_u32(4 << 30, 9).unwrap();
        assert_eq!(ram.read_u32(4 << 30).unwrap(), 9);
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, 4 << 30).unwrap();
        assert_eq!(b, [5; 4]);
        // A file that ends before RAM does is refused (its pages would be SIGBUS).
        file.set_len(4 << 30).unwrap();
        let e = GuestRam::private_file(&file, &regions).unwrap_err();
        assert!(e.to_string().contains("RAM ends at 0x100200000"), "{e}");
    }

    #[test]
    fn zero_blocks_are_recognised() {
        let mut b = vec![0u8; 200 << 10];
        assert!(is_zero(&b) && is_zero(&[]));
        b[(200 << 10) - 1] = 1;
        assert!(!is_zero(&b));
    }
}
