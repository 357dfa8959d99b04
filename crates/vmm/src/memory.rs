//! Guest RAM: one anonymous mapping at guest-physical 0, registered with KVM.
//!
//! This is the one module that deals in host pointers to guest memory (the KVM memory slot
//! needs the mapping's host address). Everything else reads and writes guest memory through
//! [`GuestRam`]'s bounds-checked accessors, by [`GuestAddress`].

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A guest memory operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `size` bytes cannot be mapped.
    #[error("cannot map {size} bytes: {reason}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// Why.
        reason: String,
    },
    /// An access that does not lie wholly in RAM.
    #[error("access {gpa:#x}+{len} outside guest RAM [0, {size:#x})")]
    OutOfRange {
        /// First byte.
        gpa: u64,
        /// Bytes.
        len: usize,
        /// RAM size.
        size: u64,
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

/// Guest RAM: `[0, size)`.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed anonymous memory. `size` is validated by the caller
    /// ([`crate::layout::check_ram_size`]).
    pub fn new(size: u64) -> Result<GuestRam> {
        let map = |reason: String| MemoryError::Map { size, reason };
        let len =
            usize::try_from(size).map_err(|_| map("does not fit the address space".into()))?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| map(e.to_string()))?;
        Ok(GuestRam { mem, size })
    }

    /// Maps the first `size` bytes of `file` privately (copy on write) as RAM: the guest
    /// reads the file's pages, its writes are its own. Clones of one snapshot each map the
    /// shared page cache this way (`crate::clones`).
    pub fn private_file(file: std::fs::File, size: u64) -> Result<GuestRam> {
        let map = |reason: String| MemoryError::Map { size, reason };
        let len =
            usize::try_from(size).map_err(|_| map("does not fit the address space".into()))?;
        let region = vm_memory::MmapRegion::build(
            Some(vm_memory::FileOffset::new(file, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map(e.to_string()))?;
        let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| map("the region does not fit the guest address space".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| map(e.to_string()))?;
        Ok(GuestRam { mem, size })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view, for code that wants the `GuestMemory` trait.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// True when `[gpa, gpa + len)` lies wholly in RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
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
                size: self.size,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked() {
        let ram = GuestRam::new(2 << 20).unwrap();
        ram.write_u32(0x1000, 0xdead_beef).unwrap();
        assert_eq!(ram.read_u32(0x1000).unwrap(), 0xdead_beef);
        assert!(ram.write_u32((2 << 20) - 2, 1).is_err());
        assert!(ram.read_u32(u64::MAX - 1).is_err());
        assert!(ram.contains(0, 2 << 20));
        assert!(!ram.contains(1, 2 << 20));
    }
}
