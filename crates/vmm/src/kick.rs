//! Kicking a vCPU out of `KVM_RUN` from another thread (Firecracker's pattern).
//!
//! A kick sends [`kick_signal`] (SIGRTMIN) to the vCPU's thread. Its handler, installed
//! without `SA_RESTART`, sets `kvm_run.immediate_exit` of the vCPU registered on that thread,
//! so the kick is never lost: a signal that lands while the thread is inside `KVM_RUN` makes
//! it return `EINTR`; one that lands while the thread is in userspace makes the *next*
//! `KVM_RUN` return `EINTR` at once. The vCPU loop clears `immediate_exit` after each `EINTR`.
//!
//! [`Kicker`] is the cross-thread handle (used to stop vCPUs, to retry a held APF delivery
//! and for the faults the userfaultfd pager reports). [`DelayedKicks`] kicks
//! after a delay from one helper thread.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Result, VmmError};

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU whose loop runs on this thread (null: none).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only async-signal-safe work here: a thread-local read and one byte store.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` was registered by `KickTarget::register` on this very thread and points
        // into the `kvm_run` mapping of a vCPU that stays alive until the registration is
        // dropped (which clears it first); a volatile store of one byte cannot tear.
        unsafe { p.write_volatile(1) };
    }
}

/// Installs the process-wide kick handler (idempotent).
pub fn install_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: an all-zero `sigaction` is a valid starting value (empty mask, no flags).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
        // SAFETY: `sa` is fully initialised and the handler only does async-signal-safe work.
        let rc = unsafe { libc::sigaction(kick_signal(), &raw const sa, std::ptr::null_mut()) };
        if rc != 0 {
            result = Err(VmmError::Os {
                what: "sigaction(SIGRTMIN)",
                err: std::io::Error::last_os_error(),
            });
        }
    });
    result
}

#[derive(Debug)]
struct Target {
    /// The vCPU thread, while its registration lives.
    thread: Mutex<Option<libc::pthread_t>>,
    /// Kernel thread id of the vCPU thread (0 until registered): what a userfaultfd message
    /// with `UFFD_FEATURE_THREAD_ID` names, to find the vCPU that faulted.
    tid: AtomicI32,
    kicks: AtomicU64,
}

/// A handle that kicks one vCPU thread. Cheap to clone; harmless after the vCPU is gone.
#[derive(Clone, Debug)]
pub struct Kicker(Arc<Target>);

impl Kicker {
    /// A kicker with no thread yet (kicks are dropped until [`KickTarget::register`]).
    pub fn new() -> Kicker {
        Kicker(Arc::new(Target {
            thread: Mutex::new(None),
            tid: AtomicI32::new(0),
            kicks: AtomicU64::new(0),
        }))
    }

    /// Makes the vCPU leave (or not enter) `KVM_RUN` with `EINTR`.
    pub fn kick(&self) {
        let guard = self
            .0
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(thread) = *guard {
            self.0.kicks.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `thread` is alive: the registration clears it (under this lock) before
            // the thread can exit.
            let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
            if rc != 0 {
                tracing::warn!(rc, "pthread_kill failed");
            }
        }
    }

    /// Kernel thread id of the registered vCPU thread (stays set after it stops; 0 before).
    pub fn tid(&self) -> i32 {
        self.0.tid.load(Ordering::Acquire)
    }

    /// True when both handles kick the same vCPU.
    pub fn same_target(&self, other: &Kicker) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Kicks sent so far.
    pub fn kicks(&self) -> u64 {
        self.0.kicks.load(Ordering::Relaxed)
    }
}

impl Default for Kicker {
    fn default() -> Self {
        Kicker::new()
    }
}

/// The vCPU thread's side: while alive, kicks reach this thread and set `immediate_exit`.
#[derive(Debug)]
pub struct KickTarget {
    kicker: Kicker,
}

impl KickTarget {
    /// Registers the calling thread as `kicker`'s target; `immediate_exit` is the address of
    /// `kvm_run.immediate_exit` of the vCPU this thread runs.
    ///
    /// # Safety
    /// `immediate_exit` must stay valid for writes until the returned value is dropped, and
    /// the returned value must be dropped on the thread that created it.
    pub unsafe fn register(kicker: &Kicker, immediate_exit: *mut u8) -> KickTarget {
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *kicker
            .0
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(me);
        // SAFETY: gettid has no preconditions.
        kicker
            .0
            .tid
            .store(unsafe { libc::gettid() }, Ordering::Release);
        KickTarget {
            kicker: kicker.clone(),
        }
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        *self
            .kicker
            .0
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

#[derive(Debug, Default)]
struct Schedule {
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    kickers: std::collections::HashMap<u64, Kicker>,
    next_id: u64,
    stop: bool,
}

/// Kicks vCPUs after a delay, from one helper thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct DelayedKicks {
    shared: Arc<(Mutex<Schedule>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl DelayedKicks {
    /// Starts the helper thread.
    pub fn start() -> Result<DelayedKicks> {
        let shared = Arc::new((Mutex::new(Schedule::default()), Condvar::new()));
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("apfvm-kicks".into())
            .spawn(move || run_schedule(&s))
            .map_err(|err| VmmError::Os {
                what: "spawn kick thread",
                err,
            })?;
        Ok(DelayedKicks {
            shared,
            thread: Some(thread),
        })
    }

    /// Kicks `kicker` once `delay` has passed. A kick already scheduled for the same vCPU
    /// covers this one (one pending delayed kick per vCPU at most).
    pub fn kick_after(&self, kicker: &Kicker, delay: Duration) {
        let (lock, cv) = &*self.shared;
        let mut s = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.kickers.values().any(|k| k.same_target(kicker)) {
            return;
        }
        let id = s.next_id;
        s.next_id += 1;
        s.kickers.insert(id, kicker.clone());
        s.queue.push(Reverse((Instant::now() + delay, id)));
        cv.notify_one();
    }
}

fn run_schedule(shared: &(Mutex<Schedule>, Condvar)) {
    let (lock, cv) = shared;
    let mut s = lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if s.stop {
            return;
        }
        let now = Instant::now();
        match s.queue.peek().copied() {
            Some(Reverse((at, id))) if at <= now => {
                s.queue.pop();
                if let Some(k) = s.kickers.remove(&id) {
                    k.kick();
                }
            }
            Some(Reverse((at, _))) => {
                s = cv
                    .wait_timeout(s, at - now)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            None => {
                s = cv
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }
}

impl Drop for DelayedKicks {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    /// A kick sets the registered byte on the target thread, even while it sleeps in a
    /// syscall (which the signal interrupts).
    #[test]
    fn kick_sets_immediate_exit_on_the_target_thread() {
        install_handler().unwrap();
        let kicker = Kicker::new();
        kicker.kick(); // no target yet: dropped
        assert_eq!(kicker.kicks(), 0);
        let k2 = kicker.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let flag = AtomicU8::new(0);
            // SAFETY: `flag` outlives `_target`, which is dropped on this thread.
            let _target = unsafe { KickTarget::register(&k2, flag.as_ptr()) };
            tx.send(()).unwrap();
            let start = Instant::now();
            while flag.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
            flag.load(Ordering::SeqCst)
        });
        rx.recv().unwrap();
        assert_ne!(kicker.tid(), 0);
        let delayed = DelayedKicks::start().unwrap();
        delayed.kick_after(&kicker, Duration::from_millis(5));
        assert_eq!(t.join().unwrap(), 1);
        assert_eq!(kicker.kicks(), 1);
        kicker.kick(); // target gone: dropped, no signal to a dead thread
        assert_eq!(kicker.kicks(), 1);
    }
}
