//! The NBD client and source against the fake NBD server of `testkit`: handshake variants,
//! pipelined and reordered replies, dropped connections, a server that goes away.

use std::time::{Duration, Instant};

use pager::nbd::{NbdClient, NbdClientConfig, NbdError, TFLAG_READ_ONLY};
use pager::{NbdSource, NbdSourceConfig, NbdUrl, PAGE_SIZE, PageSource, SourceError};
use testkit::fake_nbd::{FakeNbd as FakeServer, FakeOptions};

fn url(srv: &FakeServer, export: &str) -> NbdUrl {
    srv.url(export).parse().unwrap()
}

fn data(pages: usize) -> Vec<u8> {
    (0..pages * PAGE_SIZE)
        .map(|i| u8::try_from((i * 31 + i / PAGE_SIZE) % 251).unwrap())
        .collect()
}

#[test]
fn go_handshake_and_pipelined_reads_out_of_order() {
    let d = data(16);
    let srv = FakeServer::start(
        d.clone(),
        "mem",
        FakeOptions {
            reverse_batch: 4,
            ..FakeOptions::default()
        },
    );
    let mut c = NbdClient::connect(&url(&srv, "mem"), &NbdClientConfig::default()).unwrap();
    assert_eq!(c.size(), d.len() as u64);
    assert_ne!(c.flags() & TFLAG_READ_ONLY, 0);
    assert_eq!(
        c.max_request(),
        1 << 20,
        "the server's maximum block size is honoured"
    );
    let mut bufs = [[0u8; 4096]; 4];
    let mut reads: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| ((i as u64 * 3 + 1) * 4096, &mut b[..]))
        .collect();
    c.read_many(&mut reads).unwrap();
    for (i, b) in bufs.iter().enumerate() {
        let off = (i * 3 + 1) * 4096;
        assert_eq!(&b[..], &d[off..off + 4096], "read {i}");
    }
    let e = c
        .read_at(d.len() as u64 - 4096, &mut [0u8; 8192])
        .unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    c.disconnect();
}

#[test]
fn falls_back_to_export_name_and_reports_unknown_exports() {
    let d = data(4);
    let srv = FakeServer::start(
        d.clone(),
        "mem",
        FakeOptions {
            no_go: true,
            ..FakeOptions::default()
        },
    );
    let cfg = NbdClientConfig::default();
    let mut c = NbdClient::connect(&url(&srv, "mem"), &cfg).unwrap();
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    c.read_at(PAGE_SIZE as u64, &mut buf).unwrap();
    assert_eq!(buf, d[PAGE_SIZE..3 * PAGE_SIZE]);
    let e = NbdClient::connect(&url(&srv, "other"), &cfg).unwrap_err();
    assert!(matches!(e, NbdError::UnknownExport { .. }), "{e}");

    let srv = FakeServer::start(d, "mem", FakeOptions::default());
    let e = NbdClient::connect(&url(&srv, "nope"), &cfg).unwrap_err();
    assert!(e.to_string().contains("no export named \"nope\""), "{e}");
    assert!(!e.is_transport());
}

#[test]
fn large_reads_are_split_into_pipelined_requests() {
    let d = data(600); // 2.3 MiB: three requests of at most 1 MiB
    let srv = FakeServer::start(d.clone(), "", FakeOptions::default());
    let src = NbdSource::connect(url(&srv, ""), NbdSourceConfig::default()).unwrap();
    assert_eq!(src.page_count(), 600);
    let mut buf = vec![0u8; 590 * PAGE_SIZE];
    src.fetch(5, &mut buf).unwrap();
    assert_eq!(buf, d[5 * PAGE_SIZE..595 * PAGE_SIZE]);
    assert_eq!(src.stats().requests, 3);
    let e = src.fetch(599, &mut buf[..2 * PAGE_SIZE]).unwrap_err();
    assert!(matches!(e, SourceError::OutOfRange { .. }), "{e}");
}

#[test]
fn dropped_connections_are_reopened() {
    let d = data(8);
    let srv = FakeServer::start(
        d.clone(),
        "mem",
        FakeOptions {
            drop_after: 2,
            ..FakeOptions::default()
        },
    );
    let src = NbdSource::connect(url(&srv, "mem"), NbdSourceConfig::default()).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for round in 0..3 {
        for p in 0..8u64 {
            src.fetch(p, &mut buf).unwrap();
            let at = usize::try_from(p).unwrap() * PAGE_SIZE;
            assert_eq!(buf, d[at..at + PAGE_SIZE], "round {round} page {p}");
        }
    }
    let s = src.stats();
    assert!(s.connects >= 12 && s.connection_failures >= 11, "{s:?}");
}

#[test]
fn a_server_that_stays_away_fails_the_fetch_after_the_deadline() {
    let srv = FakeServer::start(data(8), "mem", FakeOptions::default());
    let url = url(&srv, "mem");
    let cfg = NbdSourceConfig {
        deadline: Duration::from_millis(300),
        ..NbdSourceConfig::default()
    };
    let src = NbdSource::connect(url, cfg).unwrap();
    // The socket goes with its directory; the pooled connection is shut down.
    drop(srv);
    let mut buf = vec![0u8; PAGE_SIZE];
    let t0 = Instant::now();
    let e = src.fetch(3, &mut buf).unwrap_err();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let m = e.to_string();
    assert!(
        m.contains("guest page 3") && m.contains("unreachable"),
        "{m}"
    );
    // Still down: the next fetch fails after one attempt, not another full deadline.
    let t0 = Instant::now();
    assert!(src.fetch(4, &mut buf).is_err());
    assert!(t0.elapsed() < Duration::from_millis(100));
}

#[test]
fn cancel_ends_a_fetch_waiting_for_the_server() {
    let srv = FakeServer::start(data(8), "mem", FakeOptions::default());
    let url = url(&srv, "mem");
    let src = std::sync::Arc::new(NbdSource::connect(url, NbdSourceConfig::default()).unwrap());
    drop(srv);
    let s2 = std::sync::Arc::clone(&src);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        s2.cancel();
    });
    let t0 = Instant::now();
    let e = src.fetch(1, &mut vec![0u8; PAGE_SIZE]).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(e.to_string().contains("cancelled"), "{e}");
    t.join().unwrap();
}

/// Issue 14: a server that accepts the connection and then never answers used to end the
/// fetch with "Resource temporarily unavailable (os error 11)" after the deadline. The error
/// now says what happened, naming the server and the export.
#[test]
fn a_silent_server_times_out_naming_the_server_and_the_export() {
    let srv = FakeServer::start(
        data(8),
        "mem",
        FakeOptions {
            silent_after: Some(0),
            ..FakeOptions::default()
        },
    );
    let mut cfg = NbdSourceConfig {
        deadline: Duration::from_secs(1),
        ..NbdSourceConfig::default()
    };
    cfg.client.io_timeout = Some(Duration::from_millis(200));
    let src = NbdSource::connect(url(&srv, "mem"), cfg).unwrap();
    let t0 = Instant::now();
    let e = src
        .fetch(2, &mut vec![0u8; PAGE_SIZE])
        .unwrap_err()
        .to_string();
    let took = t0.elapsed();
    let socket = srv.socket().display().to_string();
    assert!(
        e.contains(&format!(
            "timed out after 1s waiting for {socket} (export mem)"
        )),
        "{e}"
    );
    assert!(!e.contains("os error 11"), "{e}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
}
