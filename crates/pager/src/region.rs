//! Guest memory regions served by the pager, and which of their pages are present.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::PagerError;
use crate::uffd::{PAGE_SIZE, PAGE_SIZE_U64};

/// A range of guest-physical memory backed by a host mapping that the pager fills on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    gpa: u64,
    host: usize,
    len: usize,
}

impl GuestRegion {
    /// Guest-physical `[gpa, gpa + len)` is backed by host memory at `host`.
    ///
    /// # Safety
    /// `[host, host + len)` must be a private anonymous (or shmem) mapping of this process
    /// that stays mapped while a [`crate::Pager`] serving it runs, and nothing in the
    /// program may rely on the contents of its not-yet-present pages: the pager fills them
    /// with whatever the source holds (treat the range as guest memory, never as typed Rust
    /// values). Neither the pager's observer nor anything it waits on may touch the range
    /// (the pager thread would fault on itself).
    pub unsafe fn new(gpa: u64, host: *mut u8, len: usize) -> Self {
        Self {
            gpa,
            host: host as usize,
            len,
        }
    }

    /// Guest-physical `[gpa, gpa + len)` with no host memory: the layout of a shared-cache
    /// pager, whose pages go to a file and whose guests bring their own regions. Never
    /// addressed.
    pub(crate) fn layout(gpa: u64, len: usize) -> Self {
        Self { gpa, host: 0, len }
    }

    /// Guest-physical start.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Host start address.
    pub fn host_addr(&self) -> usize {
        self.host
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region (refused by the pager).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// First guest page.
    pub(crate) fn first_page(&self) -> u64 {
        self.gpa / PAGE_SIZE_U64
    }

    /// One past the last guest page.
    pub(crate) fn end_page(&self) -> u64 {
        self.first_page() + (self.len / PAGE_SIZE) as u64
    }

    /// The guest-physical address of host address `addr`, if inside.
    pub(crate) fn gpa_of_host(&self, addr: u64) -> Option<u64> {
        let host = self.host as u64;
        (addr >= host && addr < host + self.len as u64).then(|| self.gpa + (addr - host))
    }

    /// The host address of guest page `page` (which must be inside).
    pub(crate) fn host_of_page(&self, page: u64) -> usize {
        let off = usize::try_from(page * PAGE_SIZE_U64 - self.gpa).expect("page inside region");
        self.host + off
    }

    /// The aligned unit of `unit_pages` holding `page`, clipped to this region and to a
    /// source of `page_count` pages: `(first page, pages)`.
    pub(crate) fn unit_of(&self, unit_pages: u64, page_count: u64, page: u64) -> (u64, u64) {
        let start = page / unit_pages * unit_pages;
        let first = start.max(self.first_page());
        let end = (start + unit_pages)
            .min(self.end_page())
            .min(page_count.max(page + 1));
        (first, end - first)
    }

    pub(crate) fn contains_page(&self, page: u64) -> bool {
        page >= self.first_page() && page < self.end_page()
    }
}

/// Checks alignment and overlap of the regions.
pub(crate) fn validate(regions: &[GuestRegion]) -> Result<(), PagerError> {
    if regions.is_empty() {
        return Err(PagerError::Region("no region given".into()));
    }
    for r in regions {
        if r.len == 0
            || r.len % PAGE_SIZE != 0
            || r.host % PAGE_SIZE != 0
            || r.gpa % PAGE_SIZE_U64 != 0
        {
            return Err(PagerError::Region(format!(
                "gpa {:#x} host {:#x} len {:#x}: empty or not page aligned",
                r.gpa, r.host, r.len
            )));
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let gpa_overlap = a.first_page() < b.end_page() && b.first_page() < a.end_page();
            // A layout (host 0: a shared-cache pager's) has no host memory to overlap.
            let host_overlap =
                a.host != 0 && b.host != 0 && a.host < b.host + b.len && b.host < a.host + a.len;
            if gpa_overlap || host_overlap {
                return Err(PagerError::Region(format!(
                    "regions at gpa {:#x} and {:#x} overlap",
                    a.gpa, b.gpa
                )));
            }
        }
    }
    Ok(())
}

/// One bit per page of each region: set once the page is mapped. Read by any thread.
#[derive(Debug)]
pub(crate) struct ResidentMap {
    bits: Vec<Vec<AtomicU64>>,
}

impl ResidentMap {
    pub fn new(regions: &[GuestRegion]) -> Self {
        let bits = regions
            .iter()
            .map(|r| {
                let pages = r.len / PAGE_SIZE;
                (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
            })
            .collect();
        Self { bits }
    }

    fn slot(&self, region: usize, r: &GuestRegion, page: u64) -> (&AtomicU64, u64) {
        let i = usize::try_from(page - r.first_page()).expect("page index fits");
        (&self.bits[region][i / 64], 1 << (i % 64))
    }

    pub fn get(&self, region: usize, r: &GuestRegion, page: u64) -> bool {
        let (w, m) = self.slot(region, r, page);
        w.load(Ordering::Acquire) & m != 0
    }

    pub fn set(&self, region: usize, r: &GuestRegion, page: u64) {
        let (w, m) = self.slot(region, r, page);
        w.fetch_or(m, Ordering::Release);
    }

    /// Pages set in `region`.
    pub fn count(&self, region: usize) -> u64 {
        self.bits[region]
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}
