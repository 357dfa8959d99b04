//! The on-disk snapshot: its format ([`format`](mod@format)) and how it is written
//! atomically ([`write`]). Taking one from a paused VM is [`crate::run`]'s; restoring a VM
//! from one is [`crate::restore`]'s.

pub mod format;
pub mod write;

pub use format::{Manifest, Snapshot, SnapshotError};
