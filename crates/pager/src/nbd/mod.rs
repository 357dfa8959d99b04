//! Guest memory from an NBD server (e.g. `qemu-nbd` exporting a snapshot's memory file):
//! [`NbdClient`] (the protocol), [`NbdUrl`] (`nbd://` and `nbd+unix://`), and [`NbdSource`],
//! a [`PageSource`] over a pool of connections (one per concurrent fetch: the pager's fetch
//! threads keep several requests in flight; a fetch larger than one request sends several
//! back to back on its connection).
//!
//! Faults of the server: a failed connection (reset, closed, timed out: see
//! [`NbdClientConfig::io_timeout`]) is dropped with every idle one and the fetch reconnects,
//! at once and then with exponential backoff ([`NbdSourceConfig::backoff_initial`] doubling
//! up to [`NbdSourceConfig::backoff_max`]); once the server has been unreachable for
//! [`NbdSourceConfig::deadline`] (counted from the first failure, over all fetches) a fetch
//! fails with an error naming the server, the deadline and the guest page: never a hang.
//! Data is not checked here: wrap the source in [`crate::VerifiedSource`].

mod client;
mod url;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use client::{NbdClient, NbdClientConfig, NbdError, TFLAG_CAN_MULTI_CONN, TFLAG_READ_ONLY};
pub use url::{NBD_DEFAULT_PORT, NbdAddr, NbdUrl, ParseNbdUrlError};

use crate::source::{PageSource, SourceError, check_range};
use crate::uffd::PAGE_SIZE_U64;

/// How an [`NbdSource`] connects and how long it waits for a server that went away.
#[derive(Debug, Clone, Copy)]
pub struct NbdSourceConfig {
    /// Per-connection settings (socket timeouts, request size).
    pub client: NbdClientConfig,
    /// A server unreachable for this long (from the first failed request or connect) makes
    /// fetches fail instead of waiting for it.
    pub deadline: Duration,
    /// First wait before reconnecting (after one immediate retry).
    pub backoff_initial: Duration,
    /// Longest wait between reconnection attempts.
    pub backoff_max: Duration,
    /// Connections open at most (a fetch waits for an idle one beyond that). The server
    /// must accept that many clients (`qemu-nbd --shared=N`; its default is 1).
    pub max_connections: usize,
}

impl Default for NbdSourceConfig {
    fn default() -> Self {
        Self {
            client: NbdClientConfig::default(),
            deadline: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            max_connections: 4,
        }
    }
}

/// Counters of an [`NbdSource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections opened (the first one included).
    pub connects: u64,
    /// Connections that failed and were dropped.
    pub connection_failures: u64,
    /// Read requests sent.
    pub requests: u64,
    /// Bytes read.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<NbdClient>,
    /// Connections open (idle or in use) or being opened.
    open: usize,
}

/// Guest pages from an NBD export: page `i` at offset `i * 4096`.
pub struct NbdSource {
    url: NbdUrl,
    cfg: NbdSourceConfig,
    size: u64,
    pool: Mutex<Pool>,
    freed: Condvar,
    /// Since when the server has been unreachable (None: it answers).
    down_since: Mutex<Option<Instant>>,
    cancelled: AtomicBool,
    connects: AtomicU64,
    failures: AtomicU64,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl fmt::Debug for NbdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdSource")
            .field("url", &self.url.to_string())
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl NbdSource {
    /// Connects to `url` once (to learn the export's size; the connection is kept for the
    /// first fetch). Fails at once if the server is not there: a restore should not start.
    pub fn connect(url: NbdUrl, cfg: NbdSourceConfig) -> Result<Self, NbdError> {
        let c = NbdClient::connect(&url, &cfg.client)?;
        Ok(Self {
            size: c.size(),
            url,
            cfg,
            pool: Mutex::new(Pool {
                idle: vec![c],
                open: 1,
            }),
            freed: Condvar::new(),
            down_since: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            connects: AtomicU64::new(1),
            failures: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The server's URL.
    pub fn url(&self) -> &NbdUrl {
        &self.url
    }

    /// Counters so far.
    pub fn stats(&self) -> NbdStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NbdStats {
            connects: g(&self.connects),
            connection_failures: g(&self.failures),
            requests: g(&self.requests),
            bytes: g(&self.bytes),
        }
    }

    fn take(&self) -> Result<NbdClient, NbdError> {
        {
            let mut p = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(c) = p.idle.pop() {
                    return Ok(c);
                }
                if p.open < self.cfg.max_connections.max(1) {
                    p.open += 1;
                    break;
                }
                p = self.freed.wait(p).unwrap_or_else(PoisonError::into_inner);
            }
        }
        let c = NbdClient::connect(&self.url, &self.cfg.client).inspect_err(|_| self.closed(1))?;
        self.connects.fetch_add(1, Ordering::Relaxed);
        if c.size() != self.size {
            self.closed(1);
            return Err(NbdError::Protocol(format!(
                "the export now has {} bytes, {} before: another file is served",
                c.size(),
                self.size
            )));
        }
        Ok(c)
    }

    fn give_back(&self, c: NbdClient) {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .idle
            .push(c);
        self.freed.notify_one();
    }

    /// `n` connections were closed (failed).
    fn closed(&self, n: usize) {
        let mut p = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        p.open = p.open.saturating_sub(n);
        drop(p);
        self.freed.notify_all();
    }

    /// A connection failed: it and every idle one (they share its fate) are closed.
    fn failed(&self) {
        let mut p = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let n = p.idle.len() + 1;
        p.idle.clear();
        p.open = p.open.saturating_sub(n);
        drop(p);
        self.freed.notify_all();
    }

    /// Reads `buf.len()` bytes at `offset` through a pooled connection, reconnecting after
    /// failures until the deadline. `page` names the guest page in errors.
    fn read(&self, page: u64, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let mut backoff = Duration::ZERO;
        loop {
            let result = self.take().and_then(|mut c| {
                let pieces = buf.len().div_ceil(c.max_request() as usize) as u64;
                let r = c.read_at(offset, buf);
                self.requests.fetch_add(pieces, Ordering::Relaxed);
                if r.is_ok() {
                    self.give_back(c);
                } else {
                    drop(c);
                    self.failed();
                }
                r
            });
            let e = match result {
                Ok(()) => {
                    self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    *self
                        .down_since
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = None;
                    return Ok(());
                }
                Err(e) if e.is_transport() => e,
                Err(e) => {
                    return Err(SourceError::Other {
                        page,
                        message: format!("NBD server {}: {e}", self.url),
                    });
                }
            };
            // The server went away (or a connection broke): drop the idle connections too,
            // they share its fate; reconnect with backoff until the deadline.
            self.failures.fetch_add(1, Ordering::Relaxed);
            let since = *self
                .down_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(Instant::now);
            let down = since.elapsed();
            if self.cancelled.load(Ordering::Relaxed) {
                return Err(SourceError::Other {
                    page,
                    message: format!("NBD server {} unreachable; fetch cancelled: {e}", self.url),
                });
            }
            if down >= self.cfg.deadline {
                let message = if matches!(e, NbdError::Silent) {
                    format!(
                        "timed out after {} waiting for {} (export {}): the NBD server accepted the connection and stopped answering",
                        humantime::format_duration(self.cfg.deadline),
                        self.url.addr,
                        self.url.export
                    )
                } else {
                    format!(
                        "NBD server {} unreachable for {:.1?} (deadline {:?}): {e}",
                        self.url, down, self.cfg.deadline
                    )
                };
                return Err(SourceError::Other { page, message });
            }
            tracing::warn!(url = %self.url, error = %e, ?backoff, "NBD connection failed, reconnecting");
            std::thread::sleep(backoff.min(self.cfg.deadline.saturating_sub(down)));
            backoff = if backoff.is_zero() {
                self.cfg.backoff_initial
            } else {
                (backoff * 2).min(self.cfg.backoff_max)
            };
        }
    }
}

impl PageSource for NbdSource {
    fn page_count(&self) -> u64 {
        self.size / PAGE_SIZE_U64
    }

    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(first, buf, self.page_count())?;
        self.read(first, first * PAGE_SIZE_U64, buf)
    }

    fn describe(&self) -> String {
        format!("NBD {}", self.url)
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}
