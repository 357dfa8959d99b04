//! The pager against real userfaultfd faults, without KVM: an anonymous mapping registered
//! with the pager, touched from ordinary threads (each blocks in the kernel until its page
//! is mapped, like a vCPU's fault would).
//!
//! Where userfaultfd cannot be used, each test prints one `SKIPPED: userfaultfd unavailable
//! (<reason>)` line and passes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use pager::uffd::CopyOutcome;
use pager::{
    AnonMapping, ChannelObserver, FaultEvent, FetchLatency, FileSource, GuestRegion, PAGE_SIZE,
    PageSource, Pager, PagerConfig, PagerError, PagerEvent, SourceError, Uffd, VecSource,
    VerifiedSource, chunk_checksums, current_thread_id,
};

const WAIT: Duration = Duration::from_secs(10);

fn uffd_available() -> bool {
    match Uffd::new() {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED: userfaultfd unavailable ({e})");
            false
        }
    }
}

/// Word `j` of guest page `i`.
fn word(i: usize, j: usize) -> u64 {
    ((i as u64) << 32 | j as u64) ^ 0x5a5a_0000_0000_a5a5
}

fn guest_image(pages: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(pages * PAGE_SIZE);
    for i in 0..pages {
        for j in 0..PAGE_SIZE / 8 {
            v.extend_from_slice(&word(i, j).to_ne_bytes());
        }
    }
    v
}

struct Setup {
    mem: Arc<AnonMapping>,
    pager: Pager,
    events: Receiver<PagerEvent>,
}

fn start(n_pages: usize, source: Arc<dyn PageSource>, cfg: &PagerConfig) -> Setup {
    let mem = Arc::new(AnonMapping::new(n_pages * PAGE_SIZE).unwrap());
    // SAFETY: `mem` is a private anonymous mapping that outlives the pager (the tests drop
    // the pager first) and is only read through volatile accesses.
    let region = unsafe { GuestRegion::new(0, mem.as_ptr(), mem.len()) };
    let (observer, events) = ChannelObserver::new();
    let pager = Pager::start(vec![region], source, Arc::new(observer), cfg).unwrap();
    Setup { mem, pager, events }
}

fn config(latency: FetchLatency, fetch_threads: usize) -> PagerConfig {
    PagerConfig {
        latency,
        fetch_threads: Some(fetch_threads),
        ..PagerConfig::default()
    }
}

/// Reads the first and last word of each page in `pages` from a new thread; returns its
/// thread id and whether every value was right.
fn touch(mem: &Arc<AnonMapping>, pages: Vec<usize>) -> thread::JoinHandle<(u32, bool)> {
    let mem = Arc::clone(mem);
    thread::spawn(move || {
        let tid = current_thread_id();
        let last = PAGE_SIZE / 8 - 1;
        let ok = pages.iter().all(|&i| {
            mem.read_u64(i * PAGE_SIZE) == word(i, 0)
                && mem.read_u64(i * PAGE_SIZE + last * 8) == word(i, last)
        });
        (tid, ok)
    })
}

fn drain(rx: &Receiver<PagerEvent>) -> (Vec<FaultEvent>, Vec<u64>, Vec<PagerError>) {
    let (mut f, mut r, mut e) = (Vec::new(), Vec::new(), Vec::new());
    while let Ok(ev) = rx.try_recv() {
        match ev {
            PagerEvent::Fault(x) => f.push(x),
            PagerEvent::PageReady { gpa, .. } => r.push(gpa),
            PagerEvent::Error(x) => e.push(x),
        }
    }
    (f, r, e)
}

fn file_source(pages: usize) -> (tempfile::NamedTempFile, Arc<dyn PageSource>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&guest_image(pages)).unwrap();
    f.flush().unwrap();
    let src = FileSource::open(f.path()).unwrap();
    (f, Arc::new(src))
}

fn serves_a_file(latency: FetchLatency, fetch_threads: usize) {
    const N: usize = 64;
    if !uffd_available() {
        return;
    }
    let (_file, source) = file_source(N);
    let s = start(N, source, &config(latency, fetch_threads));
    let t0 = Instant::now();
    let (tid, ok) = touch(&s.mem, (0..N).collect()).join().unwrap();
    let elapsed = t0.elapsed();
    assert!(ok, "wrong page contents");
    // A whole page, byte for byte.
    let mut page = vec![0u8; PAGE_SIZE];
    s.mem.read_bytes(17 * PAGE_SIZE, &mut page);
    assert_eq!(page, guest_image(18)[17 * PAGE_SIZE..]);

    let stats = s.pager.stop();
    let (faults, ready, errors) = drain(&s.events);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(stats.fetches, N as u64);
    assert_eq!(stats.pages_copied, N as u64);
    assert_eq!(stats.bytes_copied, (N * PAGE_SIZE) as u64);
    assert_eq!(stats.fault_messages, N as u64);
    assert_eq!(faults.len(), N);
    assert!(
        faults
            .iter()
            .all(|f| f.thread_id == tid && !f.duplicate && !f.write)
    );
    let mut gpas: Vec<u64> = faults.iter().map(|f| f.gpa).collect();
    gpas.sort_unstable();
    assert_eq!(gpas, (0..N as u64).map(|i| i * 4096).collect::<Vec<_>>());
    assert_eq!(ready.len(), N);
    assert_eq!(stats.fault_to_copy.count, N as u64);
    if let FetchLatency::Fixed(d) = latency {
        assert!(elapsed >= d * u32::try_from(N).unwrap(), "{elapsed:?}");
        assert!(u128::from(stats.fault_to_copy.min_ns) >= d.as_nanos());
    }
    println!("latency {latency}, fetch threads {fetch_threads}: {N} faults in {elapsed:?}");
    println!("  fault->copy {}", stats.fault_to_copy);
    println!("  fetch       {}", stats.fetch_time);
}

#[test]
fn serves_pages_from_a_file_with_no_latency() {
    serves_a_file(FetchLatency::None, 2);
}

#[test]
fn serves_pages_from_a_file_fetching_on_the_pager_thread() {
    serves_a_file(FetchLatency::None, 0);
}

#[test]
fn serves_pages_from_a_file_with_5ms_latency() {
    serves_a_file(FetchLatency::Fixed(Duration::from_millis(5)), 2);
}

#[test]
fn two_threads_on_one_page_share_one_fetch() {
    if !uffd_available() {
        return;
    }
    let source = Arc::new(VecSource::new(guest_image(4)));
    let s = start(
        4,
        source,
        &config(FetchLatency::Fixed(Duration::from_millis(300)), 2),
    );
    let a = touch(&s.mem, vec![2]);
    // Wait for A's fault to be reported, then fault again from B while the fetch is pending.
    let first = match s.events.recv_timeout(WAIT).unwrap() {
        PagerEvent::Fault(f) => f,
        other => panic!("{other:?}"),
    };
    let b = touch(&s.mem, vec![2]);
    let (tid_a, ok_a) = a.join().unwrap();
    let (tid_b, ok_b) = b.join().unwrap();
    assert!(ok_a && ok_b);
    let stats = s.pager.stop();
    let (faults, ready, errors) = drain(&s.events);
    assert!(errors.is_empty());
    assert_eq!(first.thread_id, tid_a);
    assert!(!first.duplicate);
    assert_eq!(first.gpa, 2 * 4096);
    assert_eq!(faults.len(), 1, "B's fault reported: {faults:?}");
    assert_eq!(faults[0].thread_id, tid_b);
    assert!(faults[0].duplicate);
    assert_eq!(ready, vec![2 * 4096], "one page-ready for the page");
    assert_eq!(stats.fetches, 1);
    assert_eq!(stats.fault_messages, 2);
    assert_eq!(stats.duplicate_faults, 1);
    assert_eq!(stats.pages_copied, 1);
}

/// Pages 0 takes 300 ms at the source; the others are instant.
#[derive(Debug)]
struct SlowFirstPage(VecSource);

impl PageSource for SlowFirstPage {
    fn page_count(&self) -> u64 {
        self.0.page_count()
    }
    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if first == 0 {
            thread::sleep(Duration::from_millis(300));
        }
        self.0.fetch(first, buf)
    }
    fn describe(&self) -> String {
        "slow first page".into()
    }
}

#[test]
fn a_slow_fetch_does_not_hold_up_a_fast_one() {
    if !uffd_available() {
        return;
    }
    let source = Arc::new(SlowFirstPage(VecSource::new(guest_image(4))));
    let s = start(4, source, &config(FetchLatency::None, 2));
    let slow = touch(&s.mem, vec![0]);
    let _ = s.events.recv_timeout(WAIT).unwrap(); // its fault is in
    let t0 = Instant::now();
    let fast = touch(&s.mem, vec![1]);
    assert!(fast.join().unwrap().1);
    let fast_time = t0.elapsed();
    assert!(slow.join().unwrap().1);
    let slow_time = t0.elapsed();
    assert!(fast_time < Duration::from_millis(150), "{fast_time:?}");
    assert!(slow_time > fast_time);
    let _ = s.pager.stop();
    let (_, ready, _) = drain(&s.events);
    assert_eq!(ready, vec![4096, 0], "the fast page is ready first");
}

#[test]
fn added_latency_delays_each_page_not_the_others() {
    latency_overlaps(1);
}

#[test]
fn added_latency_overlaps_also_when_fetching_on_the_pager_thread() {
    latency_overlaps(0);
}

fn latency_overlaps(fetch_threads: usize) {
    const N: usize = 8;
    if !uffd_available() {
        return;
    }
    let delay = Duration::from_millis(150);
    let source = Arc::new(VecSource::new(guest_image(N)));
    let s = start(
        N,
        source,
        &config(FetchLatency::Fixed(delay), fetch_threads),
    );
    let go = Arc::new(Barrier::new(N + 1));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (mem, go) = (Arc::clone(&s.mem), Arc::clone(&go));
            thread::spawn(move || {
                go.wait();
                let t = Instant::now();
                let ok = mem.read_u64(i * PAGE_SIZE + 8) == word(i, 1);
                (ok, t.elapsed())
            })
        })
        .collect();
    let t0 = Instant::now();
    go.wait();
    for t in threads {
        let (ok, waited) = t.join().unwrap();
        assert!(ok);
        assert!(waited >= delay, "a page came early: {waited:?}");
    }
    let total = t0.elapsed();
    // Delays overlap: far less than N × delay, even with a single fetch thread.
    assert!(total < delay * 3, "delays did not overlap: {total:?}");
    let stats = s.pager.stop();
    assert_eq!(stats.fetches, N as u64);
}

/// Page 3 cannot be read.
#[derive(Debug)]
struct BrokenPage(VecSource);

impl PageSource for BrokenPage {
    fn page_count(&self) -> u64 {
        self.0.page_count()
    }
    fn fetch(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if first == 3 {
            return Err(SourceError::Io {
                page: 3,
                what: "broken disk".into(),
                source: std::io::Error::other("medium error"),
            });
        }
        self.0.fetch(first, buf)
    }
    fn describe(&self) -> String {
        "broken disk".into()
    }
}

/// Decision under test: a failed page is reported through `on_error` (naming it) and left
/// missing, so nothing ever reads wrong data while the pager runs: its faulting thread stays
/// blocked. The VMM then stops the VM; stopping the pager closes the userfaultfd, which
/// wakes the thread onto ordinary (zero) memory.
#[test]
fn a_source_error_is_reported_and_the_thread_waits_until_stop() {
    if !uffd_available() {
        return;
    }
    let source = Arc::new(BrokenPage(VecSource::new(guest_image(8))));
    let s = start(8, source, &config(FetchLatency::None, 2));
    assert!(touch(&s.mem, vec![1, 2]).join().unwrap().1);
    let finished = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let stuck = {
        let (mem, finished) = (Arc::clone(&s.mem), Arc::clone(&finished));
        thread::spawn(move || {
            let v = mem.read_u64(3 * PAGE_SIZE);
            finished.store(true, Ordering::SeqCst);
            let _ = tx.send(v);
        })
    };
    let err = loop {
        if let PagerEvent::Error(e) = s.events.recv_timeout(WAIT).expect("an error event") {
            break e;
        }
    };
    assert_eq!(err.page(), Some(3));
    let msg = err.to_string();
    assert!(
        msg.contains("guest page 3 (gpa 0x3000)") && msg.contains("medium error"),
        "{msg}"
    );
    // Still blocked: no wrong data handed out.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(!finished.load(Ordering::SeqCst));
    // Another touch of the failed page starts no second fetch.
    let again = touch(&s.mem, vec![3]);
    let t0 = Instant::now();
    while s.pager.stats().faults_after_error == 0 {
        assert!(t0.elapsed() < WAIT);
        thread::sleep(Duration::from_millis(5));
    }
    let stats = s.pager.stop();
    assert!(!again.join().unwrap().1);
    assert_eq!(stats.fetch_errors, 1);
    assert_eq!(stats.fetch_retries, 1);
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap(),
        0,
        "after stop: ordinary zero page"
    );
    stuck.join().unwrap();
}

#[test]
fn verified_chunks_map_whole_and_a_corrupt_chunk_is_refused() {
    const N: usize = 16;
    if !uffd_available() {
        return;
    }
    let image = guest_image(N);
    let sums = chunk_checksums(&image, 4 * PAGE_SIZE);
    let mut bad = image.clone();
    bad[9 * PAGE_SIZE + 100] ^= 0x40; // chunk 2 = pages 8..12
    let source = VerifiedSource::new(VecSource::new(bad), 4 * PAGE_SIZE, sums).unwrap();
    let s = start(N, Arc::new(source), &config(FetchLatency::None, 2));
    assert!(touch(&s.mem, vec![1]).join().unwrap().1);
    // The whole chunk came with page 1: touching 0, 2, 3 faults no more.
    assert!(touch(&s.mem, vec![0, 2, 3]).join().unwrap().1);
    let before = s.pager.stats();
    assert_eq!(before.fetches, 1);
    assert_eq!(before.pages_copied, 4);
    assert_eq!(before.fault_messages, 1);
    assert!(s.pager.is_resident(3 * 4096) && !s.pager.is_resident(4 * 4096));

    let _stuck = touch(&s.mem, vec![10]);
    let err = loop {
        if let PagerEvent::Error(e) = s.events.recv_timeout(WAIT).unwrap() {
            break e;
        }
    };
    assert!(
        matches!(
            &err,
            PagerError::Fetch {
                source: SourceError::ChecksumMismatch {
                    chunk: 2,
                    first_page: 8,
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.page(), Some(10), "names the page the thread faulted on");
    assert!(err.to_string().contains("gpa 0xa000"), "{err}");
    let stats = s.pager.stop();
    assert_eq!(stats.fetch_retries, 1, "a mismatch is retried once");
}

#[test]
fn request_maps_a_page_without_a_fault() {
    if !uffd_available() {
        return;
    }
    let source = Arc::new(VecSource::new(guest_image(8)));
    let s = start(
        8,
        source,
        &config(FetchLatency::Fixed(Duration::from_millis(20)), 2),
    );
    let h = s.pager.handle();
    h.request_many([5 * 4096, 6 * 4096]);
    let t0 = Instant::now();
    while !(h.is_resident(5 * 4096) && h.is_resident(6 * 4096)) {
        assert!(t0.elapsed() < WAIT);
        thread::sleep(Duration::from_millis(2));
    }
    assert!(touch(&s.mem, vec![5, 6]).join().unwrap().1);
    assert_eq!(h.resident_pages(), 2);
    let stats = s.pager.stop();
    assert_eq!(stats.fault_messages, 0);
    assert_eq!(stats.requested_fetches, 2);
    let (faults, ready, _) = drain(&s.events);
    assert!(faults.is_empty() && ready.is_empty());
}

#[test]
fn stop_joins_cleanly_idle_and_busy() {
    if !uffd_available() {
        return;
    }
    let source = Arc::new(VecSource::new(guest_image(4)));
    let s = start(
        4,
        Arc::clone(&source) as Arc<dyn PageSource>,
        &config(FetchLatency::None, 3),
    );
    let t0 = Instant::now();
    let stats = s.pager.stop();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(stats.fault_messages, 0);

    // Stopped with a fetch waiting out a long delay: returns at once.
    let s = start(
        4,
        source,
        &config(FetchLatency::Fixed(Duration::from_secs(30)), 1),
    );
    let t = touch(&s.mem, vec![0]);
    let _ = s.events.recv_timeout(WAIT).unwrap();
    let t0 = Instant::now();
    drop(s.pager); // Drop stops too.
    assert!(t0.elapsed() < Duration::from_secs(1));
    let (_, ok) = t.join().unwrap();
    assert!(!ok, "woken onto a zero page after stop, as documented");
}

#[test]
fn uffd_copy_reports_eexist_and_partial_copies() {
    if !uffd_available() {
        return;
    }
    let mem = AnonMapping::new(4 * PAGE_SIZE).unwrap();
    let uffd = Uffd::new().unwrap();
    // SAFETY: a private anonymous mapping that outlives `uffd` in this test, read only
    // through volatile accesses.
    unsafe { uffd.register(mem.addr(), mem.len()) }.unwrap();
    let page = vec![0xabu8; PAGE_SIZE];
    let three = vec![0xcdu8; 3 * PAGE_SIZE];
    assert_eq!(
        uffd.copy(mem.addr() + PAGE_SIZE, &page).unwrap(),
        CopyOutcome::Copied
    );
    assert_eq!(
        uffd.copy(mem.addr() + PAGE_SIZE, &page).unwrap(),
        CopyOutcome::Exists
    );
    // Pages 0..3 with page 1 present: copies page 0, stops at page 1.
    assert_eq!(
        uffd.copy(mem.addr(), &three).unwrap(),
        CopyOutcome::Partial(PAGE_SIZE)
    );
    assert_eq!(mem.read_u64(0), 0xcdcd_cdcd_cdcd_cdcd);
    assert_eq!(mem.read_u64(PAGE_SIZE), 0xabab_abab_abab_abab);
    uffd.wake(mem.addr(), PAGE_SIZE).unwrap();
    uffd.unregister(mem.addr(), mem.len()).unwrap();
    // Unregistered: page 3 is ordinary memory now.
    assert_eq!(mem.read_u64(3 * PAGE_SIZE), 0);
    assert!(uffd.copy(mem.addr() + 2 * PAGE_SIZE, &page).is_err());
}

#[test]
fn fetch_threads_default_to_inline_for_fast_sources_only() {
    let auto = PagerConfig::default();
    assert_eq!(
        auto.fetch_threads_for(&VecSource::new(vec![0; PAGE_SIZE])),
        0
    );
    let slow = SlowFirstPage(VecSource::new(vec![0; PAGE_SIZE]));
    assert_eq!(
        auto.fetch_threads_for(&slow),
        PagerConfig::DEFAULT_FETCH_THREADS
    );
    let forced = config(FetchLatency::None, 3);
    assert_eq!(
        forced.fetch_threads_for(&VecSource::new(vec![0; PAGE_SIZE])),
        3
    );
}

/// A fault taken by the kernel on the thread's behalf (here read(2) copying into a missing
/// page; for a vCPU, KVM's access to guest memory) is reported too: the fd is not
/// user-mode-only. The message names the thread and says WRITE.
#[test]
fn kernel_mode_faults_are_served() {
    use std::os::unix::fs::FileExt;
    if !uffd_available() {
        return;
    }
    let source = Arc::new(VecSource::new(guest_image(4)));
    let s = start(4, source, &config(FetchLatency::None, 0));
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[0x77u8; 512]).unwrap();
    let mem = Arc::clone(&s.mem);
    let reader = thread::spawn(move || {
        // SAFETY: bytes 0..512 of the mapping, which outlives this thread (joined below) and
        // is not otherwise accessed while the slice lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(mem.as_ptr(), 512) };
        file.read_exact_at(dst, 0).unwrap();
        current_thread_id()
    });
    let tid = reader.join().unwrap();
    // The kernel's write landed on top of the page the pager mapped.
    assert_eq!(s.mem.read_u64(0), 0x7777_7777_7777_7777);
    assert_eq!(s.mem.read_u64(512), word(0, 64));
    let _ = s.pager.stop();
    let (faults, ready, _) = drain(&s.events);
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].thread_id, tid);
    assert!(faults[0].write);
    assert_eq!(ready, vec![0]);
}
