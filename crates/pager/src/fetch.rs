//! Fetch threads: run [`PageSource::fetch`] off the pager thread, several at once, and hand
//! the results back (waking the pager through its eventfd).

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::PagerError;
use crate::shared::Shared;
use crate::source::{PageSource, SourceError};
use crate::stats::{Stats, bump};

/// A fetch for a fetch thread: pages `[first, first + buf.len() / 4096)`.
pub(crate) struct Job {
    pub first: u64,
    pub buf: Vec<u8>,
    pub delay: Duration,
    /// A prefetch (low priority), not a fault.
    pub prefetch: bool,
}

/// A finished fetch.
pub(crate) struct Done {
    pub first: u64,
    /// Pages the job asked for.
    pub pages: u64,
    pub prefetch: bool,
    pub result: Result<Vec<u8>, SourceError>,
    pub fetch_time: Duration,
    pub delay: Duration,
}

/// The job queues: faults first; prefetches only while more than one thread is left for
/// faults (so a fault never waits behind a prefetch for a thread).
#[derive(Default)]
struct Queues {
    high: VecDeque<Job>,
    low: VecDeque<Job>,
    busy_low: usize,
    closed: bool,
}

struct PoolShared {
    q: Mutex<Queues>,
    cv: Condvar,
    threads: usize,
}

impl PoolShared {
    /// Fetch threads that may work on prefetches at once.
    fn low_limit(&self) -> usize {
        self.threads.saturating_sub(1).max(1)
    }
}

struct Worker {
    pool: Arc<PoolShared>,
    done: mpsc::Sender<Done>,
    source: Arc<dyn PageSource>,
    shared: Arc<Shared>,
    retries: u32,
}

impl Worker {
    fn run(self) {
        loop {
            let (job, low) = {
                let mut q = self.pool.q.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(j) = q.high.pop_front() {
                        break (j, false);
                    }
                    if q.busy_low < self.pool.low_limit()
                        && let Some(j) = q.low.pop_front()
                    {
                        q.busy_low += 1;
                        break (j, true);
                    }
                    if q.closed {
                        return; // the pager is stopping
                    }
                    q = self.pool.cv.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let done = fetch(&*self.source, job, self.retries, &self.shared.stats);
            if low {
                let mut q = self.pool.q.lock().unwrap_or_else(PoisonError::into_inner);
                q.busy_low -= 1;
                if !q.low.is_empty() {
                    self.pool.cv.notify_one();
                }
            }
            if self.done.send(done).is_err() {
                return;
            }
            self.shared.wake();
        }
    }
}

/// Runs one fetch, with retries.
pub(crate) fn fetch(source: &dyn PageSource, job: Job, retries: u32, stats: &Stats) -> Done {
    let Job {
        first,
        mut buf,
        delay,
        prefetch,
    } = job;
    let t0 = Instant::now();
    let pages = (buf.len() / crate::uffd::PAGE_SIZE) as u64;
    let mut attempt = 0;
    let result = loop {
        match source.fetch(first, &mut buf) {
            Ok(()) => break Ok(buf),
            Err(e) if attempt < retries => {
                tracing::warn!(error = %e, attempt, "fetch failed, retrying");
                bump(&stats.fetch_retries, 1);
                attempt += 1;
            }
            Err(e) => break Err(e),
        }
    };
    Done {
        first,
        pages,
        prefetch,
        result,
        fetch_time: t0.elapsed(),
        delay,
    }
}

/// The fetch threads (none when fetching on the pager thread).
pub(crate) struct FetchPool {
    pool: Option<Arc<PoolShared>>,
    done: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl FetchPool {
    /// Starts `threads` fetch threads (0: none).
    pub fn start(
        threads: usize,
        source: &Arc<dyn PageSource>,
        shared: &Arc<Shared>,
        retries: u32,
    ) -> Result<Self, PagerError> {
        let (done_tx, done) = mpsc::channel::<Done>();
        if threads == 0 {
            return Ok(Self {
                pool: None,
                done,
                workers: Vec::new(),
            });
        }
        let ps = Arc::new(PoolShared {
            q: Mutex::new(Queues::default()),
            cv: Condvar::new(),
            threads,
        });
        let mut pool = Self {
            pool: Some(Arc::clone(&ps)),
            done,
            workers: Vec::new(),
        };
        for i in 0..threads {
            let w = Worker {
                pool: Arc::clone(&ps),
                done: done_tx.clone(),
                source: Arc::clone(source),
                shared: Arc::clone(shared),
                retries,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("pager-fetch-{i}"))
                .spawn(move || w.run());
            match spawned {
                Ok(h) => pool.workers.push(h),
                Err(e) => {
                    pool.shutdown();
                    return Err(PagerError::Spawn(e));
                }
            }
        }
        Ok(pool)
    }

    /// True when fetches run on fetch threads (false: the caller fetches inline).
    pub fn has_threads(&self) -> bool {
        self.pool.is_some()
    }

    /// Hands `job` to a fetch thread (`prefetch`: low priority, behind every fault);
    /// gives it back when there is none (fetch it inline).
    pub fn submit(&self, job: Job, prefetch: bool) -> Option<Job> {
        let Some(p) = &self.pool else {
            return Some(job);
        };
        let mut q = p.q.lock().unwrap_or_else(PoisonError::into_inner);
        if q.closed {
            return Some(job);
        }
        if prefetch {
            q.low.push_back(job);
        } else {
            q.high.push_back(job);
        }
        drop(q);
        p.cv.notify_one();
        None
    }

    /// A finished fetch, if any.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Closes the job queues and joins the threads (each finishes its current fetch).
    pub fn shutdown(&mut self) {
        if let Some(p) = self.pool.take() {
            let mut q = p.q.lock().unwrap_or_else(PoisonError::into_inner);
            q.closed = true;
            q.high.clear();
            q.low.clear();
            drop(q);
            p.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("a pager fetch thread panicked");
            }
        }
    }
}
