//! Faults resolved per second, lazy vs eager, without KVM: one thread touches every page of
//! a 64 MiB anonymous mapping served by the pager with zero fetch latency.
//!
//! `cargo bench -p pager` (a plain `harness = false` bench: no framework to build; each row
//! is the best of a few runs). `PAGER_BENCH_MIB=256` changes the size.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::{
    AnonMapping, FetchLatency, GuestRegion, NoopObserver, PAGE_SIZE, PageSource, Pager,
    PagerConfig, PagerStats, Uffd, VecSource, VerifiedSource, chunk_checksums,
};

const RUNS: usize = 3;

fn touch_all(mem: &AnonMapping) -> u64 {
    (0..mem.len() / PAGE_SIZE).fold(0u64, |acc, i| acc ^ mem.read_u64(i * PAGE_SIZE))
}

fn lazy(source: &Arc<dyn PageSource>, len: usize, fetch_threads: usize) -> (Duration, PagerStats) {
    let mem = AnonMapping::new(len).unwrap();
    // SAFETY: a private anonymous mapping that outlives the pager (stopped below) and is
    // only read through volatile accesses.
    let region = unsafe { GuestRegion::new(0, mem.as_ptr(), len) };
    let config = PagerConfig {
        latency: FetchLatency::None,
        fetch_threads: Some(fetch_threads),
        ..PagerConfig::default()
    };
    let pager = Pager::start(
        vec![region],
        Arc::clone(source),
        Arc::new(NoopObserver),
        &config,
    )
    .unwrap();
    let t0 = Instant::now();
    black_box(touch_all(&mem));
    let elapsed = t0.elapsed();
    let stats = pager.stop();
    (elapsed, stats)
}

fn eager(data: &[u8]) -> Duration {
    let mem = AnonMapping::new(data.len()).unwrap();
    let t0 = Instant::now();
    mem.write_bytes(0, data);
    black_box(touch_all(&mem));
    t0.elapsed()
}

fn row(name: &str, pages: usize, mut run: impl FnMut() -> (Duration, Option<PagerStats>)) {
    let mut best: Option<(Duration, Option<PagerStats>)> = None;
    for _ in 0..RUNS {
        let r = run();
        if best.as_ref().is_none_or(|b| r.0 < b.0) {
            best = Some(r);
        }
    }
    let (d, stats) = best.expect("ran");
    let pages_f = f64::from(u32::try_from(pages).expect("fewer than 2^32 pages"));
    let per_s = pages_f / d.as_secs_f64();
    let mib_s = pages_f * 4096.0 / d.as_secs_f64() / f64::from(1 << 20);
    print!("{name:<44} {d:>12.3?}  {per_s:>10.0} pages/s  {mib_s:>8.0} MiB/s");
    if let Some(s) = stats {
        print!(
            "  faults {} fetches {} fault->copy p50 {:?} p99 {:?}",
            s.fault_messages,
            s.fetches,
            Duration::from_nanos(s.fault_to_copy.p50_ns),
            Duration::from_nanos(s.fault_to_copy.p99_ns)
        );
    }
    println!();
}

fn main() {
    if let Err(e) = Uffd::new() {
        println!("SKIPPED: userfaultfd unavailable ({e})");
        return;
    }
    let mib: usize = std::env::var("PAGER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let len = mib << 20;
    let pages = len / PAGE_SIZE;
    let data: Vec<u8> = (0..len)
        .map(|i| u8::try_from(i / 8 % 251).expect("< 251"))
        .collect();
    let plain: Arc<dyn PageSource> = Arc::new(VecSource::new(data.clone()));
    let chunk = 64 << 10;
    let verified: Arc<dyn PageSource> = Arc::new(
        VerifiedSource::new(
            VecSource::new(data.clone()),
            chunk,
            chunk_checksums(&data, chunk),
        )
        .unwrap(),
    );
    println!("{mib} MiB, {pages} pages, one thread touching each page once, zero fetch latency");
    row("eager: memcpy, then touch", pages, || (eager(&data), None));
    for threads in [0, 1, 2] {
        row(
            &format!("lazy: 4 KiB units, {threads} fetch threads"),
            pages,
            || {
                let (d, s) = lazy(&plain, len, threads);
                (d, Some(s))
            },
        );
    }
    for threads in [0, 2] {
        row(
            &format!("lazy: 64 KiB CRC-verified units, {threads} f.t."),
            pages,
            || {
                let (d, s) = lazy(&verified, len, threads);
                (d, Some(s))
            },
        );
    }
}
