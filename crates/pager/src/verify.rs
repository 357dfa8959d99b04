//! Per-chunk integrity: [`VerifiedSource`] checks every chunk it serves against a recorded
//! CRC-32 (crc32fast: SSE4.2/PCLMUL accelerated) before the pager may map it.
//!
//! The snapshot writer records `chunk_checksums` over the same memory file with the same
//! chunk size; the restore side wraps its source in a `VerifiedSource`. A mismatch is a
//! [`SourceError::ChecksumMismatch`] naming the guest page; the pager retries a failed fetch
//! [`crate::PagerConfig::fetch_retries`] times before reporting it.

use std::io::{self, Read};

use crate::source::{PageSource, SourceError, check_range};
use crate::uffd::{PAGE_SIZE, PAGE_SIZE_U64};

/// CRC-32 (IEEE) of one chunk.
pub fn chunk_checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Checksums of consecutive `chunk_bytes` chunks of `data` (the last chunk may be shorter).
pub fn chunk_checksums(data: &[u8], chunk_bytes: usize) -> Vec<u32> {
    data.chunks(chunk_bytes).map(chunk_checksum).collect()
}

/// Checksums of consecutive `chunk_bytes` chunks read from `reader` until its end.
pub fn chunk_checksums_from_reader(
    mut reader: impl Read,
    chunk_bytes: usize,
) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk_bytes];
    loop {
        let mut filled = 0;
        while filled < chunk_bytes {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(out);
        }
        out.push(chunk_checksum(&buf[..filled]));
        if filled < chunk_bytes {
            return Ok(out);
        }
    }
}

/// A bad [`VerifiedSource`] configuration.
#[derive(Debug, thiserror::Error)]
pub enum VerifyConfigError {
    /// The chunk size is not a power-of-two multiple of the page size.
    #[error("checksum chunk size {0} is not a power of two of at least 4096 bytes")]
    ChunkSize(usize),
    /// The number of checksums does not cover the source.
    #[error(
        "{got} chunk checksums given, {expected} needed for {pages} pages in chunks of {chunk_bytes} bytes"
    )]
    Count {
        /// Checksums given.
        got: usize,
        /// Checksums needed.
        expected: u64,
        /// Pages in the source.
        pages: u64,
        /// Chunk size.
        chunk_bytes: usize,
    },
}

/// Wraps a source and verifies every chunk against its recorded CRC-32. The pager then
/// fetches and maps whole chunks (its unit is the chunk).
#[derive(Debug)]
pub struct VerifiedSource<S> {
    inner: S,
    chunk_pages: u64,
    checksums: Vec<u32>,
}

impl<S: PageSource> VerifiedSource<S> {
    /// `checksums[i]` is the CRC-32 of bytes `[i * chunk_bytes, (i + 1) * chunk_bytes)` of the
    /// source's pages (the last chunk may be shorter).
    pub fn new(
        inner: S,
        chunk_bytes: usize,
        checksums: Vec<u32>,
    ) -> Result<Self, VerifyConfigError> {
        if !chunk_bytes.is_power_of_two() || chunk_bytes < PAGE_SIZE {
            return Err(VerifyConfigError::ChunkSize(chunk_bytes));
        }
        let chunk_pages = (chunk_bytes / PAGE_SIZE) as u64;
        let pages = inner.page_count();
        let expected = pages.div_ceil(chunk_pages);
        if checksums.len() as u64 != expected {
            return Err(VerifyConfigError::Count {
                got: checksums.len(),
                expected,
                pages,
                chunk_bytes,
            });
        }
        Ok(Self {
            inner,
            chunk_pages,
            checksums,
        })
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Verifies chunk `chunk` held in `buf`; `page` is the page the caller wanted (for the
    /// error).
    fn verify(&self, chunk: u64, page: u64, buf: &[u8]) -> Result<(), SourceError> {
        let first_page = chunk * self.chunk_pages;
        let expected = self.checksums[usize::try_from(chunk).expect("chunk index fits usize")];
        let actual = chunk_checksum(buf);
        if actual != expected {
            return Err(SourceError::ChecksumMismatch {
                page,
                chunk,
                first_page,
                pages: (buf.len() / PAGE_SIZE) as u64,
                expected,
                actual,
            });
        }
        Ok(())
    }

    /// Fetches chunk `chunk` (clipped to the source's end) into `buf` and verifies it.
    fn fetch_chunk(&self, chunk: u64, page: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.inner.fetch(chunk * self.chunk_pages, buf)?;
        self.verify(chunk, page, buf)
    }
}

impl<S: PageSource> PageSource for VerifiedSource<S> {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }

    fn unit_pages(&self) -> u64 {
        self.chunk_pages
    }

    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let page_count = self.page_count();
        check_range(first, buf, page_count)?;
        let end = first + (buf.len() / PAGE_SIZE) as u64;
        let mut scratch = Vec::new();
        let mut page = first;
        while page < end {
            let chunk = page / self.chunk_pages;
            let c_first = chunk * self.chunk_pages;
            let c_end = (c_first + self.chunk_pages).min(page_count);
            let c_len = usize::try_from((c_end - c_first) * PAGE_SIZE_U64).expect("chunk fits");
            let off = usize::try_from((page - first) * PAGE_SIZE_U64).expect("fits");
            if c_first == page && c_end <= end {
                // Whole chunks from here: one fetch for all of them (one request, or a few
                // pipelined ones, from a remote source), then verify each.
                let mut run_end = c_end;
                while run_end < end && (run_end + self.chunk_pages).min(page_count) <= end {
                    run_end = (run_end + self.chunk_pages).min(page_count);
                }
                let run_len = usize::try_from((run_end - page) * PAGE_SIZE_U64).expect("fits");
                let run = &mut buf[off..off + run_len];
                self.inner.fetch(page, run)?;
                let chunk_len = usize::try_from(self.chunk_pages * PAGE_SIZE_U64).expect("fits");
                for (i, piece) in run.chunks(chunk_len).enumerate() {
                    let c = chunk + i as u64;
                    self.verify(c, c * self.chunk_pages, piece)?;
                }
                page = run_end;
            } else {
                // Part of a chunk: fetch and verify all of it, hand out the part asked for.
                scratch.resize(c_len, 0);
                self.fetch_chunk(chunk, page, &mut scratch)?;
                let upto = c_end.min(end);
                let from = usize::try_from((page - c_first) * PAGE_SIZE_U64).expect("fits");
                let n = usize::try_from((upto - page) * PAGE_SIZE_U64).expect("fits");
                buf[off..off + n].copy_from_slice(&scratch[from..from + n]);
                page = upto;
            }
        }
        Ok(())
    }

    fn is_fast(&self) -> bool {
        self.inner.is_fast()
    }

    fn cancel(&self) {
        self.inner.cancel();
    }

    fn describe(&self) -> String {
        format!(
            "{} (CRC-32 per {} KiB chunk)",
            self.inner.describe(),
            self.chunk_pages * 4
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VecSource;

    fn data(pages: usize) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| u8::try_from(i * 7 / 13 % 256).unwrap())
            .collect()
    }

    #[test]
    fn verified_source_serves_whole_and_partial_chunks() {
        let d = data(10); // chunks of 4 pages: 4 + 4 + 2
        let sums = chunk_checksums(&d, 4 * PAGE_SIZE);
        assert_eq!(
            sums,
            chunk_checksums_from_reader(&d[..], 4 * PAGE_SIZE).unwrap()
        );
        let v = VerifiedSource::new(VecSource::new(d.clone()), 4 * PAGE_SIZE, sums).unwrap();
        assert_eq!(v.unit_pages(), 4);
        let mut buf = vec![0u8; 4 * PAGE_SIZE];
        v.fetch(4, &mut buf).unwrap();
        assert_eq!(buf, d[4 * PAGE_SIZE..8 * PAGE_SIZE]);
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        v.fetch(3, &mut buf).unwrap();
        assert_eq!(buf, d[3 * PAGE_SIZE..6 * PAGE_SIZE]);
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        v.fetch(8, &mut buf).unwrap();
        assert_eq!(buf, d[8 * PAGE_SIZE..]);
        // Several whole chunks (the last one short) in one fetch, and a head + whole chunks.
        let mut buf = vec![0u8; 10 * PAGE_SIZE];
        v.fetch(0, &mut buf).unwrap();
        assert_eq!(buf, d);
        let mut buf = vec![0u8; 7 * PAGE_SIZE];
        v.fetch(3, &mut buf).unwrap();
        assert_eq!(buf, d[3 * PAGE_SIZE..]);
    }

    #[test]
    fn a_flipped_byte_is_refused_naming_the_page() {
        let d = data(8);
        let sums = chunk_checksums(&d, 4 * PAGE_SIZE);
        let mut bad = d.clone();
        bad[5 * PAGE_SIZE + 17] ^= 1;
        let v = VerifiedSource::new(VecSource::new(bad), 4 * PAGE_SIZE, sums).unwrap();
        let mut two = vec![0u8; 8 * PAGE_SIZE];
        let e = v.fetch(0, &mut two).unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::ChecksumMismatch {
                    page: 4,
                    chunk: 1,
                    ..
                }
            ),
            "{e}"
        );
        let mut buf = vec![0u8; PAGE_SIZE];
        v.fetch(0, &mut buf).unwrap();
        let e = v.fetch(6, &mut buf).unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::ChecksumMismatch {
                    page: 6,
                    chunk: 1,
                    first_page: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("guest page 6 (gpa 0x6000)"), "{e}");
    }

    #[test]
    fn bad_configurations_are_refused() {
        let v = VecSource::new(data(8));
        assert!(VerifiedSource::new(v.clone(), 3000, vec![0; 3]).is_err());
        assert!(VerifiedSource::new(v, 4 * PAGE_SIZE, vec![0; 3]).is_err());
    }
}
