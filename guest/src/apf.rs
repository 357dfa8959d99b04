//! The guest side of the APF protocol: discovery, enable, the #PF handler's APF part and the
//! v2 page-ready interrupt, on top of `apf-guest`'s sleeper table.

use core::cell::UnsafeCell;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, Ordering};

use apf_abi::cpuid::{FEATURES_LEAF, SIGNATURE_LEAF, signature_regs};
use apf_abi::msr::{
    EN_DELIVERY_AS_INT, EN_ENABLED, MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT,
};
use apf_abi::{HostMode, PvFeatures, Token, Version};
use apf_guest::reason::{self, PfKind, Ready};
use apf_guest::{SleeperTable, WaitOutcome, WakeOutcome};
use guest_abi::{MAX_TASKS, exit_status};

use crate::console::{put_hex, puts};
use crate::sched::{
    ASLEEP, Cpu, IDLE, TASK_STATE, cpu_counters, fatal, make_runnable, state, task_counters,
    task_ptr,
};
use crate::trap::{Frame, VEC_APF};
use crate::x86::{cpuid, cr2, lapic, wrmsr};

/// Capacity of the sleeper table: each task holds at most one entry (its sleeper, or the dummy
/// of its one pending token), so `MAX_TASKS` plus slack for stray dummies.
const TABLE_CAPACITY: usize = 64;
const _: () = assert!(TABLE_CAPACITY >= MAX_TASKS);

/// A spinlock (`xchg`), for the sleeper table shared by all vCPUs.
struct SpinLock<T> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: access to `data` is serialised by `locked`.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    const fn new(v: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            data: UnsafeCell::new(v),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        while self.locked.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.data.get() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

/// Tokens whose sleeper a wake-all on the token's own vCPU has woken, kept to check the
/// host: "all outstanding APFs should be woken (no individual type 2 APFs will be sent)"
/// (§2). The host's wake-all covers every token of its vCPU whose "not present" came before
/// it, and in this kernel a task sleeps on its token before the #PF handler returns, so a
/// task that a wake-all of its own vCPU woke slept on a covered token: a later individual
/// page ready for that token is a host bug ([`CpuCounters::ready_after_wake_all`]).
///
/// One slot per task (the token it slept on when a wake-all woke it), cleared when the task
/// sleeps again: a woken task retries its access at once, so slots are live only briefly and
/// the usual page-ready pays one comparison (`live == 0`), not a search. Every instruction
/// here runs emulated at CPL 0 on our hosts.
///
/// [`CpuCounters::ready_after_wake_all`]: guest_abi::CpuCounters::ready_after_wake_all
struct WokenByWakeAll {
    /// Per task: the raw covered token; 0 = none (never a token).
    tokens: [u32; MAX_TASKS],
    /// Slots holding a token.
    live: usize,
}

impl WokenByWakeAll {
    const fn new() -> Self {
        WokenByWakeAll {
            tokens: [0; MAX_TASKS],
            live: 0,
        }
    }

    /// Task `task`, asleep on `token`, was woken by a wake-all of its own vCPU.
    fn record(&mut self, task: usize, token: Token) {
        if let Some(slot) = self.tokens.get_mut(task) {
            if *slot == 0 {
                self.live += 1;
            }
            *slot = token.get();
        }
    }

    /// Task `task` sleeps again: its old token names nothing any more.
    fn forget(&mut self, task: usize) {
        if let Some(slot) = self.tokens.get_mut(task)
            && *slot != 0
        {
            *slot = 0;
            self.live -= 1;
        }
    }

    /// True when `token` is a covered one (and forgets it).
    fn take(&mut self, token: Token) -> bool {
        if self.live == 0 {
            return false;
        }
        match self.tokens.iter_mut().find(|t| **t == token.get()) {
            Some(t) => {
                *t = 0;
                self.live -= 1;
                true
            }
            None => false,
        }
    }
}

/// What the APF client shares between vCPUs, under one lock.
struct Sleepers {
    /// Tasks asleep on tokens (task index as u8), shared by all vCPUs: a v1 page-ready may
    /// arrive on another vCPU than the fault.
    table: SleeperTable<u8, TABLE_CAPACITY>,
    woken: WokenByWakeAll,
}

static TABLE: SpinLock<Sleepers> = SpinLock::new(Sleepers {
    table: SleeperTable::new(),
    woken: WokenByWakeAll::new(),
});

/// The PV feature word, or `None` when there is no KVM signature.
pub fn features() -> Option<PvFeatures> {
    let (_, b, c, d) = cpuid(SIGNATURE_LEAF);
    if [b, c, d] != signature_regs() {
        return None;
    }
    Some(PvFeatures(cpuid(FEATURES_LEAF).0))
}

/// Enables the protocol the host offers on this vCPU (the LAPIC must be enabled first), on
/// its own area.
pub fn enable(c: &mut Cpu) {
    c.area_at = addr_of_mut!(c.area);
    let area = c.area_at as u64;
    let cc = cpu_counters(c.id);
    match features().and_then(PvFeatures::host_mode) {
        None => c.version = 0,
        Some(HostMode::Seed) => {
            wrmsr(MSR_KVM_ASYNC_PF_EN, area | EN_ENABLED);
            c.version = 1;
        }
        Some(HostMode::Modern { .. }) => {
            // _INT before _EN, or interrupt 0 could be injected (§3).
            wrmsr(MSR_KVM_ASYNC_PF_INT, u64::from(VEC_APF));
            wrmsr(MSR_KVM_ASYNC_PF_EN, area | EN_ENABLED | EN_DELIVERY_AS_INT);
            c.version = 2;
            // SAFETY: this vCPU's counters.
            unsafe { (*cc).apf_vector = u32::from(VEC_APF) };
        }
    }
    // SAFETY: this vCPU's counters.
    unsafe { (*cc).apf_version = c.version };
}

/// #PF (vector 14). Returns whether to reschedule.
pub fn page_fault(c: &mut Cpu, fr: &mut Frame) -> bool {
    // Read the reason first and reset it, before anything that could fault (§2).
    // SAFETY: only a field address is taken; `area_at` is this vCPU's area, set at boot.
    let reason_ptr = unsafe { addr_of_mut!((*c.area_at).reason) };
    // SAFETY: this vCPU's area, written by the host between our reads.
    let reason_word = unsafe { read_volatile(reason_ptr) };
    if reason_word != 0 {
        // SAFETY: as above.
        unsafe { write_volatile(reason_ptr, 0) };
    }
    let addr = cr2();
    if c.version == 0 {
        fatal(c, fr, exit_status::PAGE_FAULT, addr);
    }
    let version = if c.version == 2 {
        Version::V2
    } else {
        Version::V1
    };
    match reason::classify(version, reason_word, addr) {
        PfKind::Normal => fatal(c, fr, exit_status::PAGE_FAULT, addr),
        PfKind::NotPresent(token) => {
            let cc = cpu_counters(c.id);
            // SAFETY: this vCPU's counters.
            unsafe { (*cc).not_present += 1 };
            let cur = c.current;
            if cur == IDLE || fr.cs & 3 != 3 {
                puts("apf-guest: page-not-present at CPL 0 (host bug)\n");
                fatal(c, fr, exit_status::FATAL_EXCEPTION, addr);
            }
            #[allow(clippy::cast_possible_truncation)] // task indices < MAX_TASKS <= 255
            let outcome = TABLE.with(|s| {
                let o = s.table.wait(token, cur as u8);
                if o == WaitOutcome::Sleep {
                    // What a wake-all covered before names nothing any more: this task's
                    // old token, and this token if the host reissued it (both cost one
                    // comparison while no slot is live).
                    s.woken.forget(cur as usize);
                    let _ = s.woken.take(token);
                    // Inside the lock, so a wake on another vCPU cannot come in between.
                    TASK_STATE[cur as usize].store(state::ASLEEP, Ordering::Release);
                    ASLEEP[c.id as usize].fetch_add(1, Ordering::Relaxed);
                }
                o
            });
            if outcome == WaitOutcome::Sleep {
                // SAFETY: the current task's counters.
                unsafe { (*task_counters(cur)).apf_sleeps += 1 };
                true
            } else {
                // Retry (its page-ready came first), or a table answer that must not sleep:
                // return, and the task retries the access.
                false
            }
        }
        PfKind::Ready(r) => {
            // A task woken here preempts the running one at once (as a wakeup preemption
            // would): its page is in, and a compute task would otherwise keep the vCPU
            // until the next tick, a whole quantum per page.
            wake(c, r) || c.current == IDLE
        }
        PfKind::Invalid { reason, cr2 } => {
            puts("apf-guest: invalid APF reason ");
            put_hex(u64::from(reason));
            puts(" cr2 ");
            put_hex(cr2);
            puts("\n");
            false
        }
    }
}

/// The v2 page-ready interrupt. Returns whether to reschedule.
pub fn page_ready_irq(c: &mut Cpu) -> bool {
    // SAFETY: as in `page_fault`.
    let token_ptr = unsafe { addr_of_mut!((*c.area_at).token) };
    // SAFETY: this vCPU's area.
    let slot = unsafe { read_volatile(token_ptr) };
    // SAFETY: as above: free the slot, then ACK so the host delivers the next one (§3).
    unsafe { write_volatile(token_ptr, reason::SLOT_FREE) };
    if c.version == 2 {
        wrmsr(MSR_KVM_ASYNC_PF_ACK, 1);
    } // else a stale interrupt, raised before APF was disabled (MSR self-test): EOI only.
    lapic::eoi();
    let woke = reason::take_ready_token(slot).is_some_and(|r| wake(c, r));
    woke || c.current == IDLE
}

/// Wakes the sleepers `r` names. Returns true when a task of this vCPU became runnable.
fn wake(c: &Cpu, r: Ready) -> bool {
    let cc = cpu_counters(c.id);
    let me = c.id;
    let mut local = false;
    match r {
        Ready::Page(token) => {
            // SAFETY: this vCPU's counters.
            unsafe { (*cc).page_ready += 1 };
            // A token a wake-all already covered: count it, leave no dummy behind.
            let outcome = TABLE.with(|s| (!s.woken.take(token)).then(|| s.table.wake(token)));
            match outcome {
                None => {
                    // SAFETY: as above.
                    unsafe { (*cc).ready_after_wake_all += 1 };
                }
                Some(WakeOutcome::Woken(task)) => local |= make_runnable(u32::from(task), me),
                Some(
                    WakeOutcome::DummyRecorded
                    | WakeOutcome::AlreadyRecorded
                    | WakeOutcome::DummyDropped
                    | WakeOutcome::Broadcast,
                ) => {
                    // SAFETY: as above.
                    unsafe { (*cc).early_ready += 1 };
                }
            }
        }
        Ready::WakeAll => {
            // SAFETY: as above.
            unsafe { (*cc).wake_all += 1 };
            TABLE.with(|s| {
                // The host's wake-all covers its own vCPU's tokens only; this kernel wakes
                // every sleeper (harmless: a woken task retries its access), but only this
                // vCPU's are owed no page ready any more.
                for (token, task) in s.table.iter_sleepers() {
                    // SAFETY: `cpu` of a task never changes after boot.
                    if unsafe { (*task_ptr(u32::from(task))).cpu } == me {
                        s.woken.record(usize::from(task), token);
                    }
                }
                let _ = s
                    .table
                    .wake_all(|task| local |= make_runnable(u32::from(task), me));
            });
        }
    }
    local
}
