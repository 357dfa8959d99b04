//! Descriptor tables and the interrupt/exception/system-call entry stubs.
//!
//! Every vector enters one assembly path: push a dummy error code where the CPU pushes none,
//! push the vector, push the 15 general-purpose registers, call [`crate::sched::trap_dispatch`]
//! with the frame's address, and resume whatever frame it returns (this is the context
//! switch: each task's frame lives at the top of its own kernel stack), popping the registers
//! and `iretq`. All gates are interrupt gates: the kernel runs with IF = 0 throughout.

use core::arch::{asm, global_asm};
use core::mem::size_of;

use crate::Global;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// User code selector (64-bit, DPL 3).
pub const USER_CS: u16 = 0x1b;
/// User data/stack selector (DPL 3).
pub const USER_SS: u16 = 0x23;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;

/// LAPIC timer vector (scheduler tick).
pub const VEC_TIMER: u8 = 0x30;
/// System-call vector: a DPL 3 gate for `int 0x80`, and the vector the idle loop's hand-made
/// frame carries. Tasks enter through `ud2; .byte 0x80` instead (see
/// [`crate::sched::SYSCALL_INSN_LEN`]): on this host `int n` is #UD at CPL 3 and kills the VM
/// at CPL 0.
pub const VEC_SYSCALL: u8 = 0x80;
/// Reschedule IPI: a task of this vCPU was woken elsewhere, or all tasks are done.
pub const VEC_RESCHED: u8 = 0xf0;
/// The v2 page-ready vector written to `MSR_KVM_ASYNC_PF_INT`.
pub const VEC_APF: u8 = 0xf3;
/// LAPIC spurious vector (SVR).
pub const VEC_SPURIOUS: u8 = 0xff;

/// The registers saved by the entry stub, then the CPU's interrupt frame.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Pushed by the stub.
    pub vector: u64,
    /// Pushed by the CPU for some exceptions, else 0 by the stub.
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(size_of::<Frame>() == 22 * 8);
const _: () = assert!(size_of::<Frame>().is_multiple_of(16));

global_asm!(
    r#"
    .section .text.trap,"ax"
    .macro TRAP_NOERR vec
    .balign 16
    trap_vec_\vec:
        push 0
        push \vec
        jmp trap_common
    .endm
    .macro TRAP_ERR vec
    .balign 16
    trap_vec_\vec:
        push \vec
        jmp trap_common
    .endm

    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,48,128,240,243,255
    TRAP_NOERR \v
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    TRAP_ERR \v
    .endr

    .balign 16
    .global trap_common
    trap_common:
        push rax
        push rbx
        push rcx
        push rdx
        push rsi
        push rdi
        push rbp
        push r8
        push r9
        push r10
        push r11
        push r12
        push r13
        push r14
        push r15
        mov rdi, rsp
        call {dispatch}
        mov rsp, rax
    .global trap_return
    trap_return:
        pop r15
        pop r14
        pop r13
        pop r12
        pop r11
        pop r10
        pop r9
        pop r8
        pop rbp
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        add rsp, 16
        iretq

    .section .rodata.trap_table,"a"
    .balign 8
    .global trap_table
    trap_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,48,128,240,243,255
        .quad \v, trap_vec_\v
    .endr
    .global trap_table_end
    trap_table_end:
    "#,
    dispatch = sym crate::sched::trap_dispatch,
);

unsafe extern "C" {
    static trap_table: [u64; 0];
    static trap_table_end: [u64; 0];
}

/// One IDT gate.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Gate {
    lo: u64,
    hi: u64,
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Global<Idt> = Global::new(Idt([Gate { lo: 0, hi: 0 }; 256]));

/// Fills the shared IDT from the stub table (once, by vCPU 0, before the others start).
pub fn build_idt() {
    // SAFETY: `trap_table..trap_table_end` is the (vector, handler) array emitted above.
    let (start, end) = unsafe { (trap_table.as_ptr(), trap_table_end.as_ptr()) };
    let idt = IDT.get();
    let mut p = start;
    while p < end {
        // SAFETY: `p` walks the pairs of the table, which ends at `end`; `vec` < 256 by
        // construction of the table, so the IDT index is in bounds.
        unsafe {
            let vec = *p;
            let handler = *p.add(1);
            #[allow(clippy::cast_possible_truncation)] // vectors are < 256
            let dpl3 = vec as u8 == VEC_SYSCALL;
            let type_attr: u64 = if dpl3 { 0xee } else { 0x8e };
            let lo = (handler & 0xffff)
                | (u64::from(KERNEL_CS) << 16)
                | (type_attr << 40)
                | ((handler >> 16) & 0xffff) << 48;
            #[allow(clippy::cast_possible_truncation)]
            let gate = &raw mut (*idt).0[vec as usize & 0xff];
            (*gate).lo = lo;
            (*gate).hi = handler >> 32;
            p = p.add(2);
        }
    }
}

/// The 64-bit TSS (only `rsp0` is used).
#[derive(Debug)]
#[repr(C, packed(4))]
pub struct Tss {
    reserved0: u32,
    /// Stack loaded on a CPL 3 → CPL 0 transition: the current task's kernel stack top.
    pub rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

impl Tss {
    /// An all-zero TSS with no I/O permission bitmap.
    pub const fn new() -> Tss {
        Tss {
            reserved0: 0,
            rsp0: 0,
            rsp1: 0,
            rsp2: 0,
            reserved1: 0,
            ist: [0; 7],
            reserved2: 0,
            reserved3: 0,
            #[allow(clippy::cast_possible_truncation)]
            iomap_base: size_of::<Tss>() as u16,
        }
    }
}

const _: () = assert!(size_of::<Tss>() == 104);

/// Per-vCPU GDT: null, kernel code, kernel data, user code, user data, TSS (2 slots).
pub type Gdt = [u64; 7];

/// The operand of `lgdt` / `lidt`.
#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Fills `gdt` (with a TSS descriptor for `tss`) and loads GDT, TSS and the shared IDT.
///
/// # Safety
/// `gdt` and `tss` must be this vCPU's own, live for ever, and not be in use yet.
pub unsafe fn load_tables(gdt: *mut Gdt, tss: *mut Tss) {
    let base = tss as u64;
    #[allow(clippy::cast_possible_truncation)]
    let limit = (size_of::<Tss>() - 1) as u64;
    let tss_lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((base >> 24) & 0xff) << 56);
    // SAFETY: caller guarantees `gdt` is this vCPU's table, not loaded yet.
    unsafe {
        *gdt = [
            0,
            0x0020_9a00_0000_0000, // 0x08 kernel code, 64-bit
            0x00cf_9200_0000_ffff, // 0x10 kernel data
            0x0020_fa00_0000_0000, // 0x1b user code, 64-bit, DPL 3
            0x00cf_f200_0000_ffff, // 0x23 user data, DPL 3
            tss_lo,                // 0x28 TSS (available)
            base >> 32,
        ];
    }
    #[allow(clippy::cast_possible_truncation)]
    let gdtr = Pointer {
        limit: (size_of::<Gdt>() - 1) as u16,
        base: gdt as u64,
    };
    #[allow(clippy::cast_possible_truncation)]
    let idtr = Pointer {
        limit: (size_of::<Idt>() - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: the new GDT has the same kernel code/data descriptors at the selectors the VMM
    // loaded (0x08, 0x10), so CS/SS need no reload; the TSS descriptor is valid and not busy.
    unsafe {
        asm!(
            "lgdt [{g}]",
            "lidt [{i}]",
            "ltr {t:x}",
            g = in(reg) &raw const gdtr,
            i = in(reg) &raw const idtr,
            t = in(reg) TSS_SEL,
            options(nostack, preserves_flags),
        );
    }
}
