//! The on-disk snapshot: its format ([`format`](mod@format)) and how it is written
//! atomically ([`write`](mod@write)). Taking one from a paused VM is [`crate::run`](mod@crate::run)'s; restoring a VM
//! from one is [`crate::restore`](mod@crate::restore)'s.

pub mod format;
pub mod write;

pub use format::{Manifest, Snapshot, SnapshotError};
