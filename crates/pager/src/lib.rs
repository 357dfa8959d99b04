//! Demand paging of guest memory with userfaultfd.
//!
//! Guest RAM is registered with a userfaultfd in MISSING mode (kernel-mode faults included,
//! so faults KVM takes for a vCPU are seen, each naming the faulting thread). The [`Pager`]
//! reads fault messages on its own thread, starts a fetch of the page from a [`PageSource`]
//! (several in flight, each optionally delayed by a [`FetchLatency`]), and maps it with
//! UFFDIO_COPY when it arrives. It tells the VMM through a [`PagerObserver`]: `on_fault`
//! (kick that vCPU, maybe inject an APF), `on_page_ready` (tokens on that page become ready),
//! `on_error` (stop the VM). It knows nothing of KVM.
//!
//! Clones of one snapshot: [`Pager::start_shared`] fills a [`PageCache`] (a memfd) that
//! each clone maps copy-on-write; [`PagerHandle::attach`] adds a clone (its own
//! userfaultfd, its own observer); every chunk is fetched once, whichever clone faults on it
//! first, and the clones waiting on it are woken once it is in the cache (see [`cache`]).
//!
//! All `unsafe` code lives in [`uffd`] (plus the contract of [`GuestRegion::new`]).
//!
//! # Wiring it into a VMM
//! - Map guest RAM private anonymous (or shmem), **untouched**, and build a [`GuestRegion`]
//!   per range before any vCPU runs; [`Pager::start`] registers them. Pages the VMM writes
//!   afterwards are faulted in through the pager like any other access.
//! - Each vCPU thread records [`current_thread_id`]; `on_fault` finds the vCPU by
//!   [`FaultEvent::thread_id`]. With an in-kernel LAPIC and guest IF = 1, KVM faults in a
//!   kworker and the id is not a vCPU's (docs/host.md, "the trap"): disable HLT exits'
//!   in-kernel handling or use no in-kernel irqchip.
//! - Callbacks run on the pager thread: signal, queue, return. Never touch guest memory or
//!   wait for a vCPU there.
//! - A kicked vCPU may find its page already mapped ([`PagerHandle::is_resident`]): then
//!   re-enter instead of injecting an APF (its `on_page_ready` was already delivered).
//! - `on_page_ready` follows `on_fault` exactly once per faulted page; a message for a page
//!   already mapped is not reported.
//! - `on_error`: stop the VM with the error (it names the guest page). The page stays
//!   missing; vCPUs blocked on it leave `KVM_RUN` with EINTR when kicked. Stop the pager
//!   only after the vCPUs: closing the userfaultfd turns missing pages into zero pages.

pub mod cache;
pub mod nbd;
pub mod uffd;

mod deadline;
mod error;
mod fault_loop;
mod fetch;
mod fill;
mod guests;
mod latency;
mod observer;
mod pager;
mod prefetch;
mod region;
mod shared;
mod source;
mod stats;
mod verify;
mod working_set;

pub use cache::{CacheError, PageCache};
pub use error::PagerError;
pub use guests::Attachment;
pub use latency::{FetchLatency, LatencySampler, ParseLatencyError};
pub use nbd::{NbdSource, NbdSourceConfig, NbdUrl};
pub use observer::{ChannelObserver, FaultEvent, NoopObserver, PagerEvent, PagerObserver};
pub use pager::{Pager, PagerConfig, PagerHandle};
pub use prefetch::{ParsePrefetchError, Prefetch};
pub use region::GuestRegion;
pub use source::{FileSource, PageSource, SourceError, VecSource, ZeroSource};
pub use stats::{Latency, LatencySummary, PagerStats};
pub use uffd::{AnonMapping, PAGE_SIZE, Uffd, UffdError, current_thread_id};
pub use verify::{
    VerifiedSource, VerifyConfigError, chunk_checksum, chunk_checksums, chunk_checksums_from_reader,
};
pub use working_set::WORKING_SET_DEPTH;
