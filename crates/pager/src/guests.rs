//! The guests one pager serves, each with its own userfaultfd, its regions (its own host
//! addresses, the pager's guest-physical layout) and its observer: the one guest of a
//! private-memory pager, or the clones attached to a shared-cache pager.
//!
//! A guest's userfaultfd stays open as long as the pager runs, also once the guest is
//! detached (see `cache.rs`: a clone's hole touched without it would put a zero page into
//! the cache every clone reads).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

use crate::observer::PagerObserver;
use crate::region::GuestRegion;
use crate::shared::Shared;
use crate::uffd::Uffd;

/// One guest of a pager.
pub(crate) struct Guest {
    pub uffd: Uffd,
    /// Its regions, in the order of the pager's layout (same guest-physical ranges).
    pub regions: Vec<GuestRegion>,
    /// `None` once detached: its faults are still served, nobody is told.
    observer: Arc<ObserverSlot>,
}

/// A guest's observer, until it is detached.
type ObserverSlot = Mutex<Option<Arc<dyn PagerObserver>>>;

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("uffd", &self.uffd)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

impl Guest {
    pub fn new(uffd: Uffd, regions: Vec<GuestRegion>, observer: Arc<dyn PagerObserver>) -> Self {
        Self {
            uffd,
            regions,
            observer: Arc::new(Mutex::new(Some(observer))),
        }
    }

    /// Its observer, unless detached.
    pub fn observer(&self) -> Option<Arc<dyn PagerObserver>> {
        self.observer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The region index and guest-physical address of host address `addr`.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.regions
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.gpa_of_host(addr).map(|g| (i, g)))
    }
}

/// Waits (up to `timeout`, `None`: for ever) until a guest's userfaultfd or the `wake`
/// eventfd is readable: the indices of the guests with messages, and whether `wake` fired.
pub(crate) fn poll_guests(
    guests: &[Arc<Guest>],
    wake: &OwnedFd,
    timeout: Option<Timespec>,
) -> Result<(Vec<usize>, bool), Errno> {
    let mut fds: Vec<PollFd<'_>> = guests
        .iter()
        .map(|g| PollFd::new(&g.uffd, PollFlags::IN))
        .collect();
    fds.push(PollFd::new(wake, PollFlags::IN));
    match poll(&mut fds, timeout.as_ref()) {
        Ok(_) | Err(Errno::INTR) => {}
        Err(errno) => return Err(errno),
    }
    let woken = fds.pop().is_some_and(|f| !f.revents().is_empty());
    let ready = (0..fds.len())
        .filter(|&g| !fds[g].revents().is_empty())
        .collect();
    Ok((ready, woken))
}

/// Checks that `regions` cover the pager's layout, region by region (same guest-physical
/// ranges, in order).
pub(crate) fn same_layout(regions: &[GuestRegion], layout: &[GuestRegion]) -> bool {
    regions.len() == layout.len()
        && regions
            .iter()
            .zip(layout)
            .all(|(r, l)| r.gpa() == l.gpa() && r.len() == l.len())
}

/// A guest attached to a shared-cache pager ([`crate::PagerHandle::attach`]). Detaching it
/// (or dropping this) stops its observer's calls; its faults are still served: its
/// userfaultfd stays registered until the pager stops, and is closed then.
pub struct Attachment {
    observer: Arc<ObserverSlot>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment").finish_non_exhaustive()
    }
}

impl Attachment {
    pub(crate) fn new(guest: &Guest, shared: Arc<Shared>) -> Self {
        Self {
            observer: Arc::clone(&guest.observer),
            shared,
        }
    }

    /// Stops telling this guest's observer anything (its VM has ended).
    pub fn detach(self) {
        drop(self);
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.observer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.shared.wake();
    }
}
