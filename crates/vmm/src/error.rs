//! The library's error type: what stopped `apfvm` before the guest reported an exit status,
//! one variant per kind of failure, each naming what failed.

use std::path::PathBuf;
use std::time::Duration;

use crate::exit::GuestFault;
use crate::loader::LoadError;
use crate::memory::MemoryError;
use crate::snapshot::format::SnapshotError;

/// Everything that can stop `apfvm` before the guest reports an exit status.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("cannot open {path}: {err} (is KVM available and are you allowed to use it?)")]
    NoKvm {
        /// The device path.
        path: PathBuf,
        /// What `open` said.
        err: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {err}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The errno.
        err: kvm_ioctls::Error,
    },
    /// KVM lacks a capability apfvm needs.
    #[error("KVM lacks the capability {0} that apfvm needs")]
    MissingCap(&'static str),
    /// KVM refused part of a vCPU's saved state (a snapshot from another host, or damaged).
    #[error("vCPU {vcpu}: KVM refused {what}")]
    VcpuState {
        /// The vCPU.
        vcpu: u32,
        /// What was refused.
        what: String,
    },
    /// The configuration asked for is invalid (checked before anything runs).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The guest image is unusable.
    #[error("guest image: {0}")]
    Image(#[from] LoadError),
    /// The guest died (triple fault, emulation failure, unexpected exit).
    #[error("{0}")]
    GuestFault(GuestFault),
    /// The guest did not finish in time.
    #[error("the guest did not exit within {after:?}; last console output:\n{console}")]
    Timeout {
        /// The limit.
        after: Duration,
        /// The end of the console output.
        console: String,
    },
    /// A snapshot could not be written or read, or is refused.
    #[error("snapshot: {0}")]
    Snapshot(Box<SnapshotError>),
    /// The snapshot's APF MSR values are refused by the engine (a damaged or foreign
    /// snapshot).
    #[error("the snapshot's APF state is refused: {0}")]
    ApfState(apf_host::Error),
    /// The guest exited before the snapshot that was asked for could be taken.
    #[error("the guest exited (status {status}) before a snapshot was taken for {dir}")]
    ExitedBeforeSnapshot {
        /// The guest's exit status.
        status: u32,
        /// The snapshot directory that was not written.
        dir: PathBuf,
    },
    /// The run was interrupted (SIGINT, SIGTERM): the VM was stopped, a snapshot being
    /// written was removed.
    #[error("interrupted: the VM was stopped and nothing was left behind")]
    Interrupted,
    /// The vCPUs could not all be paused for a snapshot.
    #[error("pausing the vCPUs for a snapshot: {0}")]
    Pause(String),
    /// Guest memory could not be served from its source: the VM was stopped rather than
    /// given wrong memory, or left waiting forever.
    #[error("memory source {source_name}: {reason}")]
    MemorySource {
        /// The source (a file, an NBD export).
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// Lazily served memory failed while the guest ran.
    #[error("lazy memory: {0}: the VM was stopped rather than given wrong memory")]
    Pager(#[from] pager::PagerError),
    /// A working set could not be recorded.
    #[error("working set: {0}")]
    WorkingSet(#[from] crate::working_set::WorkingSetError),
    /// An OS call (threads, signals) failed.
    #[error("{what}: {err}")]
    Os {
        /// Which operation.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
}

impl VmmError {
    /// Wraps a KVM ioctl error with the operation's name.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |err| VmmError::Kvm { what, err }
    }

    /// A failure of the memory source `source_name`.
    pub fn source(source_name: impl Into<String>, reason: impl std::fmt::Display) -> VmmError {
        VmmError::MemorySource {
            source_name: source_name.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<SnapshotError> for VmmError {
    fn from(e: SnapshotError) -> VmmError {
        match e {
            SnapshotError::Interrupted { .. } => VmmError::Interrupted,
            e => VmmError::Snapshot(Box::new(e)),
        }
    }
}

/// Result with [`VmmError`].
pub type Result<T, E = VmmError> = std::result::Result<T, E>;
