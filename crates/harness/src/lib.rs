//! apfvm's experiments, as a library the `apfvm` binary drives (the VMM itself is the `vmm`
//! crate; nothing here touches KVM but through it):
//!
//! - [`demo`]: one guest, one fetch latency, every restore mode side by side, one table.
//! - [`bench`](mod@bench): the sweep (latency × tasks per vCPU × vCPUs × modes × memory), its JSON,
//!   table and plot; and what the demo shares with it: the guest, its snapshots, one
//!   measured restore with its window observer, medians, consistency checks.
//! - [`soak`]: random restores over and over, every run checked, the counts and a verdict.
//! - [`clones`]: N clones sharing one page cache against one restore: source bytes, host
//!   memory, wall time, the targets.
//! - [`qemu_nbd`]: `qemu-nbd` serving a snapshot's memory (the one copy of its command line).
//! - [`interrupt`]: SIGINT/SIGTERM as a flag; [`host`]: the machine and the time, for the
//!   JSON; [`progress`]: the progress bar.
//!
//! The experiments compute; they write no file: the results (and the plot) are returned for
//! the caller to write where it was asked to.

pub mod bench;
pub mod clones;
pub mod demo;
pub mod error;
pub mod host;
pub mod interrupt;
pub mod progress;
pub mod qemu_nbd;
pub mod soak;

pub use error::{Error, Result, require_kvm};
