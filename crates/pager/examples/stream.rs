//! Full-residency streaming throughput: maps a region the size of SOURCE lazily, with
//! `--prefetch fill`, every 64 KiB chunk verified (CRC-32 computed here from the source
//! first), and reports when it is fully resident.
//!
//! ```sh
//! cargo run --release -p pager --example stream -- /tmp/mem.raw
//! cargo run --release -p pager --example stream -- 'nbd+unix:///mem?socket=/tmp/nbd.sock'
//! cargo run --release -p pager --example stream -- nbd://127.0.0.1:10809/mem
//! ```
//! An optional second argument sets the fetch threads (default: the pager's choice), a
//! third the largest NBD request in KiB (a 1 MiB prefetch job is split into pipelined
//! requests of that size).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{
    AnonMapping, FileSource, GuestRegion, NbdSource, NbdSourceConfig, NoopObserver, PAGE_SIZE,
    PageSource, Pager, PagerConfig, Prefetch, VerifiedSource, chunk_checksums,
};

const CHUNK: usize = 64 << 10;

#[allow(clippy::cast_precision_loss)]
fn main() {
    let arg = std::env::args()
        .nth(1)
        .expect("usage: stream FILE|nbd://...|nbd+unix://... [FETCH_THREADS]");
    let threads: Option<usize> = std::env::args().nth(2).map(|t| t.parse().unwrap());
    let raw: Arc<dyn PageSource> = if arg.starts_with("nbd") {
        let mut cfg = NbdSourceConfig {
            max_connections: threads.unwrap_or(PagerConfig::DEFAULT_FETCH_THREADS).max(1),
            ..NbdSourceConfig::default()
        };
        if let Some(kib) = std::env::args().nth(3) {
            cfg.client.max_request = kib.parse::<u32>().unwrap() << 10;
        }
        Arc::new(NbdSource::connect(arg.parse().unwrap(), cfg).unwrap())
    } else {
        Arc::new(FileSource::open(&arg).unwrap())
    };
    let len = usize::try_from(raw.page_count()).unwrap() * PAGE_SIZE;
    // Checksums of the image (what a snapshot's manifest holds), read through the source.
    let mut image = vec![0u8; len];
    for (i, c) in image.chunks_mut(4 << 20).enumerate() {
        raw.fetch((i * (4 << 20) / PAGE_SIZE) as u64, c).unwrap();
    }
    let sums = chunk_checksums(&image, CHUNK);
    drop(image);
    let src = Arc::new(VerifiedSource::new(raw, CHUNK, sums).unwrap());
    let mem = AnonMapping::new(len).unwrap();
    // SAFETY: a private anonymous mapping that outlives the pager (stopped below) and that
    // nothing reads.
    let region = unsafe { GuestRegion::new(0, mem.as_ptr(), len) };
    let t0 = Instant::now();
    let pager = Pager::start(
        vec![region],
        src.clone(),
        Arc::new(NoopObserver),
        &PagerConfig {
            prefetch: Prefetch::Fill,
            fetch_threads: threads,
            ..PagerConfig::default()
        },
    )
    .unwrap();
    while pager.stats().fully_resident_ns.is_none() {
        assert!(t0.elapsed() < Duration::from_mins(2), "{:?}", pager.stats());
        std::thread::sleep(Duration::from_micros(200));
    }
    let s = pager.stop();
    let t = Duration::from_nanos(s.fully_resident_ns.unwrap());
    println!(
        "{}: {} MiB resident at {:.1} ms: {:.2} GB/s ({} prefetch jobs, fetch p50 {:?})",
        src.describe(),
        len >> 20,
        t.as_secs_f64() * 1e3,
        len as f64 / t.as_secs_f64() / 1e9,
        s.prefetch_fetches,
        Duration::from_nanos(s.fetch_time.p50_ns),
    );
}
