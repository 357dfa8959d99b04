//! Snapshots: the on-disk format ([`format`](mod@format)), taking one from a running VM ([`take`]) and
//! restoring a VM from one (eager or lazy, [`crate::restore`]).

pub mod format;
pub mod take;

pub use format::{Manifest, Snapshot, SnapshotError};
