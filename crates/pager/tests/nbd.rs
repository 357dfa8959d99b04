//! The NBD client and [`NbdSource`] against a real server, `qemu-nbd` (Debian's
//! qemu-utils), on a unix socket and on 127.0.0.1, and the pager's prefetch policies over it.
//! Each test prints `SKIPPED: qemu-nbd not installed` (or `SKIPPED: userfaultfd
//! unavailable`) and passes where that is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::nbd::{NbdClient, NbdClientConfig, NbdError};
use pager::{
    AnonMapping, GuestRegion, NbdSource, NbdSourceConfig, NbdUrl, NoopObserver, PAGE_SIZE,
    PageSource, Pager, PagerConfig, Prefetch, Uffd, VerifiedSource, chunk_checksums,
};

const CHUNK: usize = 64 << 10;

fn qemu_nbd_available() -> bool {
    let ok = Command::new("qemu-nbd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: qemu-nbd not installed");
    }
    ok
}

fn uffd_available() -> bool {
    match Uffd::new() {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED: userfaultfd unavailable ({e})");
            false
        }
    }
}

/// A `qemu-nbd` serving one file read-only as export `mem`; killed on drop.
struct QemuNbd {
    child: Child,
    url: NbdUrl,
}

impl QemuNbd {
    fn unix(file: &Path, socket: &Path) -> QemuNbd {
        let url = format!("nbd+unix:///mem?socket={}", socket.display());
        Self::spawn(file, &[format!("--socket={}", socket.display())], &url)
    }

    fn tcp(file: &Path) -> QemuNbd {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("nbd://127.0.0.1:{port}/mem");
        Self::spawn(
            file,
            &["--bind=127.0.0.1".into(), format!("--port={port}")],
            &url,
        )
    }

    fn spawn(file: &Path, listen: &[String], url: &str) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=8",
                "--format=raw",
                "--export-name=mem",
            ])
            .args(listen)
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd starts");
        let url: NbdUrl = url.parse().unwrap();
        let t0 = Instant::now();
        loop {
            match NbdClient::connect(&url, &NbdClientConfig::default()) {
                Ok(c) => {
                    c.disconnect();
                    break;
                }
                Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                    panic!("qemu-nbd did not come up: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        QemuNbd { child, url }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image(pages: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(pages * PAGE_SIZE);
    for i in 0..pages * PAGE_SIZE / 8 {
        v.extend_from_slice(&((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x55).to_le_bytes());
    }
    v
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pager-nbd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn reads_pages_back_over_a_unix_socket_and_tcp() {
    if !qemu_nbd_available() {
        return;
    }
    let dir = scratch("read");
    let data = image(512); // 2 MiB
    let file = dir.join("memory.raw");
    std::fs::write(&file, &data).unwrap();
    for server in [
        QemuNbd::unix(&file, &dir.join("nbd.sock")),
        QemuNbd::tcp(&file),
    ] {
        let src = NbdSource::connect(server.url.clone(), NbdSourceConfig::default()).unwrap();
        assert_eq!(src.size(), data.len() as u64, "{}", server.url);
        assert_eq!(src.page_count(), 512);
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        for first in [0u64, 1, 77, 300, 509] {
            src.fetch(first, &mut buf).unwrap();
            let at = usize::try_from(first).unwrap() * PAGE_SIZE;
            assert_eq!(buf, data[at..at + buf.len()], "{} page {first}", server.url);
        }
        assert!(src.fetch(510, &mut buf).is_err(), "beyond the export");
        // Several requests in flight on one connection.
        let mut c = NbdClient::connect(&server.url, &NbdClientConfig::default()).unwrap();
        let mut bufs = vec![vec![0u8; CHUNK]; 8];
        let mut reads: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| (((7 - i) * CHUNK) as u64, &mut b[..]))
            .collect();
        c.read_many(&mut reads).unwrap();
        for (i, b) in bufs.iter().enumerate() {
            let at = (7 - i) * CHUNK;
            assert_eq!(b[..], data[at..at + CHUNK]);
        }
        let other = NbdUrl {
            addr: server.url.addr.clone(),
            export: "nope".into(),
        };
        let e = NbdClient::connect(&other, &NbdClientConfig::default()).unwrap_err();
        assert!(matches!(e, NbdError::UnknownExport { .. }), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Maps `len` bytes lazily from `src` with `prefetch`, runs `touch`, then (with `Some(image)`)
/// waits until the memory is fully resident and compares all of it; returns the statistics.
fn run_pager(
    src: Arc<dyn PageSource>,
    len: usize,
    prefetch: Prefetch,
    touch: impl FnOnce(&AnonMapping),
    wait_resident: Option<&[u8]>,
) -> pager::PagerStats {
    let mem = AnonMapping::new(len).unwrap();
    // SAFETY: a private anonymous mapping that outlives the pager (stopped below), only
    // read through volatile accesses.
    let region = unsafe { GuestRegion::new(0, mem.as_ptr(), len) };
    let pager = Pager::start(
        vec![region],
        src,
        Arc::new(NoopObserver),
        &PagerConfig {
            prefetch,
            ..PagerConfig::default()
        },
    )
    .unwrap();
    touch(&mem);
    if let Some(data) = wait_resident {
        let t0 = Instant::now();
        while pager.stats().fully_resident_ns.is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{:?}",
                pager.stats()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // Fully resident: every page equals the image.
        check_pages(&mem, data, 0..len / PAGE_SIZE);
    }
    pager.stop()
}

fn read_word(mem: &AnonMapping, off: usize) -> u64 {
    // SAFETY: `off + 8` is inside the mapping (page aligned, `off` a multiple of 8), served
    // by the pager.
    #[allow(clippy::cast_ptr_alignment)]
    unsafe {
        std::ptr::read_volatile(mem.as_ptr().add(off).cast::<u64>())
    }
}

fn check_pages(mem: &AnonMapping, data: &[u8], pages: impl Iterator<Item = usize>) {
    for p in pages {
        for off in [p * PAGE_SIZE, p * PAGE_SIZE + PAGE_SIZE - 8] {
            let want = u64::from_ne_bytes(data[off..off + 8].try_into().unwrap());
            assert_eq!(read_word(mem, off), want, "page {p}");
        }
    }
}

#[test]
#[allow(clippy::cast_precision_loss)]
fn prefetch_policies_over_nbd_map_correct_memory() {
    if !qemu_nbd_available() || !uffd_available() {
        return;
    }
    let dir = scratch("prefetch");
    let pages = 4096; // 16 MiB
    let data = Arc::new(image(pages));
    let file = dir.join("memory.raw");
    std::fs::write(&file, &*data).unwrap();
    let server = QemuNbd::unix(&file, &dir.join("nbd.sock"));
    let sums = chunk_checksums(&data, CHUNK);
    let source = |deadline| -> Arc<dyn PageSource> {
        let nbd = NbdSource::connect(
            server.url.clone(),
            NbdSourceConfig {
                deadline,
                ..NbdSourceConfig::default()
            },
        )
        .unwrap();
        Arc::new(VerifiedSource::new(nbd, CHUNK, sums.clone()).unwrap())
    };
    let len = data.len();
    let seq_half = |mem: &AnonMapping| check_pages(mem, &data, 0..pages / 2);

    let none = run_pager(
        source(Duration::from_secs(5)),
        len,
        Prefetch::None,
        seq_half,
        None,
    );
    assert_eq!(none.prefetch_fetches, 0);
    assert_eq!(none.fetches, (pages / 2 / 16) as u64, "{none:?}");
    assert!(none.fully_resident_ns.is_none());

    let ra = run_pager(
        source(Duration::from_secs(5)),
        len,
        Prefetch::Readahead,
        seq_half,
        None,
    );
    assert!(ra.prefetch_fetches > 0 && ra.prefetched_pages > 0, "{ra:?}");
    assert!(
        ra.fault_messages < none.fault_messages / 4,
        "readahead: {} faults, none: {}",
        ra.fault_messages,
        none.fault_messages
    );

    // Random access: the window collapses, few pages prefetched for nothing.
    let random = |mem: &AnonMapping| {
        check_pages(
            mem,
            &data,
            (0..64).map(|i| (i * 2_654_435_761usize) % pages),
        );
    };
    let rr = run_pager(
        source(Duration::from_secs(5)),
        len,
        Prefetch::Readahead,
        random,
        None,
    );
    assert!(rr.prefetched_pages <= 16 * 16, "{rr:?}");

    let t0 = Instant::now();
    let filled = run_pager(
        source(Duration::from_secs(5)),
        len,
        Prefetch::Fill,
        |mem| check_pages(mem, &data, (0..pages).rev().step_by(97)),
        Some(&data),
    );
    let resident = Duration::from_nanos(filled.fully_resident_ns.unwrap());
    println!(
        "fill over NBD: {} MiB resident at {:?} ({:.0} MB/s); {} prefetch jobs, {} faults, total {:?}",
        len >> 20,
        resident,
        len as f64 / resident.as_secs_f64() / 1e6,
        filled.prefetch_fetches,
        filled.fault_messages,
        t0.elapsed()
    );
    assert_eq!(filled.pages_copied, pages as u64, "{filled:?}");
    assert!(filled.prefetched_pages > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fill_from_a_local_file_fetches_inline() {
    if !uffd_available() {
        return;
    }
    let dir = scratch("fill-file");
    let pages = 2048;
    let data = image(pages);
    let file = dir.join("memory.raw");
    std::fs::write(&file, &data).unwrap();
    let src = Arc::new(
        VerifiedSource::new(
            pager::FileSource::open(&file).unwrap(),
            CHUNK,
            chunk_checksums(&data, CHUNK),
        )
        .unwrap(),
    );
    let stats = run_pager(
        src,
        data.len(),
        Prefetch::Fill,
        |mem| check_pages(mem, &data, (0..pages).step_by(13)),
        Some(&data),
    );
    assert_eq!(stats.pages_copied, pages as u64, "{stats:?}");
    assert!(stats.fully_resident_ns.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupted_chunk_served_over_nbd_is_retried_once_then_reported_not_mapped() {
    if !qemu_nbd_available() || !uffd_available() {
        return;
    }
    let dir = scratch("corrupt");
    let data = image(64);
    let mut bad = data.clone();
    bad[20 * PAGE_SIZE + 5] ^= 1; // chunk 1 (pages 16..32)
    let file = dir.join("memory.raw");
    std::fs::write(&file, &bad).unwrap();
    let server = QemuNbd::unix(&file, &dir.join("nbd.sock"));
    let nbd = NbdSource::connect(server.url.clone(), NbdSourceConfig::default()).unwrap();
    let src = Arc::new(VerifiedSource::new(nbd, CHUNK, chunk_checksums(&data, CHUNK)).unwrap());
    let mem = Arc::new(AnonMapping::new(data.len()).unwrap());
    // SAFETY: a private anonymous mapping that outlives the pager; read only through
    // volatile accesses.
    let region = unsafe { GuestRegion::new(0, mem.as_ptr(), mem.len()) };
    let (observer, events) = pager::ChannelObserver::new();
    let pager = Pager::start(
        vec![region],
        src,
        Arc::new(observer),
        &PagerConfig::default(),
    )
    .unwrap();
    check_pages(&mem, &data, 0..16);
    let m2 = Arc::clone(&mem);
    // This thread blocks on the bad chunk until the pager stops (then sees a zero page).
    let toucher = std::thread::spawn(move || read_word(&m2, 21 * PAGE_SIZE));
    let err = loop {
        if let pager::PagerEvent::Error(e) = events
            .recv_timeout(Duration::from_secs(10))
            .expect("an error")
        {
            break e;
        }
    };
    let msg = err.to_string();
    assert!(
        msg.contains("chunk 1 (pages 16..32) fails its checksum") && msg.contains("gpa 0x15000"),
        "{msg}"
    );
    let stats = pager.stop();
    assert_eq!(
        stats.fetch_retries, 1,
        "a mismatch is retried once: {stats:?}"
    );
    assert_eq!(stats.pages_copied, 16, "the bad chunk was never mapped");
    let _ = toucher.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fill_with_added_latency_completes_inline_and_with_threads() {
    if !uffd_available() {
        return;
    }
    let data = image(1024);
    for threads in [0, 2] {
        let src = Arc::new(
            VerifiedSource::new(
                pager::VecSource::new(data.clone()),
                CHUNK,
                chunk_checksums(&data, CHUNK),
            )
            .unwrap(),
        );
        let mem = AnonMapping::new(data.len()).unwrap();
        // SAFETY: a private anonymous mapping that outlives the pager; read only through
        // volatile accesses.
        let region = unsafe { GuestRegion::new(0, mem.as_ptr(), mem.len()) };
        let p = Pager::start(
            vec![region],
            src,
            Arc::new(NoopObserver),
            &PagerConfig {
                prefetch: Prefetch::Fill,
                latency: pager::FetchLatency::Fixed(Duration::from_millis(1)),
                fetch_threads: Some(threads),
                ..PagerConfig::default()
            },
        )
        .unwrap();
        let t0 = Instant::now();
        while p.stats().fully_resident_ns.is_none() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", p.stats());
            std::thread::sleep(Duration::from_millis(1));
        }
        check_pages(&mem, &data, 0..1024);
        let s = p.stop();
        assert_eq!(s.pages_copied, 1024, "{s:?}");
    }
}
