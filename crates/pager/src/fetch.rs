//! Fetch threads: run [`PageSource::fetch`] off the pager thread, several at once, and hand
//! the results back (waking the pager through its eventfd).

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::PagerError;
use crate::pager::Shared;
use crate::source::{PageSource, SourceError};
use crate::stats::{Stats, bump};

/// A fetch for a fetch thread: pages `[first, first + buf.len() / 4096)`.
pub(crate) struct Job {
    pub first: u64,
    pub buf: Vec<u8>,
    pub delay: Duration,
}

/// A finished fetch.
pub(crate) struct Done {
    pub first: u64,
    pub result: Result<Vec<u8>, SourceError>,
    pub fetch_time: Duration,
    pub delay: Duration,
}

struct Worker {
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    done: mpsc::Sender<Done>,
    source: Arc<dyn PageSource>,
    shared: Arc<Shared>,
    retries: u32,
}

impl Worker {
    fn run(self) {
        loop {
            let job = {
                let rx = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return, // the pager is stopping
                }
            };
            let done = fetch(&*self.source, job, self.retries, &self.shared.stats);
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
    } = job;
    let t0 = Instant::now();
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
        result,
        fetch_time: t0.elapsed(),
        delay,
    }
}

/// The fetch threads (none when fetching on the pager thread).
pub(crate) struct FetchPool {
    jobs: Option<mpsc::Sender<Job>>,
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
                jobs: None,
                done,
                workers: Vec::new(),
            });
        }
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut pool = Self {
            jobs: Some(job_tx),
            done,
            workers: Vec::new(),
        };
        for i in 0..threads {
            let w = Worker {
                jobs: Arc::clone(&job_rx),
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

    /// Hands `job` to a fetch thread; gives it back when there is none (fetch it inline).
    pub fn submit(&self, job: Job) -> Option<Job> {
        match &self.jobs {
            Some(tx) => tx.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        }
    }

    /// A finished fetch, if any.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Closes the job queue and joins the threads (each finishes its current fetch).
    pub fn shutdown(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("a pager fetch thread panicked");
            }
        }
    }
}
