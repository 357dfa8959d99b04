//! x86-64 primitives: port I/O, MSRs, CPUID, TSC, CR2 and the xAPIC.
//!
//! Everything here except [`rdtsc`] needs CPL 0. Each instruction at CPL 0 is emulated by
//! the host (about a microsecond each), so these are single instructions, always inlined.

// A call and return are two more emulated instructions at CPL 0: inline these always.
#![allow(clippy::inline_always)]

use core::arch::asm;

/// `out dx, al`.
#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O to the VMM's console/exit ports has no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags));
    }
}

/// `out dx, eax`.
#[inline(always)]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags));
    }
}

/// `wrmsr`. A #GP, if the MSR refuses the value, is fatal unless the caller armed
/// [`crate::sched::Cpu::expect_gp`] (the MSR self-test does).
#[inline(always)]
pub fn wrmsr(msr: u32, val: u64) {
    #[allow(clippy::cast_possible_truncation)] // split into the EDX:EAX halves
    let (lo, hi) = (val as u32, (val >> 32) as u32);
    // SAFETY: the MSRs written by this kernel (APF MSRs) do not change memory the compiler
    // knows about; a #GP is handled by the trap path.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi, options(nostack, preserves_flags));
    }
}

/// `rdtsc` (allowed at CPL 3 too: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter only.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `cpuid` leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid has no memory effects; rbx is reserved by LLVM, so it is saved in a
    // scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0u32 => c,
            out("edx") d,
            options(nomem, nostack, preserves_flags),
        );
    }
    (a, b, c, d)
}

/// CR2: the faulting address (or the APF token) of the last #PF.
#[inline(always)]
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// The code segment selector (its low two bits are the CPL).
#[inline(always)]
pub fn cs() -> u16 {
    let v: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {:x}, cs", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Halts with interrupts off, for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops this vCPU; nothing runs after it.
        unsafe {
            asm!("cli", "hlt", options(nomem, nostack));
        }
    }
}

/// The local xAPIC (MMIO at `guest_abi::LAPIC_GPA`, identity-mapped and uncached).
pub mod lapic {
    use guest_abi::LAPIC_GPA;

    /// Task priority register.
    pub const TPR: u64 = 0x80;
    /// End of interrupt.
    pub const EOI: u64 = 0xb0;
    /// Spurious interrupt vector register (bit 8 = software enable).
    pub const SVR: u64 = 0xf0;
    /// Interrupt command register, low half (writing it sends the IPI).
    pub const ICR_LO: u64 = 0x300;
    /// Interrupt command register, high half (destination in bits 31..24).
    pub const ICR_HI: u64 = 0x310;
    /// LVT timer entry.
    pub const LVT_TIMER: u64 = 0x320;
    /// Timer initial count (writing it starts the timer).
    pub const TIMER_INIT: u64 = 0x380;
    /// Timer divide configuration.
    pub const TIMER_DIV: u64 = 0x3e0;

    /// Writes a LAPIC register.
    #[inline(always)]
    pub fn write(reg: u64, val: u32) {
        // SAFETY: the LAPIC page is identity-mapped MMIO; a 32-bit aligned store to one of
        // its registers is how it is programmed.
        unsafe { core::ptr::write_volatile((LAPIC_GPA + reg) as *mut u32, val) }
    }

    /// End of interrupt.
    #[inline(always)]
    pub fn eoi() {
        write(EOI, 0);
    }

    /// Sends fixed interrupt `vector` to the LAPIC with id `dest`.
    #[inline(always)]
    pub fn ipi(dest: u32, vector: u8) {
        write(ICR_HI, dest << 24);
        // Fixed delivery, physical destination, level assert.
        write(ICR_LO, (1 << 14) | u32::from(vector));
    }
}
