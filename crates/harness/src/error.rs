//! What stops an experiment: one variant per kind of failure, each naming what failed.

use vmm::VmmError;

/// Everything that can stop a demo, a bench or a soak.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` is missing (the tests look for these exact first words).
    #[error("SKIPPED: no {path} on this machine: apfvm needs KVM to run its guest")]
    NoKvm {
        /// The device path.
        path: &'static str,
    },
    /// Options that cannot work together (the message names the option).
    #[error("{0}")]
    Config(String),
    /// The VMM failed (booting, snapshotting or restoring a guest).
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A restore ran but failed a check every run must pass (exit status, checksums, scans
    /// done).
    #[error("{0}")]
    Check(String),
    /// A measured point failed: which one, and why.
    #[error("{point}: {cause}")]
    Point {
        /// Mode, latency, guest shape, memory.
        point: String,
        /// What went wrong.
        cause: Box<Error>,
    },
    /// SIGINT or SIGTERM arrived: stopped after the run in progress.
    #[error("interrupted (SIGINT/SIGTERM)")]
    Interrupted,
    /// A file or directory operation failed.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        err: std::io::Error,
    },
    /// An NBD server (`qemu-nbd`, `nbdkit`) could not be started or did not answer.
    #[error("NBD server: {0}")]
    QemuNbd(String),
    /// The plot could not be drawn.
    #[error("--plot: {0}")]
    Plot(String),
}

impl Error {
    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |err| Error::Io { what, err }
    }

    /// The VMM error inside, if this is one (directly or for a point).
    pub fn vmm(&self) -> Option<&VmmError> {
        match self {
            Error::Vmm(e) => Some(e),
            Error::Point { cause, .. } => cause.vmm(),
            _ => None,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fails with the words a missing `/dev/kvm` deserves.
pub fn require_kvm() -> Result<()> {
    if vmm::kvm_available() {
        Ok(())
    } else {
        Err(Error::NoKvm {
            path: vmm::kvm::vm::KVM_PATH,
        })
    }
}
