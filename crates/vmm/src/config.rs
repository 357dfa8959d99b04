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
    /// `KVM_CAP_X86_DISABLE_EXITS(HLT)`: `hlt` does not exit at all; a missing page is
    /// then faulted on the vCPU thread (docs/host.md, "the trap").
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
}

/// Who turns a missing page of a lazily restored guest into an asynchronous page fault
/// (`apfvm restore --apf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApfPath {
    /// apfvm, from userspace (uffd message → kick → APF driver → inject).
    Userspace,
    /// Nobody: every missing page stalls its vCPU (the VMM never injects). `hlt` stays in
    /// the guest (`HaltMode::NoExit`), so the fault is taken on the vCPU thread, which
    /// sleeps in the kernel's userfaultfd handling until the page lands: no interrupt gets
    /// in.
    Off,
    /// Nobody injects, but the VM is made as for `Kernel` except that the APF MSRs stay
    /// filtered to the VMM (KVM never sees the guest's enable): in-kernel `hlt` and LAPIC, so
    /// KVM takes the fault in a kworker and parks the vCPU in its "APF halt", which lets
    /// interrupts in (docs/host.md, "the trap").
    OffHalt,
    /// KVM's own in-kernel APF on the same userfaultfd memory: no MSR filter (KVM owns the
    /// APF MSRs; the snapshot's values are written into KVM), in-kernel `hlt` (KVM's path
    /// needs its "APF halt"), faults taken by KVM's kworkers. Only a v2 guest gets APFs.
    Kernel,
}

impl ApfPath {
    /// How `hlt` must be handled for this path: userspace APF needs faults taken on the
    /// vCPU thread (docs/host.md, "the trap"); KVM's own APF needs its in-kernel halt.
    pub fn halt(self) -> HaltMode {
        match self {
            ApfPath::Userspace | ApfPath::Off => HaltMode::NoExit,
            ApfPath::OffHalt | ApfPath::Kernel => HaltMode::InKernel,
        }
    }

    /// True when KVM itself handles the APF MSRs (no MSR filter).
    pub fn kvm_owns_msrs(self) -> bool {
        self == ApfPath::Kernel
    }
}

impl std::fmt::Display for ApfPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApfPath::Userspace => "userspace",
            ApfPath::Off => "off",
            ApfPath::OffHalt => "off (KVM's APF halt)",
            ApfPath::Kernel => "kernel (KVM's own)",
        })
    }
}
