//! How a fetched unit reaches guest memory: copied into the one guest's private memory
//! (`UFFDIO_COPY`, which also wakes its waiters), or written once into the shared page
//! cache and every clone that faulted on it woken (`UFFDIO_WAKE`: the retried access maps
//! the cache's page, shared until the clone writes it).

use std::sync::Arc;

use crate::cache::PageCache;
use crate::error::PagerError;
use crate::guests::Guest;
use crate::uffd::{CopyOutcome, PAGE_SIZE, PAGE_SIZE_U64};

/// The fill strategy of a pager.
#[derive(Debug)]
pub(crate) enum Fill {
    /// `UFFDIO_COPY` into the memory of the pager's only guest.
    Copy,
    /// Write into the shared cache, then wake the guests that faulted on the unit.
    Cache(Arc<PageCache>),
}

/// What mapping one unit took.
#[derive(Debug, Default)]
pub(crate) struct Mapped {
    /// Pages filled (copied, or written into the cache).
    pub pages: u64,
    /// Pages found present already (EEXIST: someone else resolved them).
    pub existed: u64,
    /// `UFFDIO_COPY` calls, or cache writes.
    pub calls: u64,
}

impl Fill {
    /// Fills the unit of `buf.len()` bytes at guest page `first` of layout region `region`
    /// and wakes its waiters: those of `faulted` (guest indices, possibly repeated) in
    /// cache mode; `UFFDIO_COPY` wakes the only guest's itself.
    pub fn map(
        &self,
        guests: &[Arc<Guest>],
        region: usize,
        first: u64,
        buf: &[u8],
        faulted: impl Iterator<Item = usize>,
    ) -> Result<Mapped, PagerError> {
        match self {
            Fill::Copy => copy(&guests[0], region, first, buf),
            Fill::Cache(cache) => {
                let gpa = first * PAGE_SIZE_U64;
                cache
                    .write_at(gpa, buf)
                    .map_err(|source| PagerError::CacheWrite {
                        page: first,
                        gpa,
                        source,
                    })?;
                let mut woken = Vec::new();
                for g in faulted {
                    if woken.contains(&g) {
                        continue;
                    }
                    woken.push(g);
                    let guest = &guests[g];
                    let host = guest.regions[region].host_of_page(first);
                    if let Err(e) = guest.uffd.wake(host, buf.len()) {
                        tracing::warn!(error = %e, guest = g, "pager: waking a clone failed");
                    }
                }
                Ok(Mapped {
                    pages: (buf.len() / PAGE_SIZE) as u64,
                    existed: 0,
                    calls: 1,
                })
            }
        }
    }
}

/// `UFFDIO_COPY` of the unit into `guest`'s memory, skipping pages already present.
fn copy(guest: &Guest, region: usize, first: u64, buf: &[u8]) -> Result<Mapped, PagerError> {
    let host = guest.regions[region].host_of_page(first);
    let mut m = Mapped::default();
    let mut off = 0;
    while off < buf.len() {
        m.calls += 1;
        match guest.uffd.copy(host + off, &buf[off..]) {
            Ok(CopyOutcome::Copied) => {
                m.pages += ((buf.len() - off) / PAGE_SIZE) as u64;
                off = buf.len();
            }
            Ok(CopyOutcome::Partial(n)) => {
                m.pages += (n / PAGE_SIZE) as u64;
                off += n;
            }
            Ok(CopyOutcome::Exists) => {
                // Already present: wake anyone who raced with whoever mapped it.
                m.existed += 1;
                let _ = guest.uffd.wake(host + off, PAGE_SIZE);
                off += PAGE_SIZE;
            }
            Err(e) => {
                let page = first + (off / PAGE_SIZE) as u64;
                return Err(PagerError::Map {
                    page,
                    gpa: page * PAGE_SIZE_U64,
                    source: e,
                });
            }
        }
    }
    Ok(m)
}
