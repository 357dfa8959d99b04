//! A page source that counts the bytes read from it: the clones' `source_bytes_fetched`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pager::{PageSource, SourceError};

/// `inner`, counting every byte asked of it (retries included).
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn PageSource>,
    bytes: AtomicU64,
}

impl Counted {
    /// Counts what is read from `inner`.
    pub fn new(inner: Arc<dyn PageSource>) -> Counted {
        Counted {
            inner,
            bytes: AtomicU64::new(0),
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl PageSource for Counted {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn unit_pages(&self) -> u64 {
        self.inner.unit_pages()
    }
    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.fetch(first, buf)
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
