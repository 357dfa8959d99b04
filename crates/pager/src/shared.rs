//! What the pager thread, its fetch threads and the handles share.

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{PollFd, PollFlags, poll};

use std::sync::Arc;

use crate::guests::Guest;
use crate::region::{GuestRegion, ResidentMap};
use crate::stats::Stats;
use crate::uffd::PAGE_SIZE_U64;

/// State shared between the pager thread, its fetch threads and handles.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The guest-physical layout served (in a private-memory pager, the guest's regions).
    pub regions: Vec<GuestRegion>,
    /// A shared-cache pager: guests may attach.
    pub takes_clones: bool,
    /// Guests attached and not yet taken in by the fault loop.
    pub attached: Mutex<Vec<Arc<Guest>>>,
    pub resident: ResidentMap,
    pub stats: Stats,
    pub stop: AtomicBool,
    pub wake: OwnedFd,
    pub requests: Mutex<Vec<u64>>,
}

impl Shared {
    pub fn wake(&self) {
        // A full counter (EAGAIN) is still a pending wake-up.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Blocks until the pager is told to stop.
    pub fn wait_for_stop(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(&self.wake, PollFlags::IN)];
            let _ = poll(&mut fds, None);
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&self.wake, &mut b);
        }
    }

    pub fn region_of_gpa(&self, gpa: u64) -> Option<(usize, &GuestRegion)> {
        let page = gpa / PAGE_SIZE_U64;
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains_page(page))
    }

    pub fn is_resident(&self, gpa: u64) -> bool {
        match self.region_of_gpa(gpa) {
            Some((i, r)) => self.resident.get(i, r, gpa / PAGE_SIZE_U64),
            None => true,
        }
    }
}
