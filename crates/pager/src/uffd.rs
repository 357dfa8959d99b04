//! The one audited module that talks to userfaultfd(2) and maps memory.
//!
//! Built on rustix (syscalls, ioctl) and linux-raw-sys (the kernel's uffd structs and
//! constants): no bindgen, no libclang. Every `unsafe` block carries its `SAFETY:` argument.
//!
//! The fd is created **without** `UFFD_USER_MODE_ONLY`, so faults that KVM takes on behalf of
//! a vCPU (kernel-mode GUP of guest memory) are reported too, with `UFFD_FEATURE_THREAD_ID` so
//! each message names the faulting thread. Messages are parsed from their 32 bytes by hand:
//! reading the kernel's union needs no `unsafe`.

use std::ffi::c_void;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use linux_raw_sys::general as uapi;
use rustix::io::Errno;
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode, Updater, opcode};
use rustix::mm::{UserfaultfdFlags, userfaultfd};

/// The page size userfaultfd resolves at (base pages; no hugetlbfs).
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a `u64`, for guest-physical arithmetic.
pub const PAGE_SIZE_U64: u64 = 4096;

/// Size of one `struct uffd_msg`.
const MSG_SIZE: usize = 32;

const UFFDIO: u8 = 0xAA;
// Opcodes computed from the struct sizes, like the kernel's _IOWR/_IOR macros; a unit test
// checks them against linux-raw-sys's precomputed values.
const OP_API: Opcode = opcode::read_write::<uapi::uffdio_api>(UFFDIO, 0x3F);
const OP_REGISTER: Opcode = opcode::read_write::<uapi::uffdio_register>(UFFDIO, 0x00);
const OP_UNREGISTER: Opcode = opcode::read::<uapi::uffdio_range>(UFFDIO, 0x01);
const OP_WAKE: Opcode = opcode::read::<uapi::uffdio_range>(UFFDIO, 0x02);
const OP_COPY: Opcode = opcode::read_write::<uapi::uffdio_copy>(UFFDIO, 0x03);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1+): `_IO(0xAA, 0x00)`.
const OP_DEV_NEW: Opcode = opcode::none(UFFDIO, 0x00);

const FEATURES_WANTED: u64 = uapi::UFFD_FEATURE_THREAD_ID as u64;
const IOCTLS_NEEDED: u64 = (1 << uapi::_UFFDIO_COPY) | (1 << uapi::_UFFDIO_WAKE);

/// Errors of the userfaultfd layer.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// userfaultfd(2) refused with EPERM, and /dev/userfaultfd was not usable either.
    #[error(
        "userfaultfd is not permitted for this process (userfaultfd(2): {syscall}; \
         /dev/userfaultfd: {device}). Kernel-mode faults (KVM) need CAP_SYS_PTRACE or \
         sysctl vm.unprivileged_userfaultfd=1, or read-write access to /dev/userfaultfd"
    )]
    NotPermitted {
        /// The syscall's error.
        syscall: Errno,
        /// Why the device fallback failed.
        device: String,
    },
    /// The kernel has no userfaultfd (ENOSYS, or blocked by seccomp).
    #[error("userfaultfd is not available on this kernel: {0}")]
    Unavailable(Errno),
    /// The UFFDIO_API handshake failed.
    #[error("UFFDIO_API handshake failed: {0}")]
    Api(Errno),
    /// The kernel lacks a feature the pager needs.
    #[error(
        "the kernel's userfaultfd lacks features {missing:#x} (UFFD_FEATURE_THREAD_ID is needed)"
    )]
    MissingFeatures {
        /// Feature bits asked for but not granted.
        missing: u64,
    },
    /// An address or length is not page aligned, or the range is empty.
    #[error("host range {start:#x}+{len:#x} is empty or not page aligned")]
    Unaligned {
        /// Start of the range.
        start: usize,
        /// Length of the range.
        len: usize,
    },
    /// UFFDIO_REGISTER failed.
    #[error(
        "registering host range {start:#x}+{len:#x} with userfaultfd (MISSING mode) failed: {errno}"
    )]
    Register {
        /// Start of the range.
        start: usize,
        /// Length of the range.
        len: usize,
        /// The kernel's error.
        errno: Errno,
    },
    /// The registered range does not offer UFFDIO_COPY and UFFDIO_WAKE.
    #[error(
        "host range {start:#x}+{len:#x} does not support UFFDIO_COPY/UFFDIO_WAKE (ioctls \
         {ioctls:#x}): guest RAM must be private anonymous or shmem memory"
    )]
    RangeIoctls {
        /// Start of the range.
        start: usize,
        /// Length of the range.
        len: usize,
        /// The ioctl bits the kernel offered.
        ioctls: u64,
    },
    /// UFFDIO_UNREGISTER failed.
    #[error("unregistering host range {start:#x}+{len:#x} failed: {errno}")]
    Unregister {
        /// Start of the range.
        start: usize,
        /// Length of the range.
        len: usize,
        /// The kernel's error.
        errno: Errno,
    },
    /// Reading messages failed.
    #[error("reading userfaultfd messages failed: {0}")]
    Read(Errno),
    /// UFFDIO_COPY failed (other than EEXIST, which is not an error).
    #[error("UFFDIO_COPY to host {dst:#x}+{len:#x} failed: {errno}")]
    Copy {
        /// Destination.
        dst: usize,
        /// Length.
        len: usize,
        /// The kernel's error.
        errno: Errno,
    },
    /// UFFDIO_WAKE failed.
    #[error("UFFDIO_WAKE of host {start:#x}+{len:#x} failed: {errno}")]
    Wake {
        /// Start of the range.
        start: usize,
        /// Length.
        len: usize,
        /// The kernel's error.
        errno: Errno,
    },
    /// mmap/munmap/eventfd/poll failed.
    #[error("{what} failed: {errno}")]
    Os {
        /// The call.
        what: &'static str,
        /// Its error.
        errno: Errno,
    },
}

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread touched a missing page of a registered range.
    PageFault {
        /// Faulting host address (page aligned: `UFFD_FEATURE_EXACT_ADDRESS` is not asked for).
        address: u64,
        /// `UFFD_PAGEFAULT_FLAG_*`.
        flags: u64,
        /// Thread id of the faulting thread (`UFFD_FEATURE_THREAD_ID`).
        thread_id: u32,
    },
    /// Any other event (fork, remap, remove, unmap: not asked for, so not expected).
    Other {
        /// The `UFFD_EVENT_*` code.
        event: u8,
    },
}

impl UffdEvent {
    /// Parses one `struct uffd_msg` (32 bytes, the kernel's layout on every arch).
    fn parse(msg: &[u8; MSG_SIZE]) -> Self {
        let u64_at = |off: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[off..off + 8]);
            u64::from_ne_bytes(b)
        };
        if u32::from(msg[0]) == uapi::UFFD_EVENT_PAGEFAULT {
            let mut t = [0u8; 4];
            t.copy_from_slice(&msg[24..28]);
            UffdEvent::PageFault {
                flags: u64_at(8),
                address: u64_at(16),
                thread_id: u32::from_ne_bytes(t),
            }
        } else {
            UffdEvent::Other { event: msg[0] }
        }
    }

    /// True for a page fault caused by a write.
    pub fn is_write(flags: u64) -> bool {
        flags & u64::from(uapi::UFFD_PAGEFAULT_FLAG_WRITE) != 0
    }
}

/// What one UFFDIO_COPY call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The whole range was copied (and waiters woken).
    Copied,
    /// Only the first `n` bytes were copied: the page after them is already present
    /// (the caller skips it and goes on).
    Partial(usize),
    /// The first page of the range is already present (EEXIST): someone resolved it.
    Exists,
}

/// An owned userfaultfd: non-blocking, close-on-exec, `UFFD_FEATURE_THREAD_ID`, not
/// user-mode-only.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl Uffd {
    /// Creates the fd and performs the API handshake.
    ///
    /// Tries userfaultfd(2) first; on EPERM/ENOSYS falls back to `/dev/userfaultfd`
    /// (Linux 6.1+, access controlled by the device node's permissions).
    pub fn new() -> Result<Self, UffdError> {
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: userfaultfd(2) only creates a new fd. The memory effects of that fd (the
        // kernel filling pages we register) are confined to `register`, whose contract the
        // caller upholds.
        let fd = match unsafe { userfaultfd(flags) } {
            Ok(fd) => fd,
            Err(e) if e == Errno::PERM || e == Errno::NOSYS => match open_dev_userfaultfd(flags) {
                Ok(fd) => fd,
                Err(dev) if e == Errno::PERM => {
                    return Err(UffdError::NotPermitted {
                        syscall: e,
                        device: dev,
                    });
                }
                Err(_) => return Err(UffdError::Unavailable(e)),
            },
            Err(e) => return Err(UffdError::Unavailable(e)),
        };
        let mut api = uapi::uffdio_api {
            api: u64::from(uapi::UFFD_API),
            features: FEATURES_WANTED,
            ioctls: 0,
        };
        // SAFETY: OP_API is UFFDIO_API, whose argument is a `struct uffdio_api` that the
        // kernel reads and writes; `api` is one, exclusively borrowed for the call.
        unsafe { ioctl::ioctl(&fd, Updater::<OP_API, uapi::uffdio_api>::new(&mut api)) }.map_err(
            |e| {
                if e == Errno::INVAL {
                    UffdError::MissingFeatures {
                        missing: FEATURES_WANTED,
                    }
                } else {
                    UffdError::Api(e)
                }
            },
        )?;
        let missing = FEATURES_WANTED & !api.features;
        if missing != 0 {
            return Err(UffdError::MissingFeatures { missing });
        }
        Ok(Self {
            fd,
            features: api.features,
        })
    }

    /// Feature bits the kernel granted in the handshake.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start + len)` in MISSING mode: from now on, a thread touching a
    /// page there that is not present blocks and a [`UffdEvent::PageFault`] is queued.
    ///
    /// # Safety
    /// The range must be a private anonymous (or shmem) mapping of this process that stays
    /// mapped as long as this fd is open, and nothing in the program may rely on the
    /// contents of its not-yet-present pages: [`Uffd::copy`] fills them with arbitrary bytes
    /// (treat the range as plain guest memory, never as typed Rust values).
    pub unsafe fn register(&self, start: usize, len: usize) -> Result<(), UffdError> {
        check_aligned(start, len)?;
        let mut reg = uapi::uffdio_register {
            range: uapi::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: u64::from(uapi::UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: OP_REGISTER is UFFDIO_REGISTER, taking a `struct uffdio_register` read and
        // written by the kernel; `reg` is one, exclusively borrowed. The kernel validates the
        // range; the caller's contract covers what registration allows later.
        unsafe {
            ioctl::ioctl(
                &self.fd,
                Updater::<OP_REGISTER, uapi::uffdio_register>::new(&mut reg),
            )
        }
        .map_err(|errno| UffdError::Register { start, len, errno })?;
        if reg.ioctls & IOCTLS_NEEDED != IOCTLS_NEEDED {
            // Leave nothing half set up.
            let _ = self.unregister(start, len);
            return Err(UffdError::RangeIoctls {
                start,
                len,
                ioctls: reg.ioctls,
            });
        }
        Ok(())
    }

    /// Unregisters `[start, start + len)`; threads blocked on a page there are woken and
    /// then see ordinary memory (a missing anonymous page reads as zeros).
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), UffdError> {
        check_aligned(start, len)?;
        let mut range = uapi::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: OP_UNREGISTER is UFFDIO_UNREGISTER, taking a `struct uffdio_range` that the
        // kernel only reads; `range` is one. Unregistering removes no memory.
        unsafe {
            ioctl::ioctl(
                &self.fd,
                Updater::<OP_UNREGISTER, uapi::uffdio_range>::new(&mut range),
            )
        }
        .map_err(|errno| UffdError::Unregister { start, len, errno })
    }

    /// Reads as many queued events as fit in `out` without blocking; returns how many were
    /// read (0 when none is queued).
    pub fn read_events(&self, out: &mut Vec<UffdEvent>, max: usize) -> Result<usize, UffdError> {
        let mut buf = [0u8; MSG_SIZE * 64];
        let want = max.clamp(1, 64) * MSG_SIZE;
        let n = match rustix::io::read(&self.fd, &mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e == Errno::AGAIN || e == Errno::INTR => return Ok(0),
            Err(e) => return Err(UffdError::Read(e)),
        };
        let mut count = 0;
        for chunk in buf[..n].chunks_exact(MSG_SIZE) {
            let mut msg = [0u8; MSG_SIZE];
            msg.copy_from_slice(chunk);
            out.push(UffdEvent::parse(&msg));
            count += 1;
        }
        Ok(count)
    }

    /// UFFDIO_COPY: atomically fills the missing pages at `dst` with `src` and wakes the
    /// threads waiting on them. `dst` and `src.len()` must be page aligned.
    ///
    /// EEXIST (the first page is already present: a duplicate resolution) is
    /// [`CopyOutcome::Exists`], not an error; a copy cut short by a present page later in
    /// the range is [`CopyOutcome::Partial`]. A transient EAGAIN (the address space is being
    /// changed) is retried.
    pub fn copy(&self, dst: usize, src: &[u8]) -> Result<CopyOutcome, UffdError> {
        check_aligned(dst, src.len())?;
        loop {
            let mut c = uapi::uffdio_copy {
                dst: dst as u64,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: OP_COPY is UFFDIO_COPY, taking a `struct uffdio_copy` read and written by
            // the kernel; `c` is one. The kernel reads `len` bytes at `src`, which `src`
            // borrows. It writes only to missing pages of ranges registered on this fd, whose
            // contents `register`'s contract gives up to us.
            let r = unsafe {
                ioctl::ioctl(&self.fd, Updater::<OP_COPY, uapi::uffdio_copy>::new(&mut c))
            };
            match r {
                Ok(()) => return Ok(CopyOutcome::Copied),
                Err(e) if e == Errno::EXIST => return Ok(CopyOutcome::Exists),
                Err(e) if e == Errno::AGAIN => {
                    if c.copy > 0 {
                        // Copied `c.copy` bytes, then met a present page.
                        let n = usize::try_from(c.copy).unwrap_or(0);
                        return Ok(CopyOutcome::Partial(n));
                    }
                    std::thread::yield_now();
                }
                Err(errno) => {
                    return Err(UffdError::Copy {
                        dst,
                        len: src.len(),
                        errno,
                    });
                }
            }
        }
    }

    /// UFFDIO_WAKE: wakes threads waiting on `[start, start + len)` without copying (for a
    /// page that someone else already made present).
    pub fn wake(&self, start: usize, len: usize) -> Result<(), UffdError> {
        check_aligned(start, len)?;
        let mut range = uapi::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: OP_WAKE is UFFDIO_WAKE, taking a `struct uffdio_range` that the kernel only
        // reads; `range` is one. Waking changes no memory.
        unsafe {
            ioctl::ioctl(
                &self.fd,
                Updater::<OP_WAKE, uapi::uffdio_range>::new(&mut range),
            )
        }
        .map_err(|errno| UffdError::Wake { start, len, errno })
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The calling thread's id (gettid), as userfaultfd reports it in
/// [`UffdEvent::PageFault::thread_id`]: a vCPU thread records it to be found by faults.
pub fn current_thread_id() -> u32 {
    rustix::thread::gettid()
        .as_raw_nonzero()
        .get()
        .cast_unsigned()
}

fn check_aligned(start: usize, len: usize) -> Result<(), UffdError> {
    if len == 0 || !start.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        Err(UffdError::Unaligned { start, len })
    } else {
        Ok(())
    }
}

/// `ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW, flags)`: its return value is the new fd.
struct DevNew {
    flags: usize,
}

// SAFETY: USERFAULTFD_IOC_NEW takes its flags by value in the pointer-sized argument and
// writes nothing through it (IS_MUTATING = false); its return value is a new fd or -errno,
// which rustix turns into `Err` before calling `output_from_ptr`.
unsafe impl Ioctl for DevNew {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        OP_DEV_NEW
    }

    fn as_ptr(&mut self) -> *mut c_void {
        // The argument is an integer passed in the pointer slot.
        std::ptr::without_provenance_mut(self.flags)
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _ptr: *mut c_void) -> rustix::io::Result<OwnedFd> {
        // SAFETY: on success USERFAULTFD_IOC_NEW returns a new fd that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(out) })
    }
}

fn open_dev_userfaultfd(flags: UserfaultfdFlags) -> Result<OwnedFd, String> {
    // std opens with O_CLOEXEC.
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| e.to_string())?;
    let flags = usize::try_from(flags.bits()).unwrap_or(0);
    // SAFETY: DevNew describes USERFAULTFD_IOC_NEW exactly (see its `Ioctl` impl); the fd is
    // the userfaultfd device just opened.
    unsafe { ioctl::ioctl(&dev, DevNew { flags }) }.map_err(|e| e.to_string())
}

/// An owned private anonymous mapping (munmapped on drop): guest RAM for tests and benches,
/// and a simple backing for a VMM that wants one.
#[derive(Debug)]
pub struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain process memory owned by this value; it is only accessed
// through raw pointers with volatile reads or by the kernel, so sharing between threads is
// like sharing a `[AtomicU8]`.
unsafe impl Send for AnonMapping {}
// SAFETY: as above: `&AnonMapping` only allows volatile reads.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (page aligned) of private anonymous memory, not populated.
    pub fn new(len: usize) -> Result<Self, UffdError> {
        check_aligned(0, len)?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(|errno| UffdError::Os {
            what: "mmap",
            errno,
        })?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(UffdError::Os {
            what: "mmap",
            errno: Errno::NOMEM,
        })?;
        Ok(Self { ptr, len })
    }

    /// Start address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Host address of the mapping.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a mapping is never empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Volatile read of the `u64` at `offset` (8-byte aligned, in bounds). Touching a missing
    /// page of a registered range blocks until it is resolved.
    pub fn read_u64(&self, offset: usize) -> u64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.len,
            "read_u64 out of bounds"
        );
        #[allow(clippy::cast_ptr_alignment)] // alignment checked just above
        let p = self.ptr.as_ptr().wrapping_add(offset).cast::<u64>();
        // SAFETY: in bounds, and aligned: the mapping is page aligned and `offset` a multiple
        // of 8 (both checked); the mapping lives as long as `self`; a volatile read of plain
        // memory is valid for any bit pattern.
        unsafe { p.read_volatile() }
    }

    /// Volatile write of a `u64` at `offset` (8-byte aligned, in bounds).
    pub fn write_u64(&self, offset: usize, value: u64) {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.len,
            "write_u64 out of bounds"
        );
        #[allow(clippy::cast_ptr_alignment)] // alignment checked just above
        let p = self.ptr.as_ptr().wrapping_add(offset).cast::<u64>();
        // SAFETY: in bounds and aligned (page-aligned mapping, `offset` a multiple of 8:
        // checked); the memory is never borrowed as Rust data, only accessed with volatile
        // operations, so a racing access cannot break Rust invariants.
        unsafe { p.write_volatile(value) }
    }

    /// Copies `src` into the mapping at `offset` (an eager fill; a missing page of a
    /// registered range is faulted in first, like any access).
    pub fn write_bytes(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len, "write_bytes out of bounds");
        // SAFETY: in bounds (checked); `src` is a Rust slice and cannot overlap the mapping,
        // which is never borrowed as Rust data (see `write_u64`).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len());
        }
    }

    /// Copies `out.len()` bytes at `offset` out of the mapping (volatile reads).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "read_bytes out of bounds");
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above); see `read_u64`.
            *b = unsafe { self.ptr.as_ptr().add(offset + i).read_volatile() };
        }
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with this length and is owned by `self`;
        // no reference into it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::ioctl as k;

    #[test]
    fn opcodes_match_the_kernel_headers() {
        assert_eq!(u64::from(OP_API), u64::from(k::UFFDIO_API));
        assert_eq!(u64::from(OP_REGISTER), u64::from(k::UFFDIO_REGISTER));
        assert_eq!(u64::from(OP_UNREGISTER), u64::from(k::UFFDIO_UNREGISTER));
        assert_eq!(u64::from(OP_WAKE), u64::from(k::UFFDIO_WAKE));
        assert_eq!(u64::from(OP_COPY), u64::from(k::UFFDIO_COPY));
        assert_eq!(u64::from(OP_DEV_NEW), 0xAA00);
        assert_eq!(std::mem::size_of::<uapi::uffd_msg>(), MSG_SIZE);
    }

    #[test]
    fn parses_a_pagefault_message() {
        let mut m = [0u8; MSG_SIZE];
        m[0] = 0x12;
        m[8..16].copy_from_slice(&1u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x7f00_0000_1000u64.to_ne_bytes());
        m[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        let e = UffdEvent::parse(&m);
        assert_eq!(
            e,
            UffdEvent::PageFault {
                address: 0x7f00_0000_1000,
                flags: 1,
                thread_id: 4242
            }
        );
        assert!(UffdEvent::is_write(1));
        m[0] = 0x13;
        assert_eq!(UffdEvent::parse(&m), UffdEvent::Other { event: 0x13 });
    }
}
