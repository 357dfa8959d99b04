//! Where pages come from: the [`PageSource`] trait and the local implementations.
//!
//! A source is indexed by **guest page number** (`gpa / 4096`). The pager fetches in units
//! of [`PageSource::unit_pages`] aligned pages, from several fetch threads at once, so a
//! remote source ([`crate::nbd::NbdSource`]) can keep several requests in flight; a source
//! verified per chunk ([`crate::VerifiedSource`]) makes its chunk the unit.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::uffd::{PAGE_SIZE, PAGE_SIZE_U64};

/// Why a page could not be fetched. Every variant names the guest page.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source's read failed.
    #[error("guest page {page} (gpa {:#x}): I/O error reading {what}: {source}", .page * PAGE_SIZE_U64)]
    Io {
        /// First guest page of the failed read.
        page: u64,
        /// What was read (a path, a URL).
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The source ended before the page did.
    #[error(
        "guest page {page} (gpa {:#x}): short read from {what}: got {got} of {expected} bytes \
         (truncated memory file?)", .page * PAGE_SIZE_U64
    )]
    ShortRead {
        /// The first guest page missing data.
        page: u64,
        /// What was read.
        what: String,
        /// Bytes read.
        got: usize,
        /// Bytes asked for.
        expected: usize,
    },
    /// The page lies beyond the end of the source.
    #[error("guest page {page} (gpa {:#x}) is beyond the end of the memory source ({page_count} pages)", .page * PAGE_SIZE_U64)]
    OutOfRange {
        /// The page asked for.
        page: u64,
        /// Pages in the source.
        page_count: u64,
    },
    /// A chunk's contents do not match the checksum recorded for it.
    #[error(
        "guest page {page} (gpa {:#x}): chunk {chunk} (pages {first_page}..{}) fails its \
         checksum: expected {expected:#010x}, got {actual:#010x}",
        .page * PAGE_SIZE_U64, .first_page + .pages
    )]
    ChecksumMismatch {
        /// The guest page the fetch was for.
        page: u64,
        /// Chunk number.
        chunk: u64,
        /// First page of the chunk.
        first_page: u64,
        /// Pages in the chunk.
        pages: u64,
        /// Recorded checksum.
        expected: u32,
        /// Checksum of what was read.
        actual: u32,
    },
    /// Any other failure of a source (remote sources: connection lost past the deadline...).
    #[error("guest page {page} (gpa {:#x}): {message}", .page * PAGE_SIZE_U64)]
    Other {
        /// The guest page.
        page: u64,
        /// What happened.
        message: String,
    },
}

impl SourceError {
    /// The guest page this error is about.
    pub fn page(&self) -> u64 {
        match self {
            SourceError::Io { page, .. }
            | SourceError::ShortRead { page, .. }
            | SourceError::OutOfRange { page, .. }
            | SourceError::ChecksumMismatch { page, .. }
            | SourceError::Other { page, .. } => *page,
        }
    }

    /// The guest-physical address of [`SourceError::page`].
    pub fn gpa(&self) -> u64 {
        self.page() * PAGE_SIZE_U64
    }
}

/// A store of guest pages, indexed by guest page number (`gpa / 4096`).
///
/// `fetch` is called from the pager's fetch threads, several at once; it may block (disk,
/// network), but never on anything a vCPU holds.
pub trait PageSource: Send + Sync + fmt::Debug {
    /// Number of guest pages the source holds.
    fn page_count(&self) -> u64;

    /// The pager fetches aligned units of this many pages (a power of two, at least 1): a
    /// fault on page `p` fetches the unit that contains `p` and maps all of it at once.
    fn unit_pages(&self) -> u64 {
        1
    }

    /// Fills `buf` (a whole number of pages) with the pages starting at guest page `first`.
    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// True when a fetch completes in microseconds without waiting on a network (memory,
    /// a local file): the pager may then fetch on its own thread (see
    /// [`crate::PagerConfig::fetch_threads`]). Remote sources keep the default, false.
    fn is_fast(&self) -> bool {
        false
    }

    /// A short description for logs and errors (a path, a URL).
    fn describe(&self) -> String;

    /// The pager is stopping: a fetch waiting for something that may never come (a remote
    /// server to come back) should give up now. Local sources ignore it.
    fn cancel(&self) {}
}

impl<S: PageSource + ?Sized> PageSource for Arc<S> {
    fn page_count(&self) -> u64 {
        (**self).page_count()
    }
    fn unit_pages(&self) -> u64 {
        (**self).unit_pages()
    }
    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).fetch(first, buf)
    }
    fn is_fast(&self) -> bool {
        (**self).is_fast()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn cancel(&self) {
        (**self).cancel();
    }
}

impl<S: PageSource + ?Sized> PageSource for Box<S> {
    fn page_count(&self) -> u64 {
        (**self).page_count()
    }
    fn unit_pages(&self) -> u64 {
        (**self).unit_pages()
    }
    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).fetch(first, buf)
    }
    fn is_fast(&self) -> bool {
        (**self).is_fast()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn cancel(&self) {
        (**self).cancel();
    }
}

/// Checks that `[first, first + pages(buf))` lies inside a source of `page_count` pages.
pub(crate) fn check_range(first: u64, buf: &[u8], page_count: u64) -> Result<(), SourceError> {
    assert!(
        buf.len().is_multiple_of(PAGE_SIZE),
        "fetch buffer must be a whole number of pages"
    );
    let pages = (buf.len() / PAGE_SIZE) as u64;
    if first.saturating_add(pages) > page_count {
        return Err(SourceError::OutOfRange {
            page: first.max(page_count),
            page_count,
        });
    }
    Ok(())
}

/// A memory file of the guest's RAM: guest page `i` is at file offset `i * 4096`.
/// Reads with pread, so several fetch threads share one file.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    page_count: u64,
}

impl FileSource {
    /// Opens `path` read-only. A trailing partial page is not served.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Self::from_file(file, path)
    }

    /// Wraps an open file; `path` is only used in messages.
    pub fn from_file(file: File, path: impl Into<PathBuf>) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            path: path.into(),
            page_count: len / PAGE_SIZE_U64,
        })
    }
}

impl PageSource for FileSource {
    fn page_count(&self) -> u64 {
        self.page_count
    }

    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        // Bounds against the file as opened; a file truncated since then is a short read.
        check_range(first, buf, self.page_count)?;
        let base = first * PAGE_SIZE_U64;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], base + done as u64) {
                Ok(0) => {
                    return Err(SourceError::ShortRead {
                        page: first + (done / PAGE_SIZE) as u64,
                        what: self.path.display().to_string(),
                        got: done,
                        expected: buf.len(),
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SourceError::Io {
                        page: first + (done / PAGE_SIZE) as u64,
                        what: self.path.display().to_string(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn is_fast(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// Guest memory held in a byte vector (tests, benches, an in-memory snapshot).
#[derive(Clone)]
pub struct VecSource {
    data: Arc<[u8]>,
}

impl VecSource {
    /// Serves `data` (a whole number of pages; a trailing partial page is not served).
    pub fn new(data: impl Into<Arc<[u8]>>) -> Self {
        Self { data: data.into() }
    }

    /// The bytes served.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl fmt::Debug for VecSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VecSource")
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl PageSource for VecSource {
    fn page_count(&self) -> u64 {
        (self.data.len() / PAGE_SIZE) as u64
    }

    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(first, buf, self.page_count())?;
        let start = usize::try_from(first).expect("in range") * PAGE_SIZE;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }

    fn is_fast(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("memory ({} bytes)", self.data.len())
    }
}

/// Serves zero pages (tests, benches).
#[derive(Debug, Clone, Copy)]
pub struct ZeroSource {
    /// Number of pages served.
    pub pages: u64,
}

impl PageSource for ZeroSource {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(first, buf, self.pages)?;
        buf.fill(0);
        Ok(())
    }

    fn is_fast(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("zeros ({} pages)", self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_source_reads_pages_and_names_the_page_on_short_read() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 3 * PAGE_SIZE];
        for (i, b) in data.iter_mut().enumerate() {
            *b = u8::try_from(i / PAGE_SIZE).unwrap() + 1;
        }
        f.write_all(&data).unwrap();
        let src = FileSource::open(f.path()).unwrap();
        assert_eq!(src.page_count(), 3);
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        src.fetch(1, &mut buf).unwrap();
        assert_eq!(buf[0], 2);
        assert_eq!(buf[PAGE_SIZE], 3);

        let e = src.fetch(3, &mut buf[..PAGE_SIZE]).unwrap_err();
        assert_eq!(e.page(), 3);
        assert!(e.to_string().contains("guest page 3"), "{e}");

        // Truncated after open: a short read naming the first missing page.
        f.as_file().set_len(PAGE_SIZE as u64 + 100).unwrap();
        let e = src.fetch(1, &mut buf).unwrap_err();
        assert!(matches!(e, SourceError::ShortRead { page: 1, .. }), "{e}");
        assert!(e.to_string().contains("gpa 0x1000"), "{e}");
    }

    #[test]
    fn vec_and_zero_sources() {
        let v = VecSource::new(vec![7u8; 2 * PAGE_SIZE]);
        let mut buf = vec![0u8; PAGE_SIZE];
        v.fetch(1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert!(v.fetch(2, &mut buf).is_err());
        let z = ZeroSource { pages: 1 };
        z.fetch(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
