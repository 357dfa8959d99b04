//! Where a snapshot's guest memory is read from: its memory file, or an NBD export of it.
//! Either way every chunk is verified against the manifest's checksum before it reaches
//! guest RAM.
//!
//! ```text
//! GuestPages (guest page → file page, by the manifest's regions; errors name guest pages)
//!   └─ VerifiedSource (file chunks against memory.crc32)
//!        └─ FileSource (memory.raw) | NbdSource (an export of memory.raw)
//! ```

use std::sync::Arc;
use std::time::Duration;

use pager::{
    FileSource, NbdSource, NbdSourceConfig, NbdUrl, PAGE_SIZE, PageSource, PagerConfig,
    SourceError, VerifiedSource,
};

use crate::error::{Result, VmmError};
use crate::snapshot::format::Snapshot;
use crate::snapshot::memory_file::MemoryInfo;

/// Where guest memory comes from (`restore --memory-source`, `--source-deadline`).
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// An NBD export of the snapshot's memory file; `None`: the snapshot's own memory file.
    pub nbd: Option<NbdUrl>,
    /// A server unreachable this long ends the VM with an error.
    pub deadline: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            nbd: None,
            deadline: Duration::from_secs(10),
        }
    }
}

/// The snapshot's memory as a page source, every chunk verified against the manifest: its
/// memory file, or the NBD export `opts.nbd` (whose size must be the snapshot's memory size).
pub fn open(snapshot: &Snapshot, opts: &SourceOptions) -> Result<Arc<dyn PageSource>> {
    let m = &snapshot.manifest.memory;
    let chunk = usize::try_from(m.chunk_size).unwrap_or(0);
    let inner: Box<dyn PageSource> = match &opts.nbd {
        None => {
            let path = snapshot.memory_path();
            Box::new(
                FileSource::open(&path)
                    .map_err(|e| VmmError::source(path.display().to_string(), e))?,
            )
        }
        Some(url) => {
            let mut cfg = NbdSourceConfig {
                deadline: opts.deadline,
                max_connections: PagerConfig::DEFAULT_FETCH_THREADS,
                ..NbdSourceConfig::default()
            };
            // A server that stops answering counts as gone after this long (then reconnects).
            cfg.client.io_timeout =
                Some((opts.deadline / 2).clamp(Duration::from_millis(100), Duration::from_secs(2)));
            let nbd = NbdSource::connect(url.clone(), cfg)
                .map_err(|e| VmmError::source(url.to_string(), e))?;
            if nbd.size() != m.size {
                return Err(VmmError::source(
                    url.to_string(),
                    format!(
                        "the export has {} bytes, the snapshot's memory {} (another file is served?)",
                        nbd.size(),
                        m.size
                    ),
                ));
            }
            Box::new(nbd)
        }
    };
    let name = inner.describe();
    let verified = VerifiedSource::new(inner, chunk, m.crc32.clone())
        .map_err(|e| VmmError::source(name, e))?;
    Ok(Arc::new(GuestPages::new(verified, m.clone())))
}

const PAGE: u64 = PAGE_SIZE as u64;

/// A source indexed by file page (the memory file, its export) served by guest page: guest
/// page `p` is read at [`MemoryInfo::file_offset`] of `p * 4096`. Pages outside the RAM
/// regions (the MMIO hole, past the end) are out of range.
#[derive(Debug)]
pub struct GuestPages<S> {
    inner: S,
    memory: MemoryInfo,
}

impl<S: PageSource> GuestPages<S> {
    /// Serves `inner` (indexed by file page) through the regions of `memory`.
    pub fn new(inner: S, memory: MemoryInfo) -> GuestPages<S> {
        GuestPages { inner, memory }
    }

    /// `e` from the inner source, with its file pages named as guest pages.
    fn guest_error(&self, mut e: SourceError) -> SourceError {
        let to_guest = |page: &mut u64| {
            if let Some(gpa) = self.memory.gpa_at(*page * PAGE) {
                *page = gpa / PAGE;
            }
        };
        match &mut e {
            SourceError::ChecksumMismatch {
                page, first_page, ..
            } => {
                to_guest(page);
                to_guest(first_page);
            }
            SourceError::Io { page, .. }
            | SourceError::ShortRead { page, .. }
            | SourceError::OutOfRange { page, .. }
            | SourceError::Other { page, .. } => to_guest(page),
        }
        e
    }
}

impl<S: PageSource> PageSource for GuestPages<S> {
    /// One past the last guest page of RAM.
    fn page_count(&self) -> u64 {
        let end = self.memory.regions.iter().map(|r| r.gpa + r.size).max();
        end.unwrap_or(0) / PAGE
    }

    fn unit_pages(&self) -> u64 {
        self.inner.unit_pages()
    }

    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        // Region by region: a read never crosses a region's end in the file.
        let mut page = first;
        let mut rest = buf;
        while !rest.is_empty() {
            let gpa = page * PAGE;
            let region = self
                .memory
                .regions
                .iter()
                .find(|r| gpa >= r.gpa && gpa < r.gpa + r.size);
            let Some(r) = region else {
                return Err(SourceError::OutOfRange {
                    page,
                    page_count: self.page_count(),
                });
            };
            let n = usize::try_from((r.gpa + r.size - gpa).min(rest.len() as u64)).unwrap_or(0);
            let (piece, tail) = rest.split_at_mut(n);
            let offset = self.memory.file_offset(gpa, n as u64).unwrap_or(gpa);
            self.inner
                .fetch(offset / PAGE, piece)
                .map_err(|e| self.guest_error(e))?;
            page += n as u64 / PAGE;
            rest = tail;
        }
        Ok(())
    }

    fn is_fast(&self) -> bool {
        self.inner.is_fast()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn cancel(&self) {
        self.inner.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;
    use crate::snapshot::memory_file::{MemoryRegion, regions_of};
    use pager::{VecSource, chunk_checksums};

    /// A 3 GiB + 2 MiB guest's file: region 1 (gpa 4 GiB) starts at file offset 3 GiB. Only
    /// the pages around the boundary are backed by data here: a sparse `VecSource` is not
    /// possible, so the test serves a small file whose regions are scaled down with the
    /// same shape (region 0 of 2 chunks, the hole, region 1 of 2 chunks).
    #[test]
    fn guest_pages_read_their_region_of_the_file_and_errors_name_guest_pages() {
        const CHUNK: usize = 4 * PAGE_SIZE;
        let data: Vec<u8> = (0..4 * CHUNK)
            .map(|i| u8::try_from(i / PAGE_SIZE).unwrap())
            .collect();
        let mut sums = chunk_checksums(&data, CHUNK);
        let memory = MemoryInfo {
            file: "memory.raw".into(),
            size: data.len() as u64,
            chunk_size: CHUNK as u64,
            regions: vec![
                MemoryRegion {
                    gpa: 0,
                    size: 2 * CHUNK as u64,
                    file_offset: 0,
                },
                MemoryRegion {
                    gpa: 0x10_0000,
                    size: 2 * CHUNK as u64,
                    file_offset: 2 * CHUNK as u64,
                },
            ],
            crc32: sums.clone(),
        };
        let src = |sums: Vec<u32>| {
            let v = VerifiedSource::new(VecSource::new(data.clone()), CHUNK, sums).unwrap();
            GuestPages::new(v, memory.clone())
        };
        let s = src(sums.clone());
        assert_eq!(s.page_count(), 0x100 + 8);
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        s.fetch(0x100 + 1, &mut buf).unwrap();
        assert_eq!((buf[0], buf[PAGE_SIZE]), (9, 10), "file pages 9 and 10");
        s.fetch(7, &mut buf[..PAGE_SIZE]).unwrap();
        assert_eq!(buf[0], 7);
        let e = s.fetch(8, &mut buf[..PAGE_SIZE]).unwrap_err();
        assert!(matches!(e, SourceError::OutOfRange { page: 8, .. }), "{e}");
        assert!(s.fetch(0x100 + 8, &mut buf[..PAGE_SIZE]).is_err());
        // A bad chunk of region 1 is reported at its guest page, with the file's chunk index.
        sums[3] ^= 1;
        let e = src(sums)
            .fetch(0x100 + 5, &mut buf[..PAGE_SIZE])
            .unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::ChecksumMismatch {
                    page: 0x105,
                    chunk: 3,
                    first_page: 0x104,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("gpa 0x105000"), "{e}");
        // The real layout maps the same way.
        let big = regions_of(&layout::ram_regions(4 << 30));
        assert_eq!(big[1].file_offset, 3 << 30);
    }
}
