//! The MSR filter that sends the three APF MSRs to userspace.
//!
//! Default allow; `MSR_KVM_ASYNC_PF_EN`, `_INT` and `_ACK` denied for reads and writes, which
//! with `KVM_MSR_EXIT_REASON_FILTER` turns each access into `KVM_EXIT_X86_RDMSR/WRMSR`. This
//! holds in every `--apf` mode: with `--apf off` the engine answers #GP, so a guest can never
//! reach KVM's own in-kernel APF.

use apf_abi::msr::ALL;
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

use crate::error::{Result, VmmError};

/// First MSR of the filtered range.
pub const BASE: u32 = 0x4b56_4d02;
/// MSRs in the range (0x4b564d02..=0x4b564d07).
pub const COUNT: u32 = 6;

/// The range's bitmap: bit `i` covers MSR `BASE + i`; 1 = allow (KVM handles it), 0 = deny
/// (exit to userspace).
pub fn bitmap() -> [u8; 1] {
    let mut allow = 0xffu8;
    for msr in ALL {
        allow &= !(1 << (msr - BASE));
    }
    [allow]
}

/// Installs the filter on the VM (after `KVM_CAP_X86_USER_SPACE_MSR` is enabled).
pub fn install(vm: &VmFd) -> Result<()> {
    let bitmap = bitmap();
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: BASE,
        msr_count: COUNT,
        bitmap: &bitmap,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        .map_err(VmmError::kvm("KVM_X86_SET_MSR_FILTER"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_apf_msrs_are_denied() {
        // 02 (bit 0), 06 (bit 4) and 07 (bit 5) denied; 03, 04, 05 allowed.
        assert_eq!(bitmap(), [0b1100_1110]);
        assert!(ALL.iter().all(|&m| (BASE..BASE + COUNT).contains(&m)));
    }
}
