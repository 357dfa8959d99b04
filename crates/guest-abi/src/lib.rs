//! The boot contract between the `apfvm` VMM and the project's guest kernel (`guest/`).
//!
//! Nothing here is part of the APF protocol (that is `apf-abi`); this is how our VMM starts
//! our guest, tells it what to run, hears from it, and reads its results.
//!
//! # Entry
//! Every vCPU enters the kernel's ELF entry point in 64-bit long mode at CPL 0 with
//! `RFLAGS.IF = 0`, `RDI` = [`BOOT_INFO_GPA`], `RSI` = the vCPU index (0-based, equal to its
//! LAPIC id) and `RSP` = [`boot_stack_top`] of that index. The VMM's GDT has a flat 64-bit code
//! segment at selector 0x08 and a flat data segment at 0x10; the guest loads its own GDT (with
//! user segments and a TSS) and IDT. Paging: guest-physical `[0, 4 GiB)` and all RAM above it
//! are identity-mapped with 2 MiB pages, present, writable and user-accessible (CPL 3 tasks
//! run in the same address space); the LAPIC page at 0xfee0_0000 is mapped uncached; above
//! 4 GiB nothing past the end of RAM is mapped. No SSE state is set up: the kernel is built
//! for `x86_64-unknown-none` (soft-float).
//!
//! # RAM
//! Guest RAM is one or two regions, listed in [`BootInfo::ram_regions`]: `[0, min(size,
//! 3 GiB))` and, for more than 3 GiB of RAM, the rest at `[4 GiB, 4 GiB + size - 3 GiB)`
//! (the x86 convention: `[3 GiB, 4 GiB)` is the MMIO hole, where the LAPIC and IOAPIC
//! live). A scan region lies wholly in one RAM region.
//!
//! # Layout (guest-physical)
//! ```text
//! 0x0000_0000  unmapped-by-convention null page
//! 0x0000_1000  BootInfo (one page, written by the VMM, read-only for the guest)
//! 0x0000_2000  Counters (two pages, written by the guest, read by the VMM at exit)
//! 0x0000_8000  VMM's GDT and page tables (the guest must not touch them)
//! 0x0010_0000  boot stacks, BOOT_STACK_SIZE per vCPU
//! 0x0020_0000  kernel image (ELF PT_LOAD segments at their physical addresses), < 0x0100_0000
//! 0x0100_0000  workload memory (scan regions), up to the end of RAM region 0
//! 0xc000_0000  MMIO hole (no RAM) up to 4 GiB; LAPIC at 0xfee0_0000
//! 0x1_0000_0000  RAM region 1 (guests of more than 3 GiB): workload memory
//! ```
#![no_std]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Where the VMM writes [`BootInfo`].
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Where the guest publishes [`Counters`].
pub const COUNTERS_GPA: u64 = 0x2000;
/// Start of the region the VMM uses for its own GDT and page tables.
pub const VMM_RESERVED_GPA: u64 = 0x8000;
/// Boot stacks: vCPU `i` gets `[BOOT_STACKS_GPA + i*SIZE, BOOT_STACKS_GPA + (i+1)*SIZE)`.
pub const BOOT_STACKS_GPA: u64 = 0x10_0000;
/// Size of one boot stack.
pub const BOOT_STACK_SIZE: u64 = 0x1_0000;
/// Lowest address a kernel segment may be loaded at.
pub const KERNEL_MIN_GPA: u64 = 0x20_0000;
/// End (exclusive) of the kernel image region.
pub const KERNEL_END_GPA: u64 = 0x100_0000;
/// First byte of memory given to workloads.
pub const WORKLOAD_GPA: u64 = 0x100_0000;
/// A `u64` the VMM may set (non-zero) before it starts or resumes the guest, in the last
/// 8 bytes of the [`BootInfo`] page: while it is non-zero, compute tasks of duration 0 keep
/// running after every other task finished; the VMM clears it to let them end. `apfvm bench`
/// uses it so every mode computes for at least its measurement window. Zero (the default)
/// changes nothing.
pub const COMPUTE_HOLD_GPA: u64 = BOOT_INFO_GPA + 4096 - 8;
/// The xAPIC's MMIO page.
pub const LAPIC_GPA: u64 = 0xfee0_0000;

/// Most vCPUs the contract has room for.
pub const MAX_CPUS: usize = 8;
/// Most tasks a workload may ask for.
pub const MAX_TASKS: usize = 48;
/// Most RAM regions [`BootInfo`] has room for.
pub const MAX_RAM_REGIONS: usize = 4;

/// Top of the boot stack of vCPU `cpu`.
pub const fn boot_stack_top(cpu: u32) -> u64 {
    BOOT_STACKS_GPA + (cpu as u64 + 1) * BOOT_STACK_SIZE
}

/// I/O ports the guest writes to reach the VMM. Each `out` is a VM exit.
pub mod port {
    /// `out dx, al`: one byte of console output.
    pub const CONSOLE: u16 = 0xe9;
    /// `out dx, eax`: the guest is done; the value is its exit status (0 = success).
    pub const EXIT: u16 = 0xf4;
    /// `out dx, eax`: "snapshot me now" (the value is a guest-chosen tag). The VMM may take a
    /// snapshot before resuming the guest after this instruction.
    pub const SNAPSHOT: u16 = 0xf5;
}

/// Magic value of [`BootInfo::magic`]: "APFBOOT1".
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"APFBOOT1");
/// Magic value of [`Counters::magic`]: "APFCNTR1".
pub const COUNTERS_MAGIC: u64 = u64::from_le_bytes(*b"APFCNTR1");
/// Version of both structures; bumped on any layout change (2: [`BootInfo::ram_regions`]).
pub const ABI_VERSION: u32 = 2;

/// What a task does. Stored as a `u32` in [`TaskSpec::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
#[repr(u32)]
pub enum TaskKind {
    /// Counts iterations of a fixed arithmetic loop; `arg0` = duration in ms of TSC time
    /// (0 = run until every other task has finished).
    Compute = 1,
    /// Walks `[arg0, arg0 + arg1)` page by page, checksumming it; `arg2` = passes (>= 1).
    /// In the first pass of a "fill" scan (`flags & SCAN_FILL`) it writes a pattern first.
    Scan = 2,
    /// Writes every class of invalid and valid APF MSR value and checks the answers.
    MsrSelftest = 3,
    /// A hostile-guest case (`arg0` = index into [`HOSTILE_CASES`]): misuses the APF
    /// interface and checks the host's answer; exit code = failed checks.
    Hostile = 4,
}

/// The hostile-guest cases, by `TaskSpec::arg0` of a [`TaskKind::Hostile`] task
/// (`apfvm run --workload hostile:<name>`; `docs/reliability.md`).
pub const HOSTILE_CASES: [&str; 13] = [
    "area-outside-ram",
    "area-straddles-ram-end",
    "area-mmio",
    "area-unaligned",
    "area-overlap",
    "toggle",
    "reenable",
    "no-ack",
    "ack-idle",
    "int-change",
    "same-page",
    "flood",
    "area-in-lazy-memory",
];

/// `hostile:area-in-lazy-memory`: each vCPU's APF area lies in its own block of this many
/// bytes (the pager's 64 KiB fetch unit, so each arrives on its own) at the top of RAM.
pub const LAZY_AREA_BLOCK: u64 = 64 << 10;
/// Offset of the area in its block (64-byte aligned, not at the page's start).
pub const LAZY_AREA_OFFSET: u64 = 0x80;

/// `hostile:area-in-lazy-memory`: where vCPU `cpu` puts its APF area in a guest whose RAM
/// ends at `ram_end` ([`BootInfo::ram_end`]): in block `cpu` counted down from there, in
/// workload memory (which a lazy restore serves on demand). The VMM keeps the case's scans
/// below [`lazy_area_floor`].
pub const fn lazy_area_gpa(ram_end: u64, cpu: u32) -> u64 {
    ram_end - (cpu as u64 + 1) * LAZY_AREA_BLOCK + LAZY_AREA_OFFSET
}

/// The lowest byte of the blocks [`lazy_area_gpa`] uses below `ram_end`, for any vCPU count.
pub const fn lazy_area_floor(ram_end: u64) -> u64 {
    ram_end.saturating_sub(MAX_CPUS as u64 * LAZY_AREA_BLOCK)
}

impl TaskKind {
    /// Decodes [`TaskSpec::kind`].
    pub const fn from_raw(raw: u32) -> Option<TaskKind> {
        match raw {
            1 => Some(TaskKind::Compute),
            2 => Some(TaskKind::Scan),
            3 => Some(TaskKind::MsrSelftest),
            4 => Some(TaskKind::Hostile),
            _ => None,
        }
    }
}

/// [`TaskSpec::flags`] for a scan: write a deterministic pattern before checksumming.
pub const SCAN_FILL: u32 = 1 << 0;
/// [`TaskSpec::flags`] for a scan: after each pass but the last, ask the VMM for a snapshot
/// (the `snapshot(tag)` system call, which writes `tag` = passes done to [`port::SNAPSHOT`]).
/// The first request comes right after the fill pass; a guest restored from that snapshot
/// then does its remaining checksum passes over memory that may arrive lazily.
pub const SCAN_SNAPSHOT: u32 = 1 << 1;
/// [`TaskSpec::flags`] for a scan: before its first pass, wait (yielding, at most 2 s) until
/// every vCPU has moved its APF area (`hostile:area-in-lazy-memory`, where a timer tick may
/// run the scan before its vCPU's hostile task), so that neither its faults nor its
/// snapshot request come before. Nothing to wait for on a vCPU without APF.
pub const SCAN_AFTER_AREAS_MOVED: u32 = 1 << 2;

/// One task of the workload.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct TaskSpec {
    /// A [`TaskKind`] as `u32`.
    pub kind: u32,
    /// The vCPU whose scheduler runs the task.
    pub cpu: u32,
    /// Kind-specific flags.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Kind-specific arguments (see [`TaskKind`]).
    pub arg0: u64,
    /// Kind-specific arguments.
    pub arg1: u64,
    /// Kind-specific arguments.
    pub arg2: u64,
}

/// Everything the guest needs to know at boot, at [`BOOT_INFO_GPA`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub version: u32,
    /// Number of vCPUs started (each enters the kernel).
    pub cpu_count: u32,
    /// Bytes of guest RAM in all (the sum of the regions' sizes).
    pub ram_size: u64,
    /// TSC frequency in kHz (from KVM), for turning durations into TSC ticks.
    pub tsc_khz: u64,
    /// Scheduler quantum in microseconds (the LAPIC timer period); 0 = no timer preemption.
    pub quantum_us: u32,
    /// Number of valid entries in `tasks`.
    pub task_count: u32,
    /// Workload tasks.
    pub tasks: [TaskSpec; MAX_TASKS],
    /// Number of valid entries in `ram_regions` (1 ..= [`MAX_RAM_REGIONS`]).
    pub ram_region_count: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Guest RAM, in ascending address order (see "RAM" above).
    pub ram_regions: [RamRegion; MAX_RAM_REGIONS],
}

/// One range of guest-physical RAM, `[start, start + size)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RamRegion {
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub size: u64,
}

impl RamRegion {
    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }

    /// True when `[start, start + len)` lies wholly inside this region.
    pub const fn contains(&self, start: u64, len: u64) -> bool {
        match start.checked_add(len) {
            Some(end) => start >= self.start && end <= self.end(),
            None => false,
        }
    }
}

impl BootInfo {
    /// The valid RAM regions (none when `ram_region_count` is out of range).
    pub fn ram(&self) -> &[RamRegion] {
        let n = self.ram_region_count as usize;
        self.ram_regions.get(..n).unwrap_or(&[])
    }

    /// One past the last byte of RAM (0 without regions).
    pub fn ram_end(&self) -> u64 {
        self.ram().iter().map(RamRegion::end).max().unwrap_or(0)
    }

    /// True when `[start, start + len)` lies wholly in one RAM region.
    pub fn in_one_ram_region(&self, start: u64, len: u64) -> bool {
        self.ram().iter().any(|r| r.contains(start, len))
    }
}

/// Life of a task as the guest reports it in [`TaskCounters::state`].
pub mod task_state {
    /// Not started yet.
    pub const NEW: u32 = 0;
    /// Runnable or running.
    pub const RUNNING: u32 = 1;
    /// Finished; `exit_code` is valid.
    pub const DONE: u32 = 2;
}

/// What one task did, written by the guest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct TaskCounters {
    /// Copy of [`TaskSpec::kind`].
    pub kind: u32,
    /// A [`task_state`] value.
    pub state: u32,
    /// Exit code passed to the exit system call (0 = success).
    pub exit_code: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Units of work done: loop iterations (compute) or pages checksummed (scan).
    pub work: u64,
    /// Checksum of the scanned memory (scan), 0 otherwise.
    pub checksum: u64,
    /// Times the task slept on an APF token.
    pub apf_sleeps: u64,
    /// Times the task was scheduled while some other task was asleep on a not-present token:
    /// the point of the protocol.
    pub ran_while_token_outstanding: u64,
    /// TSC when the task finished.
    pub done_tsc: u64,
    /// TSC when the task first ran.
    pub start_tsc: u64,
}

/// What one vCPU's kernel did, written by the guest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[repr(C)]
pub struct CpuCounters {
    /// Protocol the guest enabled: 0 none, 1 v1, 2 v2.
    pub apf_version: u32,
    /// The APF interrupt vector (v2), 0 otherwise.
    pub apf_vector: u32,
    /// Page-not-present APFs received.
    pub not_present: u64,
    /// Page-ready notifications received (excluding wake-all).
    pub page_ready: u64,
    /// Wake-all broadcasts received.
    pub wake_all: u64,
    /// Ready notifications that found no sleeper (wake-before-wait dummies created).
    pub early_ready: u64,
    /// Times the vCPU idled in `sti; hlt`.
    pub idle_halts: u64,
    /// Timer interrupts taken.
    pub timer_ticks: u64,
    /// Context switches.
    pub switches: u64,
    /// Page-ready notifications for a token whose task a wake-all on this token's vCPU had
    /// already woken: the host sent an individual page ready for a token its wake-all covered
    /// ("no individual type 2 APFs will be sent", §2). A host bug; must stay 0. Counted on
    /// the vCPU that received the page ready.
    pub ready_after_wake_all: u64,
}

impl CpuCounters {
    /// The events counted since `base` was read (each counter minus `base`'s, at least 0;
    /// the protocol and vector are this one's).
    #[must_use]
    pub fn since(&self, base: &CpuCounters) -> CpuCounters {
        CpuCounters {
            apf_version: self.apf_version,
            apf_vector: self.apf_vector,
            not_present: self.not_present.saturating_sub(base.not_present),
            page_ready: self.page_ready.saturating_sub(base.page_ready),
            wake_all: self.wake_all.saturating_sub(base.wake_all),
            early_ready: self.early_ready.saturating_sub(base.early_ready),
            idle_halts: self.idle_halts.saturating_sub(base.idle_halts),
            timer_ticks: self.timer_ticks.saturating_sub(base.timer_ticks),
            switches: self.switches.saturating_sub(base.switches),
            ready_after_wake_all: self
                .ready_after_wake_all
                .saturating_sub(base.ready_after_wake_all),
        }
    }
}

/// The page(s) at [`COUNTERS_GPA`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Counters {
    /// [`COUNTERS_MAGIC`] once the guest has initialised the page.
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub version: u32,
    /// Number of valid entries in `tasks`.
    pub task_count: u32,
    /// Per-vCPU counters.
    pub cpus: [CpuCounters; MAX_CPUS],
    /// Per-task counters, in the order of [`BootInfo::tasks`].
    pub tasks: [TaskCounters; MAX_TASKS],
}

/// Exit statuses the guest kernel writes to [`port::EXIT`].
pub mod exit_status {
    /// Every task exited with code 0.
    pub const OK: u32 = 0;
    /// All tasks finished, but at least one exited with a non-zero code.
    pub const TASK_FAILED: u32 = 1;
    /// [`super::BootInfo`] has a bad magic or version, or describes an invalid workload.
    pub const BAD_BOOT_INFO: u32 = 2;
    /// An unexpected CPU exception in the kernel or a task (vector, RIP, error code printed).
    pub const FATAL_EXCEPTION: u32 = 3;
    /// A #PF that was not an asynchronous page fault (reason 0): a genuine page fault.
    pub const PAGE_FAULT: u32 = 4;
    /// The kernel panicked (message printed).
    pub const KERNEL_PANIC: u32 = 5;
}

/// Deterministic scan pattern: the 64-bit word a "fill" scan writes at guest-physical `gpa`
/// (8-byte aligned). A splitmix64 finaliser of the address, so every word differs and a page
/// that arrives at the wrong address, stale or zeroed is detected by the checksum.
pub const fn fill_word(gpa: u64) -> u64 {
    let mut z = gpa.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Initial accumulator of a scan checksum (each pass starts from it).
pub const CHECKSUM_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds one 64-bit word into a scan checksum. Order-dependent; words are folded in
/// ascending address order, page by page, over `[arg0, arg0 + arg1)`.
pub const fn checksum_mix(acc: u64, word: u64) -> u64 {
    (acc.rotate_left(5) ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Checksum of one pass over `words` (ascending addresses), starting from `acc`.
pub fn checksum_words(mut acc: u64, words: &[u64]) -> u64 {
    for &w in words {
        acc = checksum_mix(acc, w);
    }
    acc
}

/// The checksum a scan of `[start, start + len)` reports when that memory holds the
/// [`fill_word`] pattern (what a `SCAN_FILL` scan must find); `start` and `len` are multiples
/// of 8. The VMM can compare a reported checksum with this without reading guest memory.
pub const fn expected_fill_checksum(start: u64, len: u64) -> u64 {
    let mut acc = CHECKSUM_SEED;
    let mut a = start;
    while a < start + len {
        acc = checksum_mix(acc, fill_word(a));
        a += 8;
    }
    acc
}

const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= COMPUTE_HOLD_GPA - BOOT_INFO_GPA);
const _: () = assert!(core::mem::size_of::<Counters>() <= 2 * 4096);
const _: () = assert!(COUNTERS_GPA + 2 * 4096 <= VMM_RESERVED_GPA);
const _: () = assert!(BOOT_STACKS_GPA + MAX_CPUS as u64 * BOOT_STACK_SIZE <= KERNEL_MIN_GPA);

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn task_kind_round_trips() {
        for k in [TaskKind::Compute, TaskKind::Scan, TaskKind::MsrSelftest] {
            assert_eq!(TaskKind::from_raw(k as u32), Some(k));
        }
        assert_eq!(TaskKind::from_raw(0), None);
    }

    /// The new counter is appended: every earlier field keeps its offset in the struct
    /// (apfvm embeds the guest it boots, so both sides always agree on the whole layout).
    #[test]
    fn cpu_counters_ready_after_wake_all_is_appended_at_the_end() {
        assert_eq!(core::mem::offset_of!(CpuCounters, switches), 56);
        assert_eq!(core::mem::offset_of!(CpuCounters, ready_after_wake_all), 64);
        assert_eq!(core::mem::size_of::<CpuCounters>(), 72);
    }

    /// ABI 2 appends the RAM regions after the tasks: earlier fields keep their offsets.
    #[test]
    fn ram_regions_are_appended_and_checked_one_region_at_a_time() {
        assert_eq!(core::mem::offset_of!(BootInfo, tasks), 40);
        assert_eq!(
            core::mem::offset_of!(BootInfo, ram_region_count),
            40 + 40 * MAX_TASKS
        );
        let mut bi = BootInfo::new_zeroed();
        assert_eq!((bi.ram(), bi.ram_end()), (&[][..], 0));
        bi.ram_regions[0] = RamRegion {
            start: 0,
            size: 3 << 30,
        };
        bi.ram_regions[1] = RamRegion {
            start: 4 << 30,
            size: 1 << 30,
        };
        bi.ram_region_count = 2;
        assert_eq!(bi.ram_end(), 5 << 30);
        assert!(bi.in_one_ram_region(WORKLOAD_GPA, 1 << 20));
        assert!(bi.in_one_ram_region(4 << 30, 1 << 30));
        assert!(
            !bi.in_one_ram_region((3 << 30) - 4096, 8192),
            "straddles the hole"
        );
        assert!(!bi.in_one_ram_region(3 << 30, 4096), "in the hole");
        assert!(
            !bi.in_one_ram_region((5 << 30) - 4096, 8192),
            "past the end"
        );
        assert!(!bi.in_one_ram_region(u64::MAX - 4095, 8192));
        bi.ram_region_count = 99;
        assert!(bi.ram().is_empty());
    }

    #[test]
    fn lazy_areas_lie_in_workload_memory_each_in_its_own_block() {
        let ram = 64 << 20;
        assert_eq!(lazy_area_gpa(ram, 0), ram - 0x1_0000 + 0x80);
        for cpu in 0..u32::try_from(MAX_CPUS).unwrap() {
            let a = lazy_area_gpa(ram, cpu);
            assert!(a >= lazy_area_floor(ram) && a + 64 <= ram && a.is_multiple_of(64));
            assert!(a >= WORKLOAD_GPA);
            assert_eq!(
                a / LAZY_AREA_BLOCK,
                (ram / LAZY_AREA_BLOCK) - 1 - u64::from(cpu)
            );
        }
    }

    #[test]
    fn boot_stacks_do_not_overlap_the_kernel() {
        assert_eq!(boot_stack_top(0), 0x11_0000);
        assert!(boot_stack_top(7) <= KERNEL_MIN_GPA);
    }

    #[test]
    fn fill_word_is_deterministic_and_address_dependent() {
        assert_eq!(fill_word(0x100_0000), fill_word(0x100_0000));
        assert_ne!(fill_word(0x100_0000), fill_word(0x100_0008));
        assert_ne!(fill_word(0), 0);
        // Pinned so host and guest builds can never silently disagree.
        assert_eq!(fill_word(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn checksum_is_order_dependent_and_matches_expected_fill() {
        let a = checksum_mix(checksum_mix(CHECKSUM_SEED, 1), 2);
        let b = checksum_mix(checksum_mix(CHECKSUM_SEED, 2), 1);
        assert_ne!(a, b);
        let start = 0x100_0000u64;
        let words: [u64; 1024] = core::array::from_fn(|i| fill_word(start + 8 * i as u64));
        assert_eq!(
            checksum_words(CHECKSUM_SEED, &words),
            expected_fill_checksum(start, 8 * 1024)
        );
        assert_ne!(
            checksum_words(CHECKSUM_SEED, &[0; 1024]),
            expected_fill_checksum(start, 8 * 1024)
        );
        assert_eq!(expected_fill_checksum(start, 0), CHECKSUM_SEED);
    }
}
