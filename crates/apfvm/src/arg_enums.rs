//! The value enums of the command line that map onto the library's types.

use clap::ValueEnum;
use vmm::{ApfMode, ApfPolicy, HaltMode};

/// `--working-set` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Use it.
    On,
    /// Ignore it.
    Off,
}

/// `--apf` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ApfArg {
    /// Not offered: no CPUID bit; the APF MSRs answer #GP.
    Off,
    /// Seed protocol (2010): CPUID bit 4 only; page ready as #PF reason 2.
    V1,
    /// Modern protocol: CPUID bits 4 and 14; page ready as an interrupt + ACK.
    V2,
}

impl From<ApfArg> for ApfMode {
    fn from(a: ApfArg) -> ApfMode {
        match a {
            ApfArg::Off => ApfMode::Off,
            ApfArg::V1 => ApfMode::V1,
            ApfArg::V2 => ApfMode::V2,
        }
    }
}

/// `--apf-policy` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Every fault the protocol allows becomes an APF.
    Always,
    /// An APF only when the page is expected later than an APF cycle costs.
    Adaptive,
}

impl From<PolicyArg> for ApfPolicy {
    fn from(a: PolicyArg) -> ApfPolicy {
        match a {
            PolicyArg::Always => ApfPolicy::Always,
            PolicyArg::Adaptive => ApfPolicy::Adaptive,
        }
    }
}

/// `--hlt` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HaltArg {
    /// KVM emulates hlt in the kernel (the vCPU sleeps until an interrupt).
    InKernel,
    /// KVM_CAP_X86_DISABLE_EXITS(HLT): hlt never leaves the guest (needed by lazy restore).
    NoExit,
}

impl From<HaltArg> for HaltMode {
    fn from(a: HaltArg) -> HaltMode {
        match a {
            HaltArg::InKernel => HaltMode::InKernel,
            HaltArg::NoExit => HaltMode::NoExit,
        }
    }
}
