//! The MSR self-test (`TaskKind::MsrSelftest`), run by the kernel at CPL 0 at boot.
//!
//! Writes every class of invalid and valid value to the APF MSRs, in the mode the host
//! offers (CPUID), and checks which take #GP. The #GP handler, seeing `Cpu::expect_gp`,
//! skips the 2-byte `wrmsr` and sets `Cpu::gp_hit`. Leaves APF disabled (EN = 0).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use apf_abi::HostMode;
use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};

use crate::apf::features;
use crate::console::{put_dec, puts};
use crate::sched::Cpu;
use crate::trap::VEC_APF;
use crate::x86::wrmsr;

/// An APF area address outside guest RAM (and above any physical address width).
const OUTSIDE_RAM: u64 = 0xffff_ffff_ffc0;

struct Run {
    c: *mut Cpu,
    cases: u32,
    failed: u32,
}

impl Run {
    /// Writes `val` to `msr`; returns whether it took #GP.
    fn try_wrmsr(&mut self, msr: u32, val: u64) -> bool {
        // SAFETY: this vCPU's state, through raw pointers only: the #GP handler updates the
        // same fields while `wrmsr` runs.
        unsafe {
            write_volatile(addr_of_mut!((*self.c).gp_hit), false);
            write_volatile(addr_of_mut!((*self.c).expect_gp), true);
        }
        wrmsr(msr, val);
        // SAFETY: as above.
        unsafe {
            let hit = read_volatile(addr_of!((*self.c).gp_hit));
            write_volatile(addr_of_mut!((*self.c).expect_gp), false);
            hit
        }
    }

    fn case(&mut self, name: &str, msr: u32, val: u64, want_gp: bool) {
        let gp = self.try_wrmsr(msr, val);
        self.cases += 1;
        puts("msr-selftest: ");
        puts(name);
        if gp == want_gp {
            puts(" ok\n");
        } else {
            self.failed += 1;
            puts(if gp {
                " FAIL (unexpected #GP)\n"
            } else {
                " FAIL (no #GP)\n"
            });
        }
    }
}

/// Runs the self-test on this vCPU; returns the number of failed cases.
pub fn run(c: *mut Cpu) -> u32 {
    // SAFETY: this vCPU's area; only its address is taken.
    let area = unsafe { addr_of!((*c).area) } as u64;
    let mut r = Run {
        c,
        cases: 0,
        failed: 0,
    };
    let en = MSR_KVM_ASYNC_PF_EN;
    let int = MSR_KVM_ASYNC_PF_INT;
    let ack = MSR_KVM_ASYNC_PF_ACK;
    let vec = u64::from(VEC_APF);
    match features().and_then(apf_abi::PvFeatures::host_mode) {
        None => {
            puts("msr-selftest: mode none (no APF offered)\n");
            r.case("en-enable-not-offered", en, area | 1, true);
            r.case("en-zero-not-offered", en, 0, true);
            r.case("int-not-offered", int, vec, true);
            r.case("ack-not-offered", ack, 1, true);
        }
        Some(HostMode::Seed) => {
            puts("msr-selftest: mode seed (v1)\n");
            // Bit 1 is SEND_ALWAYS, accepted as Linux hosts of 2.6.38 to 5.7 accepted it;
            // bits 5..2 are reserved.
            let names = [
                "en-reserved-bit-2",
                "en-reserved-bit-3",
                "en-reserved-bit-4",
                "en-reserved-bit-5",
            ];
            for (bit, name) in (2..=5).zip(names) {
                r.case(name, en, area | 1 | (1 << bit), true);
            }
            r.case("en-area-outside-ram", en, OUTSIDE_RAM | 1, true);
            r.case("int-not-offered", int, vec, true);
            r.case("ack-not-offered", ack, 1, true);
            r.case("en-send-always", en, area | 0b11, false);
            r.case("en-area-enabled", en, area | 1, false);
            r.case("en-area-disabled", en, area, false);
            r.case("en-zero", en, 0, false);
        }
        Some(HostMode::Modern { vmexit }) => {
            puts("msr-selftest: mode modern (v2)\n");
            r.case("en-reserved-bit-4", en, area | 9 | (1 << 4), true);
            r.case("en-reserved-bit-5", en, area | 9 | (1 << 5), true);
            r.case("en-area-outside-ram", en, OUTSIDE_RAM | 9, true);
            // ENABLED without DELIVERY_AS_INT is inert: its area is never mapped, so any
            // address is accepted, as KVM accepts it.
            r.case("en-inert-area-outside-ram", en, OUTSIDE_RAM | 1, false);
            r.case("int-reserved-bits-8", int, 0x100 | vec, true);
            r.case("int-reserved-bit-63", int, (1 << 63) | vec, true);
            r.case("int-vector-0", int, 0, true);
            r.case("int-vector-14", int, 14, true);
            r.case("int-vector-31", int, 31, true);
            r.case("ack-2", ack, 2, true);
            r.case("int-valid", int, vec, false);
            r.case("en-valid", en, area | 9, false);
            r.case("en-send-always", en, area | 0xb, false);
            if vmexit {
                r.case("en-pf-vmexit-offered", en, area | 0xd, false);
            } else {
                r.case("en-pf-vmexit-not-offered", en, area | 0xd, true);
            }
            r.case("ack-1", ack, 1, false);
            r.case("ack-0", ack, 0, false);
            r.case("en-area-disabled", en, area, false);
            r.case("en-zero", en, 0, false);
        }
    }
    // The valid enables may have left a page-ready token in the area: clear it.
    // SAFETY: this vCPU's area; APF is disabled now.
    unsafe {
        write_volatile(addr_of_mut!((*c).area.reason), 0);
        write_volatile(addr_of_mut!((*c).area.token), 0);
    }
    puts("msr-selftest: ");
    put_dec(u64::from(r.cases));
    puts(" cases, ");
    put_dec(u64::from(r.failed));
    puts(if r.failed == 0 {
        " failed: PASS\n"
    } else {
        " failed: FAIL\n"
    });
    r.failed
}
