//! The on-disk snapshot: its format ([`format`](mod@format), the memory file's regions and
//! checksums in [`memory_file`]) and how it is written
//! atomically ([`write`](mod@write)). Taking one from a paused VM is [`crate::run`](mod@crate::run)'s; restoring a VM
//! from one is [`crate::restore`](mod@crate::restore)'s.

pub mod format;
pub mod memory_file;
pub mod write;

pub use format::{Manifest, Snapshot, SnapshotError};
