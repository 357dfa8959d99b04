//! How the VMM hears about faults, arriving pages and failures.
//!
//! Callbacks run **on the pager thread**, in order: keep them cheap (send a signal, push to
//! a queue), never block on a vCPU, and never touch guest memory (the pager thread would
//! fault on a page only it can map).

use std::sync::mpsc;
use std::time::Instant;

use crate::error::PagerError;

/// A thread touched a missing page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultEvent {
    /// Guest-physical address of the page (page aligned).
    pub gpa: u64,
    /// Host address of the page (page aligned).
    pub host_addr: u64,
    /// Thread id (gettid) of the faulting thread: the vCPU's thread when the fault was taken
    /// in its KVM_RUN (with an in-kernel LAPIC and IF = 1, KVM may fault in a kworker
    /// instead: see docs/host.md).
    pub thread_id: u32,
    /// When the pager read the message.
    pub at: Instant,
    /// The fault was a write (KVM's kworker path reports WRITE even for reads).
    pub write: bool,
    /// A fault on this page was already reported and its fetch is in flight: no second
    /// fetch was started (it may be another thread, or the same vCPU again).
    pub duplicate: bool,
}

/// Receives the pager's events.
///
/// For each page reported by `on_fault`, exactly one `on_page_ready` follows once the page
/// is mapped (whatever the number of duplicate faults), unless its fetch fails
/// (`on_error`) or the pager is stopped first. `on_page_ready` is never called before the
/// page's first `on_fault`; a message for a page that is already mapped is not reported.
pub trait PagerObserver: Send + Sync {
    /// A thread faulted on a missing page; its fetch has been started (or joined).
    fn on_fault(&self, event: &FaultEvent) {
        let _ = event;
    }

    /// A page that was reported by `on_fault` is now mapped (UFFDIO_COPY done, or found
    /// already present); threads blocked on it have been woken.
    fn on_page_ready(&self, gpa: u64, at: Instant) {
        let _ = (gpa, at);
    }

    /// A fatal error: a page could not be fetched or mapped. The threads waiting on it stay
    /// blocked; the VMM should stop the VM with this error (it names the guest page).
    fn on_error(&self, error: PagerError) {
        let _ = error;
    }
}

/// Ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl PagerObserver for NoopObserver {}

/// One pager event, as sent by [`ChannelObserver`].
#[derive(Debug)]
pub enum PagerEvent {
    /// See [`PagerObserver::on_fault`].
    Fault(FaultEvent),
    /// See [`PagerObserver::on_page_ready`].
    PageReady {
        /// Guest-physical address of the page.
        gpa: u64,
        /// When it was mapped.
        at: Instant,
    },
    /// See [`PagerObserver::on_error`].
    Error(PagerError),
}

/// Forwards every event into a channel (tests, or a VMM that handles events on its own
/// thread).
#[derive(Debug)]
pub struct ChannelObserver {
    tx: mpsc::Sender<PagerEvent>,
}

impl ChannelObserver {
    /// An observer and the receiving end of its channel.
    pub fn new() -> (Self, mpsc::Receiver<PagerEvent>) {
        let (tx, rx) = mpsc::channel();
        (Self { tx }, rx)
    }
}

impl PagerObserver for ChannelObserver {
    fn on_fault(&self, event: &FaultEvent) {
        let _ = self.tx.send(PagerEvent::Fault(*event));
    }

    fn on_page_ready(&self, gpa: u64, at: Instant) {
        let _ = self.tx.send(PagerEvent::PageReady { gpa, at });
    }

    fn on_error(&self, error: PagerError) {
        let _ = self.tx.send(PagerEvent::Error(error));
    }
}
