//! A shared-cache pager serving clones, without KVM: each clone is a private (copy-on-write)
//! mapping of the pager's memfd, touched from ordinary threads (each blocks in the kernel on
//! a page the cache lacks, as a vCPU would). Every chunk is fetched once, whichever clone
//! faults first; a clone's write stays its own; a failure reaches every clone.
//!
//! Where userfaultfd cannot be used, each test prints one `SKIPPED: userfaultfd unavailable
//! (<reason>)` line and passes.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use memmap2::{MmapMut, MmapOptions};
use pager::{
    Attachment, ChannelObserver, FetchLatency, GuestRegion, NoopObserver, PAGE_SIZE, PageCache,
    PageSource, Pager, PagerConfig, PagerError, PagerEvent, SourceError, Uffd, VecSource,
    VerifiedSource, chunk_checksums,
};

const PAGES: usize = 64;
const CHUNK: usize = 16 * PAGE_SIZE;
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

fn image() -> Vec<u8> {
    (0..PAGES * PAGE_SIZE)
        .map(|i| u8::try_from((i / PAGE_SIZE * 7 + i % 251) % 256).unwrap())
        .collect()
}

/// A verified source that counts the bytes fetched from it.
#[derive(Debug)]
struct Counted {
    inner: VerifiedSource<VecSource>,
    bytes: AtomicU64,
    fail: bool,
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
        if self.fail {
            return Err(SourceError::Other {
                page: first,
                message: "the server went away".into(),
            });
        }
        self.inner.fetch(first, buf)
    }
    fn describe(&self) -> String {
        "counted".into()
    }
}

fn source(fail: bool) -> Arc<Counted> {
    let data = image();
    let sums = chunk_checksums(&data, CHUNK);
    Arc::new(Counted {
        inner: VerifiedSource::new(VecSource::new(data), CHUNK, sums).unwrap(),
        bytes: AtomicU64::new(0),
        fail,
    })
}

/// A clone: its private mapping of the cache, attached to the pager.
struct Clone {
    map: MmapMut,
    events: Receiver<PagerEvent>,
    _attachment: Attachment,
}

fn clone_of(cache: &PageCache, pager: &Pager) -> Clone {
    // SAFETY: the cache file is only written by the pager (pwrite of whole chunks, before
    // any clone maps them); the mapping is private and only read or written through
    // volatile accesses of single bytes.
    let mut map = unsafe {
        MmapOptions::new()
            .len(PAGES * PAGE_SIZE)
            .map_copy(cache.file())
    }
    .expect("map the cache privately");
    // SAFETY: a private mapping of the memfd that outlives the pager (tests stop the pager
    // before dropping the clones), accessed only with volatile operations.
    let region = unsafe { GuestRegion::new(0, map.as_mut_ptr(), map.len()) };
    let (observer, events) = ChannelObserver::new();
    let attachment = pager
        .handle()
        .attach(vec![region], Arc::new(observer))
        .unwrap();
    Clone {
        map,
        events,
        _attachment: attachment,
    }
}

impl Clone {
    fn addr(&self) -> usize {
        self.map.as_ptr() as usize
    }
}

fn read(addr: usize, off: usize) -> u8 {
    // SAFETY: `addr + off` lies in a live mapping of the test (checked by callers' offsets
    // below PAGES * PAGE_SIZE); a volatile byte read is valid for any content.
    unsafe { std::ptr::read_volatile((addr + off) as *const u8) }
}

fn write(addr: usize, off: usize, v: u8) {
    // SAFETY: as `read`; the mapping is private, writable, and never borrowed as Rust data.
    unsafe { std::ptr::write_volatile((addr + off) as *mut u8, v) }
}

fn start(src: Arc<Counted>, latency: Duration) -> (Arc<PageCache>, Pager) {
    let cache = Arc::new(PageCache::new((PAGES * PAGE_SIZE) as u64).unwrap());
    let pager = Pager::start_shared(
        Arc::clone(&cache),
        std::slice::from_ref(&(0..(PAGES * PAGE_SIZE) as u64)),
        src,
        &PagerConfig {
            latency: FetchLatency::Fixed(latency),
            fetch_threads: Some(2),
            ..PagerConfig::default()
        },
    )
    .unwrap();
    (cache, pager)
}

fn events(rx: &Receiver<PagerEvent>) -> Vec<PagerEvent> {
    rx.try_iter().collect()
}

#[test]
fn clones_share_each_chunk_fetched_once_and_keep_their_writes() {
    if !uffd_available() {
        return;
    }
    let src = source(false);
    let (cache, pager) = start(Arc::clone(&src), Duration::from_millis(200));
    let clones: Vec<Clone> = (0..3).map(|_| clone_of(&cache, &pager)).collect();
    let data = image();
    // Clones 0 and 1 fault on the same page of chunk 0 while its fetch is in flight; clone 2
    // on page 20 (chunk 1).
    let seen = Arc::new(Mutex::new(Vec::new()));
    let touches: Vec<_> = [(0, 3), (1, 3), (2, 20)]
        .into_iter()
        .map(|(c, page)| {
            let addr = clones[c].addr();
            let seen = Arc::clone(&seen);
            thread::spawn(move || {
                let v = read(addr, page * PAGE_SIZE + 5);
                seen.lock().unwrap().push((c, v));
            })
        })
        .collect();
    for t in touches {
        t.join().unwrap();
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    let want = |page: usize| data[page * PAGE_SIZE + 5];
    assert_eq!(seen, [(0, want(3)), (1, want(3)), (2, want(20))]);
    // Reads of pages the cache holds take no fault: clone 2 reads chunk 0, clone 0 chunk 1.
    assert_eq!(read(clones[2].addr(), 9 * PAGE_SIZE), data[9 * PAGE_SIZE]);
    assert_eq!(read(clones[0].addr(), 21 * PAGE_SIZE), data[21 * PAGE_SIZE]);
    // A clone's write is its own: neither the other clones nor the cache see it.
    write(clones[0].addr(), 3 * PAGE_SIZE, 0xee);
    assert_eq!(read(clones[0].addr(), 3 * PAGE_SIZE), 0xee);
    assert_eq!(read(clones[1].addr(), 3 * PAGE_SIZE), data[3 * PAGE_SIZE]);
    let mut b = [0u8; 1];
    cache
        .file()
        .read_exact_at(&mut b, 3 * PAGE_SIZE as u64)
        .unwrap();
    assert_eq!(b[0], data[3 * PAGE_SIZE]);
    // A write to a page the cache lacks faults like a read, then gets its own copy.
    write(clones[1].addr(), 40 * PAGE_SIZE, 0x11);
    assert_eq!(read(clones[2].addr(), 40 * PAGE_SIZE), data[40 * PAGE_SIZE]);

    let stats = pager.stop();
    assert_eq!(
        stats.fetches, 3,
        "chunks 0, 1, 2: each fetched once: {stats:?}"
    );
    assert_eq!(src.bytes.load(Ordering::Relaxed), 3 * CHUNK as u64);
    assert_eq!(cache.resident_bytes().unwrap(), 3 * CHUNK as u64);
    // Each clone was told of its own faults, and of its pages' arrival once each.
    let faults_and_ready = |c: usize| {
        let ev = events(&clones[c].events);
        let faults: Vec<(u64, bool)> = ev
            .iter()
            .filter_map(|e| match e {
                PagerEvent::Fault(f) => Some((f.gpa, f.duplicate)),
                _ => None,
            })
            .collect();
        let ready: Vec<u64> = ev
            .iter()
            .filter_map(|e| match e {
                PagerEvent::PageReady { gpa, .. } => Some(*gpa),
                _ => None,
            })
            .collect();
        (faults, ready)
    };
    let page = |p: u64| p * PAGE_SIZE as u64;
    assert_eq!(faults_and_ready(0), (vec![(page(3), false)], vec![page(3)]));
    assert_eq!(
        faults_and_ready(1),
        (
            vec![(page(3), false), (page(40), false)],
            vec![page(3), page(40)]
        )
    );
    let (f2, r2) = faults_and_ready(2);
    assert_eq!((f2, r2), (vec![(page(20), false)], vec![page(20)]));
}

#[test]
fn a_failed_fetch_reaches_every_clone_with_the_same_error() {
    if !uffd_available() {
        return;
    }
    let (cache, pager) = start(source(true), Duration::ZERO);
    let clones: Vec<Clone> = (0..2).map(|_| clone_of(&cache, &pager)).collect();
    let addr = clones[0].addr();
    // The reader stays blocked (the page never arrives) until the pager stops.
    let reader = thread::spawn(move || read(addr, 30 * PAGE_SIZE));
    let first_error = |c: &Clone| loop {
        match c.events.recv_timeout(WAIT).expect("an error event") {
            PagerEvent::Error(e) => break e,
            PagerEvent::Fault(_) | PagerEvent::PageReady { .. } => {}
        }
    };
    let e0 = first_error(&clones[0]);
    let e1 = first_error(&clones[1]);
    assert!(matches!(e0, PagerError::Shared(_)), "{e0:?}");
    assert_eq!(e0.to_string(), e1.to_string());
    assert!(e0.to_string().contains("the server went away"), "{e0}");
    assert_eq!(e0.page(), Some(30));
    // A clone that attaches after the failure hears of it at once.
    let late = clone_of(&cache, &pager);
    assert_eq!(first_error(&late).to_string(), e0.to_string());
    pager.stop();
    let _ = reader.join();
}

#[test]
fn a_private_pager_takes_no_clones() {
    if !uffd_available() {
        return;
    }
    let mem = pager::AnonMapping::new(PAGES * PAGE_SIZE).unwrap();
    // SAFETY: a private anonymous mapping that outlives the pager, never read here.
    let region = unsafe { GuestRegion::new(0, mem.as_ptr(), mem.len()) };
    let p = Pager::start(
        vec![region],
        Arc::new(VecSource::new(image())),
        Arc::new(NoopObserver),
        &PagerConfig::default(),
    )
    .unwrap();
    let mut other = MmapOptions::new()
        .len(PAGES * PAGE_SIZE)
        .map_anon()
        .unwrap();
    // SAFETY: a private anonymous mapping that outlives the call (refused before use).
    let r = unsafe { GuestRegion::new(0, other.as_mut_ptr(), other.len()) };
    let e = p
        .handle()
        .attach(vec![r], Arc::new(NoopObserver))
        .unwrap_err();
    assert!(matches!(e, PagerError::NotShared), "{e}");
    p.stop();
}
