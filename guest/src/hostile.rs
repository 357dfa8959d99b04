//! Hostile-guest cases (`TaskKind::Hostile`, `arg0` = index into `guest_abi::HOSTILE_CASES`):
//! a CPL 3 task that misuses the APF interface through one extra system call,
//! [`SYS_HOSTILE`], whose kernel side does the CPL 0 parts (MSR writes answered with a
//! recoverable #GP, as in the MSR self-test; tricks with the vCPU's area), and checks the
//! host's answers. Each check is printed (`hostile: <case>: <check> ok|FAIL`); the task's
//! exit code is the number of failed checks. Every case ends with APF enabled again as at
//! boot (own area, `_INT` = 0xf3), so the guest's other tasks finish normally; except
//! `area-in-lazy-memory`, which ends with APF enabled on the area it moved to (one hostile
//! task per vCPU, each moving its own vCPU's area).
//!
//! The cases `same-page` and `flood` are workload shapes (many scan tasks), built by the
//! VMM; a hostile task given one of them only prints that.
//! What each case expects from the host, and why, is `docs/reliability.md`.

use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::Ordering;

use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use guest_abi::{BOOT_INFO_GPA, BootInfo, HOSTILE_CASES, LAPIC_GPA, TaskSpec};

use crate::sched::{Cpu, NONCOMPUTE_LEFT, cpu_counters, cpu_ptr};
use crate::trap::{VEC_APF, VEC_RESCHED};
use crate::user::{sys_print, sys_yield};
use crate::x86::{rdtsc, wrmsr};

/// `hostile(op, arg)`: the kernel side of a hostile case (RAX = this, RDI = op, RSI = arg).
pub const SYS_HOSTILE: u64 = 5;

mod lazy_area;

pub use lazy_area::wait_for_moved_areas;

/// The operations of [`SYS_HOSTILE`].
mod op {
    /// `_EN` = arg. Returns 1 if it took #GP.
    pub const WRMSR_EN: u64 = 0;
    /// `_EN` = own area + arg (offset and flag bits). Returns 1 on #GP.
    pub const EN_OWN: u64 = 1;
    /// `_EN` = the next vCPU's area | arg, then own area | arg, with no window in between
    /// (IF = 0). Returns bit 0: the first took #GP, bit 1: the second did, bit 2: the host
    /// wrote into the other vCPU's token slot meanwhile (a v2 wake-all raised at the `wrmsr`
    /// exit: v2 delivery does not wait for IF = 1); the slot is then put back.
    pub const EN_OVERLAP: u64 = 2;
    /// `_EN` = arg, then `_EN` = own area | (arg & 0x3f), with no CPL 3 in between (a
    /// wake-all the first queues is dropped by the second, unless the VMM raises it at the
    /// `wrmsr` exit: v2 delivery does not wait for IF = 1). Returns bit 0: the first took
    /// #GP, bit 1: the second did.
    pub const EN_BRIEFLY: u64 = 15;
    /// `_INT` = arg. Returns 1 on #GP.
    pub const INT: u64 = 3;
    /// `_ACK` = arg. Returns 1 on #GP.
    pub const ACK: u64 = 4;
    /// Moves this vCPU's area to arg (in RAM, 64-byte aligned): zeroes the 64 bytes there,
    /// `_EN` = arg | the boot-time flags and, if that took no #GP, the #PF and page-ready
    /// handlers read the new area from then on. Counted, for the scans that wait for every
    /// vCPU's move. Returns 1 on #GP.
    pub const MOVE_AREA: u64 = 16;
    /// Reads the area's word arg (0 reason/flags, 1 token).
    pub const AREA_READ: u64 = 5;
    /// Writes `arg as u32` to area word `arg >> 32`.
    pub const AREA_WRITE: u64 = 6;
    /// `arg >> 8` times: disable (`_EN` = own area), enable (`_EN` = own area | arg & 0xff).
    /// Returns the number of #GPs.
    pub const TOGGLE: u64 = 7;
    /// The boot-time enable again (`_INT` = 0xf3 then `_EN` = own area | flags).
    pub const RESTORE: u64 = 8;
    /// The protocol enabled at boot: 0, 1 or 2.
    pub const MODE: u64 = 9;
    /// Reads `_EN` (u64::MAX on #GP).
    pub const RDMSR_EN: u64 = 10;
    /// This vCPU's index.
    pub const CPU: u64 = 11;
    /// This vCPU's area address.
    pub const AREA: u64 = 12;
    /// Both area words = `arg as u32`.
    pub const AREA_FILL: u64 = 13;
    /// With the token slot busy (a sentinel): re-enable (`_EN` = own area | 9, which queues
    /// a wake-all, held), then `_INT` = 14, `_INT` = 0x100 | arg, `_INT` = arg; then free the
    /// slot and ACK. Returns the #GPs as bits 0..4.
    pub const INT_CHANGE: u64 = 14;
}

/// `wrmsr` with the self-test's recoverable #GP: returns whether it took #GP.
fn try_wrmsr(c: *mut Cpu, msr: u32, val: u64) -> bool {
    // SAFETY: this vCPU's state, through raw pointers only: the #GP handler (a nested trap
    // on this stack) updates the same fields while `wrmsr` runs.
    unsafe {
        write_volatile(addr_of_mut!((*c).gp_hit), false);
        write_volatile(addr_of_mut!((*c).expect_gp), true);
    }
    wrmsr(msr, val);
    // SAFETY: as above.
    unsafe {
        let hit = read_volatile(addr_of!((*c).gp_hit));
        write_volatile(addr_of_mut!((*c).expect_gp), false);
        hit
    }
}

/// `rdmsr`, u64::MAX on #GP (the handler skips the 2-byte instruction, as for `wrmsr`).
fn try_rdmsr(c: *mut Cpu, msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: as in `try_wrmsr`.
    unsafe {
        write_volatile(addr_of_mut!((*c).gp_hit), false);
        write_volatile(addr_of_mut!((*c).expect_gp), true);
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, preserves_flags));
        let hit = read_volatile(addr_of!((*c).gp_hit));
        write_volatile(addr_of_mut!((*c).expect_gp), false);
        if hit {
            return u64::MAX;
        }
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// A word of the area vCPU `c`'s `_EN` names now.
fn area_word(c: *mut Cpu, word: u64) -> *mut u32 {
    // SAFETY: only field addresses are taken; `area_at` points at an area in RAM.
    unsafe {
        let area = (*c).area_at;
        if word == 0 {
            addr_of_mut!((*area).reason)
        } else {
            addr_of_mut!((*area).token)
        }
    }
}

/// The kernel side of [`SYS_HOSTILE`] (CPL 0, IF = 0): kept short, every instruction here
/// is emulated.
pub fn syscall(c: &mut Cpu, o: u64, arg: u64) -> u64 {
    let c: *mut Cpu = c;
    // SAFETY: only the area's address is taken.
    let area = unsafe { addr_of!((*c).area) } as u64;
    match o {
        op::WRMSR_EN => u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, arg)),
        op::EN_OWN => u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, area + arg)),
        op::EN_OVERLAP => {
            // SAFETY: BootInfo was validated at boot; this vCPU's id is its own.
            let (n, id) = unsafe { ((*(BOOT_INFO_GPA as *const BootInfo)).cpu_count, (*c).id) };
            // SAFETY: only the other vCPU's area address is taken.
            let other_cpu = cpu_ptr((id + 1) % n.max(1));
            // SAFETY: as above.
            let other = unsafe { addr_of!((*other_cpu).area) } as u64;
            let other_slot = area_word(other_cpu, 1);
            // SAFETY: the other vCPU's token slot: read here, and put back below only if
            // the host wrote this vCPU's wake-all there (nothing else is pending for it).
            let before = unsafe { read_volatile(other_slot) };
            let first = try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, other | arg);
            let second = try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, area | arg);
            // SAFETY: as above.
            let written = unsafe { read_volatile(other_slot) } != before;
            if written {
                // SAFETY: as above.
                unsafe { write_volatile(other_slot, before) };
            }
            u64::from(first) | u64::from(second) << 1 | u64::from(written) << 2
        }
        op::EN_BRIEFLY => {
            let first = try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, arg);
            let second = try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, area | (arg & 0x3f));
            u64::from(first) | u64::from(second) << 1
        }
        op::INT => u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_INT, arg)),
        op::ACK => u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_ACK, arg)),
        // SAFETY: this vCPU's area.
        op::AREA_READ => u64::from(unsafe { read_volatile(area_word(c, arg)) }),
        op::AREA_WRITE => {
            #[allow(clippy::cast_possible_truncation)] // the low 32 bits are the value
            // SAFETY: this vCPU's area.
            unsafe {
                write_volatile(area_word(c, arg >> 32), arg as u32);
            };
            0
        }
        op::TOGGLE => {
            let mut gps = 0;
            for _ in 0..arg >> 8 {
                gps += u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, area));
                gps += u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, area | (arg & 0xff)));
            }
            gps
        }
        op::RESTORE => {
            // SAFETY: this vCPU's state; the #GP handler is not involved here.
            crate::apf::enable(unsafe { &mut *c });
            0
        }
        // SAFETY: this vCPU's state.
        op::MODE => u64::from(unsafe { (*c).version }),
        op::RDMSR_EN => try_rdmsr(c, MSR_KVM_ASYNC_PF_EN),
        // SAFETY: as above.
        op::CPU => u64::from(unsafe { (*c).id }),
        // SAFETY: this vCPU's state.
        op::AREA => (unsafe { (*c).area_at }) as u64,
        op::AREA_FILL => {
            #[allow(clippy::cast_possible_truncation)] // the low 32 bits are the value
            // SAFETY: this vCPU's area.
            unsafe {
                write_volatile(area_word(c, 0), arg as u32);
                write_volatile(area_word(c, 1), arg as u32);
            };
            0
        }
        op::MOVE_AREA => lazy_area::move_area(c, arg),
        op::INT_CHANGE => {
            // The token slot busy first, so the wake-all the re-enable queues stays pending
            // (a free slot would let the VMM raise it at the `wrmsr` exit, on the old
            // vector) until the slot is freed and ACKed, after the vector changed.
            // SAFETY: this vCPU's area.
            unsafe { write_volatile(area_word(c, 1), SENTINEL) };
            let int = MSR_KVM_ASYNC_PF_INT;
            let r = u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, area | 9))
                | u64::from(try_wrmsr(c, int, 14)) << 1
                | u64::from(try_wrmsr(c, int, 0x100 | arg)) << 2
                | u64::from(try_wrmsr(c, int, arg)) << 3;
            // SAFETY: as above.
            unsafe { write_volatile(area_word(c, 1), 0) };
            r | u64::from(try_wrmsr(c, MSR_KVM_ASYNC_PF_ACK, 1)) << 4
        }
        _ => u64::MAX,
    }
}

// ---- CPL 3 ----

fn hostile(o: u64, arg: u64) -> u64 {
    let ret;
    // SAFETY: the system call preserves every register but RAX.
    unsafe {
        asm!(
            "ud2",
            ".byte 0x80",
            inlateout("rax") SYS_HOSTILE => ret,
            in("rdi") o,
            in("rsi") arg,
            options(nostack),
        );
    }
    ret
}

fn boot_info() -> &'static BootInfo {
    // SAFETY: written by the VMM before start, validated at boot, never written after.
    unsafe { &*(BOOT_INFO_GPA as *const BootInfo) }
}

/// Spins at CPL 3 for `ms` milliseconds of TSC time (timer preemption lets the vCPU's other
/// tasks run meanwhile; the VMM's delivery windows land here, with IF = 1).
fn spin_ms(ms: u64) {
    let end = rdtsc().wrapping_add(ms.saturating_mul(boot_info().tsc_khz));
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// Other non-compute tasks (scans) are still running (this task counts itself).
fn others_running() -> bool {
    NONCOMPUTE_LEFT.load(Ordering::Acquire) > 1
}

/// One of this vCPU's kernel counters (the counters page is user-accessible).
fn wake_alls(cpu: u32) -> u64 {
    // SAFETY: the counters page; a plain read of a word the kernel updates.
    unsafe { read_volatile(addr_of!((*cpu_counters(cpu)).wake_all)) }
}

fn page_readies(cpu: u32) -> u64 {
    // SAFETY: as above.
    unsafe { read_volatile(addr_of!((*cpu_counters(cpu)).page_ready)) }
}

struct Case {
    name: &'static str,
    failed: u32,
}

impl Case {
    fn check(&mut self, what: &str, ok: bool) {
        sys_print(b"hostile: ");
        sys_print(self.name.as_bytes());
        sys_print(b": ");
        sys_print(what.as_bytes());
        sys_print(if ok { b" ok\n" } else { b" FAIL\n" });
        if !ok {
            self.failed += 1;
        }
    }

    fn gp(&mut self, what: &str, o: u64, arg: u64, want_gp: bool) {
        let gp = hostile(o, arg) != 0;
        self.check(what, gp == want_gp);
    }
}

/// Polls (at CPL 3) until `f` holds or `ms` milliseconds passed.
fn wait_until(ms: u64, mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..ms {
        if f() {
            return true;
        }
        spin_ms(1);
    }
    f()
}

/// Most rounds of a repeated case, whatever the other tasks do.
const MAX_ROUNDS: u32 = 100_000;
/// Sentinel a `no-ack` guest leaves in its area's words.
const SENTINEL: u32 = 0x5a5a_5a5a;

/// Entry of a hostile task (CPL 3). Returns the number of failed checks.
#[allow(clippy::too_many_lines)] // one arm per case, each a short script
pub fn task(_t: u32, spec: &TaskSpec) -> u32 {
    let name = usize::try_from(spec.arg0)
        .ok()
        .and_then(|i| HOSTILE_CASES.get(i))
        .copied()
        .unwrap_or("unknown");
    let mut c = Case { name, failed: 0 };
    let mode = hostile(op::MODE, 0);
    let cpu = u32::try_from(hostile(op::CPU, 0)).unwrap_or(0);
    let f: u64 = if mode == 2 { 9 } else { 1 };
    // The end of the last RAM region; guests of more than 3 GiB have a second region above
    // the MMIO hole, and region 0 then ends at the hole.
    let ram = boot_info().ram_end();
    let low_end = boot_info()
        .ram()
        .first()
        .map_or(ram, guest_abi::RamRegion::end);
    if mode == 0 {
        c.gp("en-write-without-apf-gp", op::EN_OWN, 1, true);
        return finish(&c);
    }
    let own = hostile(op::AREA, 0);
    let en_is_own = |c: &mut Case, what: &str| c.check(what, hostile(op::RDMSR_EN, 0) == own | f);
    match name {
        "area-outside-ram" => {
            c.gp("en-at-ram-end-gp", op::WRMSR_EN, ram | f, true);
            c.gp(
                "en-1mib-past-ram-gp",
                op::WRMSR_EN,
                (ram + (1 << 20)) | f,
                true,
            );
            c.gp("en-at-128tib-gp", op::WRMSR_EN, (1 << 47) | f, true);
            en_is_own(&mut c, "en-unchanged-after-gp");
        }
        "area-straddles-ram-end" => {
            // The last 32 bytes: bits 5..0 are flags, so this reads as the last 64 bytes
            // with reserved bit 5 set.
            c.gp("en-last-32-bytes-gp", op::WRMSR_EN, (ram - 32) | f, true);
            // The last 64 bytes are a valid area; switched back to the own one at once, so
            // no delivery lands there (this guest's #PF handler reads its own area only).
            let r = hostile(op::EN_BRIEFLY, (ram - 64) | f);
            c.check("en-last-64-bytes-accepted", r & 1 == 0);
            c.check("en-own-again", r & 2 == 0);
            if low_end != ram {
                // Region 0 ends at the MMIO hole: its last 64 bytes are RAM, the next are not.
                let r = hostile(op::EN_BRIEFLY, (low_end - 64) | f);
                c.check("en-last-64-bytes-below-hole-accepted", r & 1 == 0);
                c.check("en-own-again-2", r & 2 == 0);
                c.gp("en-hole-start-gp", op::WRMSR_EN, low_end | f, true);
            }
            en_is_own(&mut c, "en-own-after");
        }
        "area-mmio" => {
            // The MMIO hole [3 GiB, 4 GiB): never RAM, whatever the guest's size.
            c.gp("en-lapic-page-gp", op::WRMSR_EN, LAPIC_GPA | f, true);
            c.gp("en-ioapic-page-gp", op::WRMSR_EN, 0xfec0_0000 | f, true);
            c.gp("en-hole-first-area-gp", op::WRMSR_EN, 0xc000_0000 | f, true);
            c.gp("en-hole-last-area-gp", op::WRMSR_EN, 0xffff_ffc0 | f, true);
            en_is_own(&mut c, "en-unchanged-after-gp");
        }
        "area-unaligned" => {
            let modern = mode == 2;
            // Offset 2 is flag bit 1 (SEND_ALWAYS) in both modes; offset 8 is bit 3
            // (DELIVERY_AS_INT) in modern mode, reserved in seed mode; 16, 32 are reserved
            // in both.
            c.gp("en-area-plus-2", op::EN_OWN, 2 | 1, false);
            c.gp("en-area-plus-8", op::EN_OWN, 8 | 1, !modern);
            c.gp("en-area-plus-16-gp", op::EN_OWN, 16 | 1, true);
            c.gp("en-area-plus-32-gp", op::EN_OWN, 32 | 1, true);
            c.gp("en-own-again", op::EN_OWN, f, false);
            en_is_own(&mut c, "en-own-after");
        }
        "area-overlap" => {
            if boot_info().cpu_count < 2 {
                c.check("skipped-one-vcpu", true);
            } else {
                let r = hostile(op::EN_OVERLAP, f);
                c.check("en-other-vcpus-area-accepted", r & 1 == 0);
                c.check("en-own-again", r & 2 == 0);
                sys_print(if r & 4 != 0 {
                    b"hostile: area-overlap: note: the host wrote this vCPU's wake-all into the other vCPU's slot (put back)\n"
                } else {
                    b"hostile: area-overlap: note: nothing was written into the other vCPU's area\n"
                });
            }
            en_is_own(&mut c, "en-own-after");
        }
        "toggle" => {
            let mut gps = 0;
            let mut rounds = 0;
            while rounds < 20 || (others_running() && rounds < MAX_ROUNDS) {
                gps += hostile(op::TOGGLE, 10 << 8 | f);
                spin_ms(1);
                sys_yield();
                rounds += 1;
            }
            c.check("toggles-accepted", gps == 0);
            let before = wake_alls(cpu);
            hostile(op::RESTORE, 0);
            c.check(
                "wake-all-after-last-enable",
                wait_until(500, || wake_alls(cpu) > before),
            );
        }
        "reenable" => {
            let before = wake_alls(cpu);
            let mut gps = 0;
            let mut rounds = 0;
            while rounds < 20 || (others_running() && rounds < MAX_ROUNDS) {
                gps += hostile(op::EN_OWN, f) + hostile(op::EN_OWN, f);
                spin_ms(1);
                sys_yield();
                rounds += 1;
            }
            c.check("reenables-accepted", gps == 0);
            c.check(
                "wake-alls-delivered",
                wait_until(500, || wake_alls(cpu) > before),
            );
        }
        "no-ack" => {
            // Leave the area as a guest that never reads the reason and never ACKs would:
            // both words non-zero. Then queue a wake-all (re-enable): the host must hold it.
            hostile(op::AREA_FILL, u64::from(SENTINEL));
            let before = wake_alls(cpu);
            c.gp("reenable-accepted", op::EN_OWN, f, false);
            let mut intact = true;
            let mut rounds = 0;
            while rounds < 30 || (others_running() && rounds < MAX_ROUNDS) {
                spin_ms(1);
                intact &= hostile(op::AREA_READ, 0) == u64::from(SENTINEL)
                    && hostile(op::AREA_READ, 1) == u64::from(SENTINEL);
                sys_yield();
                rounds += 1;
            }
            c.check("area-never-overwritten", intact);
            c.check("nothing-delivered-meanwhile", wake_alls(cpu) == before);
            // Consume and ACK now: the held wake-all must go out.
            hostile(op::AREA_FILL, 0);
            if mode == 2 {
                c.gp("ack-accepted", op::ACK, 1, false);
            }
            c.check(
                "held-wake-all-delivered-after-ack",
                wait_until(500, || wake_alls(cpu) > before),
            );
        }
        "ack-idle" => {
            let modern = mode == 2;
            let before = page_readies(cpu);
            let mut gps = 0;
            for _ in 0..100 {
                gps += hostile(op::ACK, 1);
            }
            c.check(
                if modern {
                    "100-acks-accepted"
                } else {
                    "acks-gp-in-seed-mode"
                },
                if modern { gps == 0 } else { gps == 100 },
            );
            c.gp("ack-0", op::ACK, 0, !modern);
            c.gp("ack-2-gp", op::ACK, 2, true);
            spin_ms(5);
            c.check("no-page-ready-made-up", page_readies(cpu) == before);
        }
        "int-change" => {
            if mode == 2 {
                // A wake-all pending (re-enable, IF = 0 in the kernel), then the vector is
                // changed before it can go out: it goes out on the new vector (0xf0, the
                // reschedule IPI's handler, which neither reads nor clears the slot).
                let before = wake_alls(cpu);
                let r = hostile(op::INT_CHANGE, u64::from(VEC_RESCHED));
                c.check("reenable-accepted", r & 1 == 0);
                c.check("int-exception-vector-gp", r & 2 != 0);
                c.check("int-reserved-bits-gp", r & 4 != 0);
                c.check("int-changed-while-ready-pending", r & 8 == 0);
                c.check("ack-accepted", r & 16 == 0);
                c.check(
                    "ready-delivered-on-new-vector",
                    wait_until(500, || hostile(op::AREA_READ, 1) == 0xffff_ffff),
                );
                c.check("old-vector-handler-not-run", wake_alls(cpu) == before);
                // Clean up as a guest would: free the slot, ACK, old vector, enable again.
                hostile(op::AREA_WRITE, 1 << 32);
                c.gp("ack", op::ACK, 1, false);
                c.gp("int-back", op::INT, u64::from(VEC_APF), false);
                hostile(op::RESTORE, 0);
                c.check(
                    "wake-all-on-old-vector-again",
                    wait_until(500, || wake_alls(cpu) > before),
                );
            } else {
                c.gp("int-not-offered-gp", op::INT, u64::from(VEC_APF), true);
            }
        }
        "area-in-lazy-memory" => lazy_area::case(&mut c, cpu, f, ram),
        "same-page" | "flood" => {
            c.check("a-workload-shape-see-the-scan-tasks", true);
        }
        _ => c.check("known-case", false),
    }
    finish(&c)
}

fn finish(c: &Case) -> u32 {
    sys_print(b"hostile: ");
    sys_print(c.name.as_bytes());
    sys_print(if c.failed == 0 {
        b": PASS\n"
    } else {
        b": FAIL\n"
    });
    c.failed
}
