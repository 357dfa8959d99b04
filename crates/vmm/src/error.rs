//! The library's error type.

use std::path::PathBuf;

use crate::exit::GuestFault;
use crate::loader::LoadError;

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
    /// The requested configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// `apfvm demo` / `apfvm bench`: a run failed or was inconsistent, or no KVM (the
    /// message says which).
    #[error("{0}")]
    Bench(String),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest image is unusable.
    #[error("guest image: {0}")]
    Image(LoadError),
    /// The guest died (triple fault, emulation failure, unexpected exit).
    #[error("{0}")]
    GuestFault(GuestFault),
    /// The guest did not finish in time.
    #[error("the guest did not exit within {after:?}; last console output:\n{console}")]
    Timeout {
        /// The limit.
        after: std::time::Duration,
        /// The end of the console output.
        console: String,
    },
    /// A snapshot could not be written, or is refused.
    #[error("snapshot: {0}")]
    Snapshot(Box<crate::snapshot::SnapshotError>),
    /// Lazy guest memory failed (a page could not be fetched or verified): the VM is stopped
    /// rather than given wrong memory.
    #[error("lazy memory: {0}")]
    Pager(String),
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
}

impl From<LoadError> for VmmError {
    fn from(e: LoadError) -> VmmError {
        VmmError::Image(e)
    }
}

/// Result with [`VmmError`].
pub type Result<T, E = VmmError> = std::result::Result<T, E>;
