//! What the pager thread, its fetch threads and the handles share.

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use crate::region::{GuestRegion, ResidentMap};
use crate::stats::Stats;
use crate::uffd::PAGE_SIZE_U64;

/// State shared between the pager thread, its fetch threads and handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub regions: Vec<GuestRegion>,
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
