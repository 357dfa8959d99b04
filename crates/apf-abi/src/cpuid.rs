//! CPUID discovery of the paravirtual interface.

/// "CPUID leaf 0x40000000 returns the signature KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
pub const SIGNATURE_LEAF: u32 = 0x4000_0000;
/// Leaf whose EAX holds the KVM paravirtual feature bits.
pub const FEATURES_LEAF: u32 = 0x4000_0001;
/// The 12-byte KVM signature.
pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

/// Bit 4: "async pf can be enabled by writing to msr 0x4b564d02".
pub const FEATURE_ASYNC_PF: u32 = 1 << 4;
/// Bit 10: page-not-present may be delivered as a #PF VM exit to a nested hypervisor.
pub const FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
/// Bit 14: page-ready is delivered as an interrupt (v2).
pub const FEATURE_ASYNC_PF_INT: u32 = 1 << 14;
/// All APF-related bits; a VMM that does not offer APF clears these.
pub const ALL_ASYNC_PF: u32 = FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_VMEXIT | FEATURE_ASYNC_PF_INT;

/// The signature as the three registers EBX, ECX, EDX return it.
pub const fn signature_regs() -> [u32; 3] {
    let s = KVM_SIGNATURE;
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// The feature word of leaf 0x40000001 EAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PvFeatures(pub u32);

impl PvFeatures {
    /// Seed mode: only bit 4.
    pub const SEED: PvFeatures = PvFeatures(FEATURE_ASYNC_PF);
    /// Modern mode as this project's VMM offers it: bits 4 and 14.
    pub const MODERN: PvFeatures = PvFeatures(FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT);

    /// Bit 4.
    pub const fn async_pf(self) -> bool {
        self.0 & FEATURE_ASYNC_PF != 0
    }
    /// Bit 10.
    pub const fn async_pf_vmexit(self) -> bool {
        self.0 & FEATURE_ASYNC_PF_VMEXIT != 0
    }
    /// Bit 14.
    pub const fn async_pf_int(self) -> bool {
        self.0 & FEATURE_ASYNC_PF_INT != 0
    }

    /// Which dialect of the protocol these features offer, if any.
    pub const fn host_mode(self) -> Option<HostMode> {
        if !self.async_pf() {
            None
        } else if self.async_pf_int() {
            Some(HostMode::Modern {
                vmexit: self.async_pf_vmexit(),
            })
        } else {
            Some(HostMode::Seed)
        }
    }
}

/// The dialect a host speaks, decided by the CPUID bits it advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostMode {
    /// Only bit 4: the 2010 interface exactly (v1; page ready as #PF reason 2).
    Seed,
    /// Bits 4 and 14 (v2; page ready as an interrupt). `vmexit`: bit 10 is offered too.
    Modern {
        /// Bit 10 advertised: DELIVERY_AS_PF_VMEXIT may be set.
        vmexit: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_spells_kvmkvmkvm() {
        let [b, c, d] = signature_regs();
        assert_eq!(b, 0x4b4d_564b); // "KVMK"
        assert_eq!(c, 0x564b_4d56); // "VMKV"
        assert_eq!(d, 0x0000_004d); // "M\0\0\0"
    }

    #[test]
    fn host_mode_follows_the_bits() {
        assert_eq!(PvFeatures(0).host_mode(), None);
        assert_eq!(PvFeatures(FEATURE_ASYNC_PF_INT).host_mode(), None);
        assert_eq!(PvFeatures::SEED.host_mode(), Some(HostMode::Seed));
        assert_eq!(
            PvFeatures::MODERN.host_mode(),
            Some(HostMode::Modern { vmexit: false })
        );
        // What KVM_GET_SUPPORTED_CPUID offers on our hosts.
        assert_eq!(
            PvFeatures(0x0100_7efb).host_mode(),
            Some(HostMode::Modern { vmexit: true })
        );
    }
}
