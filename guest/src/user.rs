//! Task code: runs at CPL 3, natively. Talks to the kernel only through system calls
//! (`ud2; .byte 0x80`: the host turns `int 0x80` at CPL 3 into #UD) and
//! plain stores to its own entry of the (user-accessible) counters page.

use core::arch::asm;
use core::hint::black_box;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::Ordering;

use guest_abi::{
    BOOT_INFO_GPA, BootInfo, CHECKSUM_SEED, COMPUTE_HOLD_GPA, SCAN_AFTER_AREAS_MOVED, SCAN_FILL,
    SCAN_SNAPSHOT, TaskKind, TaskSpec, checksum_mix, expected_fill_checksum, fill_word, task_state,
};

use crate::sched::{NONCOMPUTE_LEFT, sys, task_counters};
use crate::x86::rdtsc;

/// Exit code of a scan whose passes disagreed.
pub const EXIT_SCAN_UNSTABLE: u32 = 2;
/// Exit code of a fill scan whose checksum is not the pattern's.
pub const EXIT_SCAN_BAD_PATTERN: u32 = 3;
/// Exit code of a task of an unknown kind.
pub const EXIT_BAD_KIND: u32 = 99;

const PAGE: u64 = 4096;
const WORDS: usize = 4096 / 8;

fn syscall2(nr: u64, a: u64, b: u64) -> u64 {
    let ret;
    // SAFETY: the kernel preserves every register but RAX; it may read memory named by the
    // arguments (print).
    unsafe {
        asm!(
            "ud2",
            ".byte 0x80",
            inlateout("rax") nr => ret,
            in("rdi") a,
            in("rsi") b,
            options(nostack),
        );
    }
    ret
}

/// `yield()`.
pub fn sys_yield() {
    syscall2(sys::YIELD, 0, 0);
}

/// `exit(code)`.
pub fn sys_exit(code: u32) -> ! {
    syscall2(sys::EXIT, u64::from(code), 0);
    unreachable!("exit returned");
}

/// `print(s)`.
pub fn sys_print(s: &[u8]) {
    syscall2(sys::PRINT, s.as_ptr() as u64, s.len() as u64);
}

/// `snapshot(tag)`: ask the VMM for a snapshot here.
pub fn sys_snapshot(tag: u32) {
    syscall2(sys::SNAPSHOT, u64::from(tag), 0);
}

/// `report(work, checksum)`.
pub fn sys_report(work: u64, checksum: u64) {
    syscall2(sys::REPORT, work, checksum);
}

fn boot_info() -> &'static BootInfo {
    // SAFETY: the VMM wrote BootInfo before start and nothing writes it afterwards; the
    // kernel validated it before starting tasks.
    unsafe { &*(BOOT_INFO_GPA as *const BootInfo) }
}

/// Entry of every task (from its initial frame, at CPL 3): `t` is its index.
pub extern "C" fn task_entry(t: u64) -> ! {
    #[allow(clippy::cast_possible_truncation)]
    let t = t as u32;
    let tc = task_counters(t);
    // SAFETY: the task's own counters entry (user-accessible); written here, natively,
    // rather than by the kernel's context switch.
    unsafe {
        write_volatile(addr_of_mut!((*tc).start_tsc), rdtsc());
        write_volatile(addr_of_mut!((*tc).state), task_state::RUNNING);
    }
    let spec = boot_info().tasks[t as usize];
    let code = match TaskKind::from_raw(spec.kind) {
        Some(TaskKind::Compute) => compute(t, &spec),
        Some(TaskKind::Scan) => scan(t, &spec),
        Some(TaskKind::Hostile) => crate::hostile::task(t, &spec),
        _ => EXIT_BAD_KIND,
    };
    sys_exit(code)
}

fn publish_work(t: u32, work: u64) {
    // SAFETY: the task's own counters entry; a plain store, read by the VMM.
    unsafe { write_volatile(addr_of_mut!((*task_counters(t)).work), work) }
}

fn publish_checksum(t: u32, checksum: u64) {
    // SAFETY: the task's own counters entry; a plain store, read by the VMM.
    unsafe { write_volatile(addr_of_mut!((*task_counters(t)).checksum), checksum) }
}

/// A fixed integer arithmetic loop; `arg0` ms of TSC time, or (0) until every non-compute
/// task is done.
fn compute(t: u32, spec: &TaskSpec) -> u32 {
    let bi = boot_info();
    let deadline = if spec.arg0 == 0 {
        0
    } else {
        rdtsc().wrapping_add(spec.arg0.saturating_mul(bi.tsc_khz))
    };
    // Without a timer nobody else on this vCPU would ever run: yield between chunks.
    let yield_each = bi.quantum_us == 0;
    let chunk: u64 = if yield_each { 1 << 20 } else { 1 << 14 };
    let mut x: u64 = 0x1234_5678_9abc_def0 ^ u64::from(t);
    let mut n: u64 = 0;
    loop {
        for _ in 0..chunk {
            x = x
                .wrapping_mul(0x5851_f42d_4c95_7f2d)
                .wrapping_add(0x1405_7b7e_f767_814f);
            x ^= x >> 29;
        }
        x = black_box(x);
        n += chunk;
        publish_work(t, n);
        let done = if deadline == 0 {
            // SAFETY: COMPUTE_HOLD_GPA is a u64 in the (identity-mapped, user-accessible)
            // boot info page, written only by the VMM.
            NONCOMPUTE_LEFT.load(Ordering::Acquire) == 0
                && unsafe { read_volatile(COMPUTE_HOLD_GPA as *const u64) } == 0
        } else {
            rdtsc() >= deadline
        };
        if done {
            break;
        }
        if yield_each {
            sys_yield();
        }
    }
    sys_report(n, 0);
    0
}

/// Walks `[arg0, arg0 + arg1)` page by page, `arg2` passes, checksumming; with `SCAN_FILL`
/// writes the pattern first (in the first pass). Reports pages scanned and the checksum of
/// the last pass; exits non-zero if passes disagree or a fill scan does not read its pattern
/// back. With `SCAN_SNAPSHOT` it asks for a snapshot after every pass but the last (tag =
/// passes done), so a restored guest re-reads the whole region.
fn scan(t: u32, spec: &TaskSpec) -> u32 {
    let (start, len) = (spec.arg0, spec.arg1);
    let passes = spec.arg2.max(1);
    let fill = spec.flags & SCAN_FILL != 0;
    let snapshot = spec.flags & SCAN_SNAPSHOT != 0;
    let pages = len / PAGE;
    if spec.flags & SCAN_AFTER_AREAS_MOVED != 0 {
        crate::hostile::wait_for_moved_areas(spec.cpu);
    }
    let mut work = 0u64;
    let mut first = CHECKSUM_SEED;
    let mut last = CHECKSUM_SEED;
    let mut code = 0;
    for pass in 0..passes {
        let mut acc = CHECKSUM_SEED;
        for p in 0..pages {
            let base = start + p * PAGE;
            let words = base as *mut u64;
            if fill && pass == 0 {
                for w in 0..WORDS {
                    // SAFETY: workload memory, validated at boot to lie in RAM above
                    // WORKLOAD_GPA; identity-mapped and user-accessible.
                    unsafe { write_volatile(words.add(w), fill_word(base + 8 * w as u64)) };
                }
            }
            for w in 0..WORDS {
                // SAFETY: as above.
                acc = checksum_mix(acc, unsafe { read_volatile(words.add(w)) });
            }
            work += 1;
            publish_work(t, work);
        }
        if pass == 0 {
            first = acc;
        } else if acc != first {
            code = EXIT_SCAN_UNSTABLE;
        }
        last = acc;
        publish_checksum(t, acc);
        if snapshot && pass + 1 < passes {
            #[allow(clippy::cast_possible_truncation)] // tags wrap; only their order matters
            sys_snapshot((pass + 1) as u32);
        }
    }
    if fill && code == 0 && first != expected_fill_checksum(start, pages * PAGE) {
        code = EXIT_SCAN_BAD_PATTERN;
    }
    sys_report(work, last);
    if code != 0 {
        sys_print(b"scan: checksum mismatch\n");
    }
    code
}
