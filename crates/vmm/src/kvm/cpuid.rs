//! The CPUID table given to each vCPU: KVM's supported table, with the KVM paravirtual leaves
//! set so the guest sees exactly the APF features of the chosen `--apf` mode, and the APIC
//! topology made consistent with the vCPU index.
//!
//! Paravirtual feature bits other than APF (kvmclock, steal time, PV EOI, PV IPIs...) are all
//! cleared: the project's guest uses none of them, and each one it could see would be a
//! host feature outside the VMM's control (and outside its snapshots).

use apf_abi::cpuid::{
    ALL_ASYNC_PF, FEATURE_ASYNC_PF, FEATURE_ASYNC_PF_INT, FEATURES_LEAF, SIGNATURE_LEAF,
    signature_regs,
};
use kvm_bindings::kvm_cpuid_entry2;

use crate::config::ApfMode;

/// Leaf 0x40000001 EAX for a mode: off → none; v1 → bit 4 only (seed mode); v2 → bits 4
/// and 14. Bit 10 (ASYNC_PF_VMEXIT, nested delivery) is never offered.
pub fn pv_features(mode: ApfMode) -> u32 {
    let bits = match mode {
        ApfMode::Off => 0,
        ApfMode::V1 => FEATURE_ASYNC_PF,
        ApfMode::V2 => FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT,
    };
    debug_assert_eq!(bits & !ALL_ASYNC_PF, 0);
    bits
}

/// Patches KVM's supported CPUID entries for vCPU `index` under `mode`.
pub fn patch(entries: &mut Vec<kvm_cpuid_entry2>, mode: ApfMode, index: u32, vcpus: u32) {
    entries.retain(|e| e.function != SIGNATURE_LEAF && e.function != FEATURES_LEAF);
    let [ebx, ecx, edx] = signature_regs();
    entries.push(kvm_cpuid_entry2 {
        function: SIGNATURE_LEAF,
        eax: FEATURES_LEAF,
        ebx,
        ecx,
        edx,
        ..Default::default()
    });
    entries.push(kvm_cpuid_entry2 {
        function: FEATURES_LEAF,
        eax: pv_features(mode),
        ..Default::default()
    });
    for e in entries.iter_mut() {
        match e.function {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((vcpus & 0xff) << 16);
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                }
            }
            // Extended topology: EDX = x2APIC id of this logical processor.
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
}

/// Reads leaf 0x40000001 EAX from a table (for tests and diagnostics).
pub fn features_in(entries: &[kvm_cpuid_entry2]) -> Option<u32> {
    entries
        .iter()
        .find(|e| e.function == FEATURES_LEAF)
        .map(|e| e.eax)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0001_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: SIGNATURE_LEAF,
                eax: FEATURES_LEAF,
                ..Default::default()
            },
            // What KVM offers on our hosts.
            kvm_cpuid_entry2 {
                function: FEATURES_LEAF,
                eax: 0x0100_7efb,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn apf_bits_are_exactly_per_mode() {
        for (mode, eax) in [
            (ApfMode::Off, 0),
            (ApfMode::V1, 1 << 4),
            (ApfMode::V2, (1 << 4) | (1 << 14)),
        ] {
            let mut e = supported();
            patch(&mut e, mode, 0, 1);
            assert_eq!(features_in(&e), Some(eax), "{mode:?}");
            assert_eq!(e.iter().filter(|x| x.function == FEATURES_LEAF).count(), 1);
            let sig = e.iter().find(|x| x.function == SIGNATURE_LEAF).unwrap();
            assert_eq!([sig.ebx, sig.ecx, sig.edx], signature_regs());
        }
    }

    #[test]
    fn apic_id_follows_the_index() {
        let mut e = supported();
        patch(&mut e, ApfMode::V2, 3, 4);
        let leaf1 = e.iter().find(|x| x.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
    }
}
