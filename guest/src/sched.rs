//! Per-vCPU state, tasks, the round-robin scheduler and the trap dispatcher.
//!
//! A task is bound to one vCPU. Its saved context is a [`Frame`] at the top of its own kernel
//! stack; switching tasks is returning another frame pointer to the entry stub. The idle
//! context (the boot stack, CPL 0, `sti; hlt`) is saved the same way. Only a task's own vCPU
//! touches its frame and its [`Task`]; other vCPUs only flip its [`TASK_STATE`] (a wake) and
//! send a reschedule IPI.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use guest_abi::{
    COUNTERS_GPA, Counters, CpuCounters, MAX_CPUS, MAX_TASKS, TaskCounters, TaskKind, exit_status,
    port, task_state,
};

use crate::console::{put_dec, put_hex, puts};
use crate::trap::{
    Frame, Gdt, Tss, USER_CS, USER_SS, VEC_APF, VEC_RESCHED, VEC_SPURIOUS, VEC_SYSCALL, VEC_TIMER,
};
use crate::x86::{halt_forever, lapic, outl, rdtsc};
use crate::{Global, apf};

/// Kernel stack per task.
pub const KSTACK_SIZE: usize = 8 * 1024;
/// User stack per task.
pub const USTACK_SIZE: usize = 16 * 1024;

/// System call numbers: `ud2; .byte 0x80` (see [`SYSCALL_INSN_LEN`]), number in RAX,
/// arguments in RDI, RSI; result in RAX; every other register preserved.
pub mod sys {
    /// Give up the CPU: `yield()`.
    pub const YIELD: u64 = 0;
    /// End the calling task: `exit(code)`; does not return.
    pub const EXIT: u64 = 1;
    /// Print bytes on the console: `print(ptr, len)` (len capped at 4096).
    pub const PRINT: u64 = 2;
    /// Publish progress: `report(work, checksum)` into the task's counters.
    pub const REPORT: u64 = 3;
    /// Ask the VMM for a snapshot: `snapshot(tag)` writes `tag` (u32) to port 0xf5. The VMM
    /// may stop the VM there and resume it later, elsewhere (restore).
    pub const SNAPSHOT: u64 = 4;
}

/// `Cpu::current` when the vCPU runs its idle loop.
pub const IDLE: u32 = u32::MAX;

/// Scheduler state of a task, in [`TASK_STATE`].
pub mod state {
    /// Waiting for its first run, or ready to run, or running.
    pub const RUNNABLE: u32 = 1;
    /// Asleep on an APF token.
    pub const ASLEEP: u32 = 2;
    /// Exited (or a kernel-run task such as the MSR self-test that has finished).
    pub const DONE: u32 = 3;
}

/// The 64-byte APF area of one vCPU (`struct kvm_vcpu_pv_apf_data`).
#[derive(Debug)]
#[repr(C, align(64))]
pub struct ApfArea {
    /// Reason (v1) / flags (v2), offset 0.
    pub reason: u32,
    /// v2 page-ready token, offset 4.
    pub token: u32,
    pad: [u32; 14],
}

/// One vCPU's kernel state, touched only by that vCPU.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct Cpu {
    /// The APF area (first, so it is 64-byte aligned).
    pub area: ApfArea,
    /// This structure's own address, at [`THIS_OFFSET`]: the trap path finds it at
    /// `gs:[THIS_OFFSET]` (GS base = this structure, set at boot).
    pub this: *mut Cpu,
    /// The area `_EN` names now: [`Cpu::area`] from boot; `hostile:area-in-lazy-memory`
    /// moves it elsewhere in RAM. The #PF and page-ready handlers read this one.
    pub area_at: *mut ApfArea,
    /// vCPU index (= LAPIC id).
    pub id: u32,
    /// Running task index, or [`IDLE`].
    pub current: u32,
    /// Saved idle context (on the boot stack).
    pub idle_frame: *mut Frame,
    /// APF protocol enabled: 0 none, 1 v1, 2 v2.
    pub version: u32,
    /// Number of entries in `local`.
    pub ntasks: u32,
    /// Index into `local` of the task last picked.
    pub rr: u32,
    /// Local tasks not yet done.
    pub live: u32,
    /// Task indices bound to this vCPU.
    pub local: [u8; MAX_TASKS],
    /// MSR self-test: the next #GP is expected; skip the 2-byte `wrmsr` and record it.
    pub expect_gp: bool,
    /// MSR self-test: a #GP was taken since `expect_gp` was set.
    pub gp_hit: bool,
    /// Timer running (so it can be stopped once no local task is left).
    pub timer_on: bool,
    /// This vCPU's TSS.
    pub tss: Tss,
    /// This vCPU's GDT.
    pub gdt: Gdt,
}

impl Cpu {
    const fn new() -> Cpu {
        Cpu {
            area: ApfArea {
                reason: 0,
                token: 0,
                pad: [0; 14],
            },
            this: core::ptr::null_mut(),
            area_at: core::ptr::null_mut(),
            id: 0,
            current: IDLE,
            idle_frame: core::ptr::null_mut(),
            version: 0,
            ntasks: 0,
            rr: 0,
            live: 0,
            local: [0; MAX_TASKS],
            expect_gp: false,
            gp_hit: false,
            timer_on: false,
            tss: Tss::new(),
            gdt: [0; 7],
        }
    }
}

/// Offset of [`Cpu::this`].
pub const THIS_OFFSET: usize = core::mem::offset_of!(Cpu, this);
const _: () = assert!(THIS_OFFSET == 64);

/// This vCPU's state, through GS (one instruction; the trap path's way to find it).
#[inline]
pub fn this_cpu() -> *mut Cpu {
    let p: *mut Cpu;
    // SAFETY: GS base points at this vCPU's `Cpu` from boot on (`set_gs_base`), and
    // `this` holds its address.
    unsafe {
        core::arch::asm!(
            "mov {}, gs:[{off}]",
            out(reg) p,
            off = const THIS_OFFSET,
            options(nostack, readonly, preserves_flags),
        );
    }
    p
}

/// Points GS at vCPU `c`'s state (boot, CPL 0). The GS selector is made null first so that
/// `iretq` to CPL 3 leaves it (and its base) alone.
///
/// # Safety
/// `c` is this vCPU's own `Cpu`.
pub unsafe fn set_gs_base(c: *mut Cpu) {
    // SAFETY: caller's guarantee; only this vCPU uses it.
    unsafe {
        (*c).this = c;
        (*c).area_at = addr_of_mut!((*c).area);
    }
    // SAFETY: a null GS selector is valid in 64-bit mode; no Rust code uses GS.
    unsafe { core::arch::asm!("mov gs, {0:x}", in(reg) 0u16, options(nostack, preserves_flags)) };
    crate::x86::wrmsr(0xc000_0101, c as u64); // IA32_GS_BASE
}

/// A task's kernel-side record, touched only by its own vCPU (and by vCPU 0 during boot).
#[derive(Debug)]
pub struct Task {
    /// Saved context while not running.
    pub frame: *mut Frame,
    /// The vCPU that runs it.
    pub cpu: u32,
    /// Its `TaskKind` as u32.
    pub kind: u32,
}

#[repr(C, align(4096))]
struct Stacks<const N: usize>([[u8; N]; MAX_TASKS]);

static CPUS: Global<[Cpu; MAX_CPUS]> = Global::new([const { Cpu::new() }; MAX_CPUS]);
static TASKS: Global<[Task; MAX_TASKS]> = Global::new(
    [const {
        Task {
            frame: core::ptr::null_mut(),
            cpu: 0,
            kind: 0,
        }
    }; MAX_TASKS],
);
static KSTACKS: Global<Stacks<KSTACK_SIZE>> = Global::new(Stacks([[0; KSTACK_SIZE]; MAX_TASKS]));
static USTACKS: Global<Stacks<USTACK_SIZE>> = Global::new(Stacks([[0; USTACK_SIZE]; MAX_TASKS]));

/// Scheduler state of every task (a [`state`] value); written across vCPUs by wakes.
pub static TASK_STATE: [AtomicU32; MAX_TASKS] = [const { AtomicU32::new(0) }; MAX_TASKS];
/// Per vCPU: its tasks asleep on a not-present token.
pub static ASLEEP: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Per vCPU: a task just woken from an APF sleep, to run before the round robin goes on
/// ([`NO_TASK`]: none). A woken task preempts at once (its page is in); picking it rather
/// than the next in turn keeps a faulting task from waiting a whole round per page.
pub static WAKE_NEXT: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(NO_TASK) }; MAX_CPUS];
/// [`WAKE_NEXT`]: no task.
pub const NO_TASK: u32 = u32::MAX;
/// Tasks not yet done, over all vCPUs.
pub static TASKS_LEFT: AtomicU32 = AtomicU32::new(0);
/// Tasks other than `Compute` not yet done (compute tasks with duration 0 run until it is 0;
/// read by CPL 3 code).
pub static NONCOMPUTE_LEFT: AtomicU32 = AtomicU32::new(0);
/// Some task exited non-zero.
pub static FAILED: AtomicBool = AtomicBool::new(false);

/// The vCPU's state.
pub fn cpu_ptr(id: u32) -> *mut Cpu {
    // SAFETY: `id` < MAX_CPUS is checked at boot (cpu_count); the pointer stays in the array.
    unsafe { CPUS.get().cast::<Cpu>().add(id as usize & (MAX_CPUS - 1)) }
}

/// A task's record.
pub fn task_ptr(t: u32) -> *mut Task {
    // SAFETY: callers pass indices < task_count <= MAX_TASKS.
    unsafe { TASKS.get().cast::<Task>().add(t as usize) }
}

/// The counters page.
pub fn counters() -> *mut Counters {
    COUNTERS_GPA as *mut Counters
}

/// This vCPU's counters.
pub fn cpu_counters(id: u32) -> *mut CpuCounters {
    // SAFETY: in-bounds element of the counters page's array (id < MAX_CPUS).
    unsafe {
        addr_of_mut!((*counters()).cpus)
            .cast::<CpuCounters>()
            .add(id as usize & (MAX_CPUS - 1))
    }
}

/// A task's counters.
pub fn task_counters(t: u32) -> *mut TaskCounters {
    // SAFETY: in-bounds element of the counters page's array (t < MAX_TASKS).
    unsafe {
        addr_of_mut!((*counters()).tasks)
            .cast::<TaskCounters>()
            .add(t as usize)
    }
}

fn kstack_top(t: u32) -> u64 {
    KSTACKS.get() as u64 + (u64::from(t) + 1) * KSTACK_SIZE as u64
}

fn ustack_top(t: u32) -> u64 {
    USTACKS.get() as u64 + (u64::from(t) + 1) * USTACK_SIZE as u64
}

/// Boot-time set-up of task `t` (by vCPU 0, before any vCPU schedules): its record and an
/// initial frame that "returns" to `entry(t)` at CPL 3 with interrupts on.
pub fn init_task(t: u32, cpu: u32, kind: u32, entry: extern "C" fn(u64) -> !) {
    let frame = (kstack_top(t) - core::mem::size_of::<Frame>() as u64) as *mut Frame;
    // SAFETY: boot, single-threaded: no other vCPU looks at tasks before INIT_DONE; the
    // frame lies inside task t's kernel stack.
    unsafe {
        frame.write(Frame {
            rdi: u64::from(t),
            rip: entry as usize as u64,
            cs: u64::from(USER_CS),
            rflags: 0x202,
            // As if called: RSP + 8 is 16-byte aligned at the function's first instruction.
            rsp: ustack_top(t) - 8,
            ss: u64::from(USER_SS),
            ..Frame::default()
        });
        task_ptr(t).write(Task { frame, cpu, kind });
        let c = cpu_ptr(cpu);
        let n = (*c).ntasks;
        (*c).local[n as usize] = u8::try_from(t).unwrap_or(0);
        (*c).ntasks = n + 1;
        (*c).live += 1;
    }
    TASK_STATE[t as usize].store(state::RUNNABLE, Ordering::Relaxed);
}

/// Marks task `t` done with `code` (kernel side of `exit`, also used for kernel-run tasks).
pub fn finish_task(c: &mut Cpu, t: u32, code: u32) {
    TASK_STATE[t as usize].store(state::DONE, Ordering::Release);
    let tc = task_counters(t);
    // SAFETY: the task's counters entry, written only by its vCPU.
    unsafe {
        (*tc).exit_code = code;
        (*tc).done_tsc = rdtsc();
        (*tc).state = task_state::DONE;
    }
    if code != 0 {
        FAILED.store(true, Ordering::Relaxed);
    }
    c.live -= 1;
    if c.live == 0 && c.timer_on {
        // No local task left: stop the tick (masked, one-shot, count 0).
        lapic::write(lapic::LVT_TIMER, 1 << 16 | u32::from(VEC_TIMER));
        lapic::write(lapic::TIMER_INIT, 0);
        c.timer_on = false;
    }
    // SAFETY: task t's record belongs to this vCPU.
    let kind = unsafe { (*task_ptr(t)).kind };
    if kind != TaskKind::Compute as u32 {
        NONCOMPUTE_LEFT.fetch_sub(1, Ordering::Release);
    }
    if TASKS_LEFT.fetch_sub(1, Ordering::AcqRel) == 1 && c.id != 0 {
        lapic::ipi(0, VEC_RESCHED);
    }
}

/// Makes task `t` (asleep on a token) runnable on its own vCPU; `from` is the waking vCPU.
/// Returns true when the task belongs to `from` (the caller may reschedule at once).
pub fn make_runnable(t: u32, from: u32) -> bool {
    // SAFETY: `cpu` of a task never changes after boot.
    let cpu = unsafe { (*task_ptr(t)).cpu };
    TASK_STATE[t as usize].store(state::RUNNABLE, Ordering::Release);
    ASLEEP[cpu as usize].fetch_sub(1, Ordering::Relaxed);
    WAKE_NEXT[cpu as usize & (MAX_CPUS - 1)].store(t, Ordering::Release);
    if cpu != from {
        lapic::ipi(cpu, VEC_RESCHED);
    }
    cpu == from
}

/// The system-call instruction sequence: `ud2` followed by the marker byte 0x80.
///
/// The host (nested "PVM" KVM) answers `int 0x80` at CPL 3 with #UD, so system calls enter
/// through #UD instead: the handler recognises `0f 0b 80` at RIP and resumes after it. A `ud2`
/// without the marker (a compiler trap) stays a fatal #UD.
pub const SYSCALL_INSN_LEN: u64 = 3;

fn is_syscall_insn(fr: &Frame) -> bool {
    if fr.cs & 3 != 3 {
        return false;
    }
    let p = fr.rip as *const u8;
    // SAFETY: RIP of a CPL 3 #UD points at the kernel image's text (tasks run kernel code
    // only), which is mapped; reading three bytes there has no side effects.
    unsafe {
        read_volatile(p) == 0x0f
            && read_volatile(p.add(1)) == 0x0b
            && read_volatile(p.add(2)) == 0x80
    }
}

/// Called by the entry stub with the saved frame; returns the frame to resume.
#[unsafe(no_mangle)]
pub extern "C" fn trap_dispatch(f: *mut Frame) -> *mut Frame {
    // SAFETY: the per-vCPU state is only used by this vCPU, and the kernel is not
    // reentrant (interrupt gates; IF = 0), so this is the only live reference to it (the
    // MSR self-test reaches it through raw pointers only).
    let c = unsafe { &mut *this_cpu() };
    let id = c.id;
    // SAFETY: `f` is the frame the stub just pushed on this vCPU's current stack.
    let fr = unsafe { &mut *f };
    #[allow(clippy::cast_possible_truncation)]
    let vec = fr.vector as u8;
    let resched = match vec {
        VEC_TIMER => {
            // SAFETY: this vCPU's counters.
            unsafe { (*cpu_counters(id)).timer_ticks += 1 };
            lapic::eoi();
            true
        }
        VEC_SYSCALL => syscall(c, fr),
        6 if is_syscall_insn(fr) => {
            fr.rip += SYSCALL_INSN_LEN;
            fr.rax == sys::YIELD || syscall(c, fr)
        }
        14 => apf::page_fault(c, fr),
        VEC_APF => apf::page_ready_irq(c),
        VEC_RESCHED => {
            // Sent when a task of this vCPU was woken elsewhere: let it run now.
            lapic::eoi();
            true
        }
        13 if c.expect_gp => {
            fr.rip += 2; // skip the `wrmsr` (0f 30)
            c.gp_hit = true;
            c.expect_gp = false;
            false
        }
        VEC_SPURIOUS => false,
        _ => fatal(c, fr, exit_status::FATAL_EXCEPTION, 0),
    };
    if resched { schedule(c, f) } else { f }
}

#[inline]
fn syscall(c: &mut Cpu, fr: &mut Frame) -> bool {
    let cur = c.current;
    match fr.rax {
        sys::YIELD => true,
        sys::EXIT if cur != IDLE => {
            #[allow(clippy::cast_possible_truncation)]
            finish_task(c, cur, fr.rdi as u32);
            true
        }
        sys::PRINT => {
            print_user(fr.rdi, fr.rsi);
            fr.rax = 0;
            false
        }
        sys::REPORT if cur != IDLE => {
            let tc = task_counters(cur);
            // SAFETY: the task's own counters entry.
            unsafe {
                (*tc).work = fr.rdi;
                (*tc).checksum = fr.rsi;
            }
            fr.rax = 0;
            false
        }
        crate::hostile::SYS_HOSTILE => {
            fr.rax = crate::hostile::syscall(c, fr.rdi, fr.rsi);
            false
        }
        sys::SNAPSHOT => {
            #[allow(clippy::cast_possible_truncation)] // the tag is a u32 by contract
            outl(port::SNAPSHOT, fr.rdi as u32);
            fr.rax = 0;
            false
        }
        _ => {
            fr.rax = u64::MAX;
            false
        }
    }
}

#[inline(never)]
fn print_user(ptr: u64, len: u64) {
    let p = ptr as *const u8;
    #[allow(clippy::cast_possible_truncation)] // len <= 4096
    for i in 0..len.min(4096) as usize {
        // SAFETY: identity-mapped memory the task named; a bad pointer faults fatally.
        crate::x86::outb(port::CONSOLE, unsafe { read_volatile(p.add(i)) });
    }
}

/// Saves the interrupted context and picks the next (round robin over this vCPU's runnable
/// tasks; the idle loop when none).
#[allow(clippy::many_single_char_names)]
fn schedule(c: &mut Cpu, f: *mut Frame) -> *mut Frame {
    let cur = c.current;
    if cur == IDLE {
        c.idle_frame = f;
    } else {
        // SAFETY: the current task is this vCPU's.
        unsafe { (*task_ptr(cur)).frame = f };
    }
    let n = c.ntasks;
    let woken = WAKE_NEXT[c.id as usize & (MAX_CPUS - 1)].swap(NO_TASK, Ordering::AcqRel);
    if TASK_STATE
        .get(woken as usize)
        .is_some_and(|st| st.load(Ordering::Acquire) == state::RUNNABLE)
    {
        // The round robin goes on after the task that was running.
        return switch_to(c, woken);
    }
    let mut i = c.rr;
    for _ in 0..n {
        i += 1;
        if i >= n {
            i = 0;
        }
        // SAFETY: i < ntasks <= MAX_TASKS, and local task indices are < MAX_TASKS (boot).
        let t = u32::from(unsafe { *c.local.get_unchecked(i as usize) });
        // SAFETY: as above.
        let st = unsafe { TASK_STATE.get_unchecked(t as usize) };
        if st.load(Ordering::Acquire) == state::RUNNABLE {
            c.rr = i;
            return switch_to(c, t);
        }
    }
    c.current = IDLE;
    if c.id == 0 && TASKS_LEFT.load(Ordering::Acquire) == 0 {
        shutdown();
    }
    c.idle_frame
}

fn switch_to(c: &mut Cpu, t: u32) -> *mut Frame {
    let cc = cpu_counters(c.id);
    let tc = task_counters(t);
    let task = task_ptr(t);
    // SAFETY: this vCPU's counters, and task t is bound to this vCPU.
    unsafe {
        if t != c.current {
            (*cc).switches += 1;
        }
        if ASLEEP.get_unchecked(c.id as usize).load(Ordering::Relaxed) != 0 {
            (*tc).ran_while_token_outstanding += 1;
        }
    }
    c.current = t;
    let top = kstack_top(t);
    // SAFETY: the TSS is this vCPU's; rsp0 is a plain (packed) field write.
    unsafe { write_volatile(addr_of_mut!(c.tss.rsp0), top) };
    // SAFETY: as above.
    unsafe { (*task).frame }
}

/// vCPU 0, every task done: exit through the exit port with 0 or 1.
fn shutdown() -> ! {
    let status = if FAILED.load(Ordering::Relaxed) {
        exit_status::TASK_FAILED
    } else {
        exit_status::OK
    };
    puts("apf-guest: all tasks done, exit status ");
    put_dec(u64::from(status));
    puts("\n");
    outl(port::EXIT, status);
    halt_forever()
}

/// Prints what went wrong and exits with `status`.
pub fn fatal(c: &Cpu, fr: &Frame, status: u32, cr2: u64) -> ! {
    puts("apf-guest: fatal: cpu ");
    put_dec(u64::from(c.id));
    puts(" vector ");
    put_dec(fr.vector);
    puts(" rip ");
    put_hex(fr.rip);
    puts(" cs ");
    put_hex(fr.cs);
    puts(" error ");
    put_hex(fr.error);
    puts(" cr2 ");
    put_hex(if fr.vector == 14 {
        cr2
    } else {
        crate::x86::cr2()
    });
    puts(" rsp ");
    put_hex(fr.rsp);
    if c.current != IDLE {
        puts(" task ");
        put_dec(u64::from(c.current));
    }
    puts("\n");
    outl(port::EXIT, status);
    halt_forever()
}
