//! `hostile:area-in-lazy-memory`: Linux keeps its APF area in per-CPU data, anywhere in RAM.
//! Here every vCPU's hostile task moves its vCPU's area to a block at the top of RAM
//! (`guest_abi::lazy_area_gpa`), which a lazy restore serves on demand: after a restore the
//! host's first read and write of a reason (or v2 token) there, and this kernel's handlers,
//! touch memory still arriving. The VMM runs a scan on every vCPU next to it, which waits
//! for every vCPU's move before it starts (`SCAN_AFTER_AREAS_MOVED`).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use apf_abi::msr::{EN_DELIVERY_AS_INT, EN_ENABLED, MSR_KVM_ASYNC_PF_EN};
use guest_abi::{TaskKind, lazy_area_gpa};

use super::{Case, MAX_ROUNDS, boot_info, hostile, op, spin_ms, try_wrmsr, wait_until, wake_alls};
use crate::sched::{ApfArea, Cpu, NONCOMPUTE_LEFT, cpu_counters};
use crate::user::sys_yield;
use crate::x86::rdtsc;

/// vCPUs that have moved their area (`MOVE_AREA`, #GP or not).
static AREAS_MOVED: AtomicU32 = AtomicU32::new(0);
/// Longest a scan waits for the areas to move.
const WAIT_MS: u64 = 2000;

/// The kernel side of `MOVE_AREA` (CPL 0, IF = 0).
pub(super) fn move_area(c: *mut Cpu, to: u64) -> u64 {
    let area = to as *mut ApfArea;
    // SAFETY: `to` is a 64-byte aligned address in RAM (the guest's own choice, identity
    // mapped); nothing else uses that memory while it is not an area. Cleared first, so the
    // host finds its reason consumed and its token slot free.
    unsafe { core::ptr::write_bytes(area.cast::<u8>(), 0, core::mem::size_of::<ApfArea>()) };
    // SAFETY: this vCPU's state; the #GP handler is not involved in this read.
    let flags = if unsafe { (*c).version } == 2 {
        EN_ENABLED | EN_DELIVERY_AS_INT
    } else {
        EN_ENABLED
    };
    let gp = try_wrmsr(c, MSR_KVM_ASYNC_PF_EN, to | flags);
    if !gp {
        // SAFETY: this vCPU's state. Nothing the host wrote into the new area can be taken
        // before this store: v1 waits for IF = 1, a v2 interrupt is held until then.
        unsafe { write_volatile(addr_of_mut!((*c).area_at), area) };
    }
    AREAS_MOVED.fetch_add(1, Ordering::Release);
    u64::from(gp)
}

/// A scan with `SCAN_AFTER_AREAS_MOVED` on vCPU `cpu` (CPL 3): yields until every vCPU has
/// moved its area, or at most `WAIT_MS`; at once where APF is off (nothing moves then).
pub fn wait_for_moved_areas(cpu: u32) {
    // SAFETY: the counters page (user-accessible); a word this vCPU's kernel set at boot.
    if unsafe { read_volatile(addr_of!((*cpu_counters(cpu)).apf_version)) } == 0 {
        return;
    }
    let end = rdtsc().wrapping_add(WAIT_MS.saturating_mul(boot_info().tsc_khz));
    while AREAS_MOVED.load(Ordering::Acquire) < boot_info().cpu_count && rdtsc() < end {
        sys_yield();
    }
}

/// Only hostile tasks are left among the non-compute ones (the scans are done). Stays true:
/// the hostile tasks that wait for it end after it.
fn only_hostile_left() -> bool {
    let bi = boot_info();
    let tasks = bi.tasks.iter().take(bi.task_count as usize);
    let hostile = tasks.filter(|t| t.kind == TaskKind::Hostile as u32).count();
    NONCOMPUTE_LEFT.load(Ordering::Acquire) as usize <= hostile
}

/// The case (CPL 3) on vCPU `cpu`, APF enabled with `_EN` flags `f`, RAM ending at `ram`.
pub(super) fn case(c: &mut Case, cpu: u32, f: u64, ram: u64) {
    let to = lazy_area_gpa(ram, cpu);
    let before = wake_alls(cpu);
    c.check("en-lazy-area-accepted", hostile(op::MOVE_AREA, to) == 0);
    c.check("handlers-read-the-lazy-area", hostile(op::AREA, 0) == to);
    let en_is_lazy = |c: &mut Case, what: &str| {
        c.check(what, hostile(op::RDMSR_EN, 0) == to | f);
    };
    en_is_lazy(c, "en-names-the-lazy-area");
    // The re-enable's wake-all went through the new area (v1: reason 2 there; a handler
    // reading the old one would see an ordinary #PF and kill the guest).
    c.check(
        "wake-all-through-the-lazy-area",
        wait_until(500, || wake_alls(cpu) > before),
    );
    // The scans (a snapshot of this guest is taken after their fill pass) fault on cold
    // memory: every not-present and page ready goes through the lazy area.
    let mut rounds = 0;
    while !only_hostile_left() && rounds < MAX_ROUNDS {
        spin_ms(1);
        sys_yield();
        rounds += 1;
    }
    c.check("scans-finished", only_hostile_left());
    en_is_lazy(c, "en-still-names-the-lazy-area");
    c.check(
        "lazy-area-consumed-at-the-end",
        wait_until(500, || {
            hostile(op::AREA_READ, 0) == 0 && hostile(op::AREA_READ, 1) == 0
        }),
    );
}
