//! The project's own x86-64 guest kernel: round-robin CPL 3 tasks on every vCPU, a few
//! system calls, and the guest side of KVM's asynchronous page fault protocol (v1 and v2).
//!
//! The boot contract (entry state, memory layout, ports, BootInfo, Counters) is
//! `guest-abi`; the protocol's wire format is `apf-abi`; the sleeper table is `apf-guest`.
//! CPL 0 code is emulated by the host at about a microsecond per instruction, so the kernel
//! paths (entry stubs, #PF, interrupts, context switch) are kept short; task code runs at
//! CPL 3, natively.
#![no_std]
#![no_main]

mod apf;
mod console;
mod hostile;
mod sched;
mod selftest;
mod trap;
mod user;
mod x86;

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU32, Ordering};

use guest_abi::{
    ABI_VERSION, BOOT_MAGIC, BootInfo, COUNTERS_MAGIC, MAX_CPUS, MAX_TASKS, TaskKind, WORKLOAD_GPA,
    exit_status, port, task_state,
};

use crate::console::{put_hex, puts};
use crate::sched::{
    IDLE, NONCOMPUTE_LEFT, TASK_STATE, TASKS_LEFT, counters, cpu_counters, cpu_ptr, finish_task,
    init_task, state, sys, task_counters, task_ptr,
};
use crate::trap::{VEC_SPURIOUS, VEC_TIMER};
use crate::x86::{halt_forever, lapic, outl, rdtsc};

/// LAPIC timer ticks per microsecond with divide-by-1 (KVM's emulated APIC bus: 1 GHz).
const TIMER_TICKS_PER_US: u64 = 1000;

/// A `static` the kernel manages by hand: per-vCPU data touched only by its vCPU, or boot
/// data written by vCPU 0 before the others start.
#[derive(Debug)]
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: every user documents why its accesses do not race (per-vCPU ownership, or
// boot-time writes published by INIT_DONE).
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// Wraps `v`.
    pub const fn new(v: T) -> Self {
        Global(UnsafeCell::new(v))
    }

    /// The raw pointer to the value.
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// 0 while vCPU 0 sets up; [`INIT_OK`] or [`INIT_BAD`] after.
static INIT_DONE: AtomicU32 = AtomicU32::new(0);
const INIT_OK: u32 = 1;
const INIT_BAD: u32 = 2;

global_asm!(
    r#"
    .section .text.entry,"ax"
    .global _start
    _start:
        call {kmain}
        ud2
    "#,
    kmain = sym kmain,
);

fn boot_fail(msg: &str, what: u64) -> ! {
    puts("apf-guest: bad boot info: ");
    puts(msg);
    puts(" ");
    put_hex(what);
    puts("\n");
    INIT_DONE.store(INIT_BAD, Ordering::Release);
    outl(port::EXIT, exit_status::BAD_BOOT_INFO);
    halt_forever()
}

/// Checks BootInfo and the workload it describes (vCPU 0).
fn validate(bi: &BootInfo) {
    if bi.magic != BOOT_MAGIC {
        boot_fail("magic", bi.magic);
    }
    if bi.version != ABI_VERSION {
        boot_fail("version", u64::from(bi.version));
    }
    if bi.cpu_count == 0 || bi.cpu_count as usize > MAX_CPUS {
        boot_fail("cpu_count", u64::from(bi.cpu_count));
    }
    if bi.task_count as usize > MAX_TASKS {
        boot_fail("task_count", u64::from(bi.task_count));
    }
    if bi.tsc_khz == 0 {
        boot_fail("tsc_khz", 0);
    }
    if bi.ram().is_empty() {
        boot_fail("ram_region_count", u64::from(bi.ram_region_count));
    }
    for (i, t) in bi.tasks.iter().take(bi.task_count as usize).enumerate() {
        let i = i as u64;
        let Some(kind) = TaskKind::from_raw(t.kind) else {
            boot_fail("task kind of task", i);
        };
        if t.cpu >= bi.cpu_count {
            boot_fail("cpu of task", i);
        }
        if kind == TaskKind::Scan {
            // Wholly in one RAM region: a scan never straddles the MMIO hole.
            if t.arg0 < WORKLOAD_GPA
                || t.arg0 % 4096 != 0
                || t.arg1 % 4096 != 0
                || !bi.in_one_ram_region(t.arg0, t.arg1)
            {
                boot_fail("scan region of task", i);
            }
        }
    }
}

/// vCPU 0's one-time set-up: counters page, IDT, tasks.
fn global_init(bi: &BootInfo) {
    validate(bi);
    let c = counters();
    // SAFETY: the counters page is ours (guest-abi layout); nobody reads it before exit.
    unsafe {
        core::ptr::write_bytes(
            c.cast::<u8>(),
            0,
            core::mem::size_of::<guest_abi::Counters>(),
        );
        (*c).version = ABI_VERSION;
        (*c).task_count = bi.task_count;
    }
    trap::build_idt();
    let mut noncompute = 0;
    for (i, t) in bi.tasks.iter().take(bi.task_count as usize).enumerate() {
        #[allow(clippy::cast_possible_truncation)] // i < MAX_TASKS
        let i = i as u32;
        // SAFETY: task i's counters entry, before any task runs.
        unsafe {
            (*task_counters(i)).kind = t.kind;
            (*task_counters(i)).state = task_state::NEW;
        }
        if t.kind != TaskKind::Compute as u32 {
            noncompute += 1;
        }
        if t.kind == TaskKind::MsrSelftest as u32 {
            // Run by its vCPU's kernel at boot: a record, but not on the run queue.
            // SAFETY: boot, single-threaded.
            unsafe {
                let task = task_ptr(i);
                (*task).cpu = t.cpu;
                (*task).kind = t.kind;
                (*cpu_ptr(t.cpu)).live += 1;
            }
            TASK_STATE[i as usize].store(state::RUNNABLE, Ordering::Relaxed);
        } else {
            init_task(i, t.cpu, t.kind, user::task_entry);
        }
    }
    TASKS_LEFT.store(bi.task_count, Ordering::Relaxed);
    NONCOMPUTE_LEFT.store(noncompute, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { (*c).magic = COUNTERS_MAGIC };
}

/// Entered by every vCPU (see guest-abi): RDI = &BootInfo, RSI = vCPU index, IF = 0.
extern "C" fn kmain(bi: *const BootInfo, cpu: u64) -> ! {
    // SAFETY: the VMM wrote a BootInfo there (validated below before use).
    let bi = unsafe { &*bi };
    #[allow(clippy::cast_possible_truncation)]
    let id = cpu as u32;
    if id == 0 {
        global_init(bi);
        INIT_DONE.store(INIT_OK, Ordering::Release);
    } else {
        loop {
            match INIT_DONE.load(Ordering::Acquire) {
                INIT_OK => break,
                INIT_BAD => halt_forever(),
                _ => core::hint::spin_loop(),
            }
        }
        if id >= bi.cpu_count {
            halt_forever();
        }
    }
    let c = cpu_ptr(id);
    // SAFETY: this vCPU's own state; no trap can run yet (IF = 0, no IDT of ours yet).
    unsafe {
        (*c).id = id;
        (*c).current = IDLE;
        sched::set_gs_base(c);
        trap::load_tables(addr_of_mut!((*c).gdt), addr_of_mut!((*c).tss));
    }
    // LAPIC before APF: with a software-disabled LAPIC, v2 spins (§6).
    lapic::write(lapic::SVR, 0x100 | u32::from(VEC_SPURIOUS));
    lapic::write(lapic::TPR, 0);

    // Kernel-run tasks (the MSR self-test) of this vCPU.
    let mut ran_selftest = false;
    for (i, t) in bi.tasks.iter().take(bi.task_count as usize).enumerate() {
        if t.cpu == id && t.kind == TaskKind::MsrSelftest as u32 {
            #[allow(clippy::cast_possible_truncation)]
            let i = i as u32;
            // SAFETY: task i's counters entry; task i belongs to this vCPU.
            unsafe {
                (*task_counters(i)).start_tsc = rdtsc();
                (*task_counters(i)).state = task_state::RUNNING;
            }
            let failed = selftest::run(c);
            // SAFETY: this vCPU's state; no trap is running.
            finish_task(unsafe { &mut *c }, i, failed);
            ran_selftest = true;
        }
    }
    // A vCPU that ran the self-test leaves APF disabled, as the self-test ends.
    if !ran_selftest {
        // SAFETY: as above.
        apf::enable(unsafe { &mut *c });
    }
    // SAFETY: as above.
    let live = unsafe { (*c).live };
    if bi.quantum_us != 0 && live != 0 {
        let count = (u64::from(bi.quantum_us) * TIMER_TICKS_PER_US).min(u64::from(u32::MAX));
        lapic::write(lapic::TIMER_DIV, 0xb); // divide by 1
        lapic::write(lapic::LVT_TIMER, (1 << 17) | u32::from(VEC_TIMER)); // periodic
        #[allow(clippy::cast_possible_truncation)]
        lapic::write(lapic::TIMER_INIT, count as u32);
        // SAFETY: as above.
        unsafe { (*c).timer_on = true };
    }
    idle(id)
}

/// The idle context (CPL 0, boot stack): enter the scheduler, and halt whenever it comes
/// back here because nothing is runnable.
fn idle(id: u32) -> ! {
    // SAFETY: a hand-made `int 0x80` (the host cannot emulate `int n` at CPL 0): push the
    // frame the CPU would (SS, RSP, RFLAGS, CS, RIP, error code) and the vector, and enter
    // the common trap path with RAX = yield. The dispatcher saves this as the idle frame and
    // runs a task if one is runnable; `iretq` comes back to label 2 with every register but
    // RAX restored.
    unsafe {
        asm!(
            "mov rax, rsp",
            "and rsp, -16",
            "push 0x10",
            "push rax",
            "pushfq",
            "push 0x08",
            "lea rax, [rip + 2f]",
            "push rax",
            "push 0",
            "push 0x80",
            "mov eax, {yield_nr}",
            "jmp trap_common",
            "2:",
            yield_nr = const sys::YIELD,
            out("rax") _,
        );
    }
    // SAFETY: only the field's address is taken.
    let halts = unsafe { addr_of_mut!((*cpu_counters(id)).idle_halts) };
    loop {
        // SAFETY: this vCPU's counters (the kernel is not reentrant: IF = 0 here).
        unsafe { *halts += 1 };
        // SAFETY: wait for an interrupt; its handler may switch to a task and come back
        // here later. `sti` delays interrupts by one instruction, so none is lost before
        // `hlt`.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    if x86::cs() & 3 == 3 {
        user::sys_print(b"task panicked\n");
        user::sys_exit(0xdead);
    }
    let _ = writeln!(console::Console, "apf-guest: kernel panic: {info}");
    outl(port::EXIT, exit_status::KERNEL_PANIC);
    halt_forever()
}
