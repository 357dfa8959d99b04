//! The pager's errors.

use crate::source::SourceError;
use crate::uffd::UffdError;

/// What can go wrong in the pager. Errors about a page name the guest page.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// Setting up or reading the userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A page could not be fetched from the source (after the configured retries). Its
    /// faulting threads stay blocked: the VMM must stop the VM.
    #[error("fetching guest memory from {what} failed: {source}{}", faulted_note(.faulted))]
    Fetch {
        /// The source, described.
        what: String,
        /// Guest-physical addresses of the pages that threads faulted on and that now wait
        /// for this fetch (empty for a prefetch).
        faulted: Vec<u64>,
        /// What went wrong, naming the guest page.
        #[source]
        source: SourceError,
    },
    /// UFFDIO_COPY of a fetched page failed (memory unmapped, process exiting...).
    #[error("mapping guest page {page} (gpa {gpa:#x}) failed: {source}")]
    Map {
        /// Guest page.
        page: u64,
        /// Its guest-physical address.
        gpa: u64,
        /// The userfaultfd error.
        #[source]
        source: UffdError,
    },
    /// Writing a fetched unit into the shared page cache (clones) failed.
    #[error("writing guest page {page} (gpa {gpa:#x}) into the shared page cache failed: {source}")]
    CacheWrite {
        /// Guest page.
        page: u64,
        /// Its guest-physical address.
        gpa: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The shared page cache cannot be used.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// A failure of a pager that serves several guests (clones from one shared page cache),
    /// the same one reported to each of them.
    #[error(transparent)]
    Shared(std::sync::Arc<PagerError>),
    /// [`crate::PagerHandle::attach`] on a pager that fills private memory (one guest).
    #[error("this pager serves one guest's private memory; only a shared-cache pager takes clones")]
    NotShared,
    /// The regions given to the pager are unusable.
    #[error("bad guest memory region: {0}")]
    Region(String),
    /// The pager's threads could not be started.
    #[error("starting the pager threads failed: {0}")]
    Spawn(#[source] std::io::Error),
}

impl PagerError {
    /// The guest page this error is about, if any (for a failed fetch: the first page a
    /// thread faulted on).
    pub fn page(&self) -> Option<u64> {
        match self {
            PagerError::Fetch {
                faulted, source, ..
            } => Some(
                faulted
                    .first()
                    .map_or(source.page(), |g| g / crate::uffd::PAGE_SIZE_U64),
            ),
            PagerError::Map { page, .. } | PagerError::CacheWrite { page, .. } => Some(*page),
            PagerError::Shared(e) => e.page(),
            _ => None,
        }
    }
}

fn faulted_note(faulted: &[u64]) -> String {
    match faulted {
        [] => String::new(),
        [one] => format!(" (a thread faulted on gpa {one:#x})"),
        [first, rest @ ..] => format!(
            " (threads faulted on gpa {first:#x} and {} more page(s))",
            rest.len()
        ),
    }
}
