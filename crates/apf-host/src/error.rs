//! The engine's typed errors.

use apf_abi::MsrError;

/// An input the engine refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Error {
    /// The guest's MSR access is invalid: answer it with #GP. No state changed.
    #[error("#GP: {0}")]
    Gp(#[from] MsrError),
    /// The VMM named a vCPU the VM does not have (a VMM bug, never the guest's).
    #[error("no vCPU {vcpu} (the VM has {vcpus})")]
    NoSuchVcpu {
        /// The index given.
        vcpu: usize,
        /// The number of vCPUs.
        vcpus: usize,
    },
    /// The VMM routed an MSR that is not one of the three APF MSRs.
    #[error("MSR {msr:#x} is not an APF MSR")]
    NotApfMsr {
        /// The MSR number.
        msr: u32,
    },
    /// A saved state has a different number of vCPUs than this VM.
    #[error("saved state has {saved} vCPUs, the VM has {vcpus}")]
    SavedVcpuCount {
        /// vCPUs in the saved state.
        saved: usize,
        /// vCPUs in this VM.
        vcpus: usize,
    },
    /// A saved MSR value is invalid under this engine's features or RAM map.
    #[error("saved state: vCPU {vcpu}: {error}")]
    SavedMsr {
        /// The vCPU.
        vcpu: usize,
        /// Why its value is refused.
        error: MsrError,
    },
}

impl Error {
    /// The MSR error to answer with #GP, if this is one.
    pub const fn gp(&self) -> Option<MsrError> {
        match *self {
            Error::Gp(e) => Some(e),
            _ => None,
        }
    }
}
