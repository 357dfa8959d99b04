//! What a run is asked to do, independent of how it was asked (CLI or library caller).

use guest_abi::TaskSpec;

/// Which APF protocol the VMM offers (`--apf`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ApfMode {
    /// Not offered: no CPUID bit; the MSRs answer #GP.
    Off,
    /// Seed mode (v1): CPUID bit 4 only; page ready as #PF reason 2.
    V1,
    /// Modern mode (v2): CPUID bits 4 and 14; page ready as an interrupt.
    #[default]
    V2,
}

/// How a guest `hlt` is handled. See `kvm::vm` for the trade-off.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum HaltMode {
    /// KVM emulates `hlt` in the kernel (the vCPU sleeps until an interrupt).
    #[default]
    InKernel,
    /// `KVM_CAP_X86_DISABLE_EXITS(HLT)`: `hlt` does not exit at all. Needed later for the
    /// userfaultfd pager (host-facts.md, "the trap").
    NoExit,
}

/// A complete VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs (1..=guest_abi::MAX_CPUS).
    pub vcpus: u32,
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// APF protocol offered.
    pub apf: ApfMode,
    /// The guest kernel ELF.
    pub guest_image: Vec<u8>,
    /// Workload tasks (already assigned to vCPUs and regions).
    pub tasks: Vec<TaskSpec>,
    /// Scheduler quantum passed to the guest (0 = no timer preemption).
    pub quantum_us: u32,
    /// `hlt` handling.
    pub halt: HaltMode,
    /// Echo the guest console to stdout as it arrives.
    pub echo_console: bool,
}
