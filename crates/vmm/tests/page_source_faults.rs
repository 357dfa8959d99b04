//! Page-source faults during a lazy restore (issue 7 item 3; `docs/reliability.md`): the
//! snapshot's memory fails *after* the restore opened and validated it, while the guest is
//! running and its pages arrive on demand. Each must end the run with an error that names
//! the guest page, never with the guest given wrong memory (the run does not finish), and
//! never hang (every run here has a timeout and must end well before it).
//!
//! - an I/O error (EIO) reading a page: the memory served by a fake NBD server that answers
//!   every read of workload memory with errno 5 (a regular file cannot be made to return
//!   EIO without privileges; the pager's own test double for a failing `PageSource` is
//!   `crates/pager/tests/fault_loop.rs`, `a_source_error_is_reported_and_the_thread_waits_until_stop`);
//! - a short read: `memory.raw` truncated under the running restore;
//! - a page whose checksum fails: `memory.raw` overwritten under the running restore.
//!
//! The same faults present before the restore starts (truncated file, corrupted chunk, bad
//! manifest) are `snapshot_restore.rs`, `corrupted_snapshots_are_refused_or_stop_the_vm_naming_the_page`;
//! over a real NBD server (`qemu-nbd`), a corrupted byte and a server that never comes back
//! are `nbd.rs`. Each test prints exactly `SKIPPED: no /dev/kvm` and passes where KVM is
//! absent.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_abi::WORKLOAD_GPA;
use testkit::fake_nbd::{FakeNbd, FakeOptions};
use testkit::fixture::{MEM, SCAN, copy_dir, restore_options, standard_snapshot};
use vmm::source::SourceOptions;
use vmm::{ApfMode, ApfPath, RestoreOptions, VmmError};

/// Every failing run must end within this (far below TIMEOUT: no hang).
const BOUND: Duration = Duration::from_secs(20);

fn scratch(name: &str) -> PathBuf {
    testkit::scratch("psf", name)
}

/// The shared snapshot of the standard guest (the scan re-reads its 2 MiB while they
/// arrive); the tests damage copies.
fn snapshot() -> &'static Path {
    standard_snapshot(ApfMode::V2)
}

fn copy_snapshot(to: &Path) {
    copy_dir(snapshot(), to);
}

fn options(dir: &Path, latency: &str) -> RestoreOptions {
    restore_options(dir, true, ApfPath::Userspace, latency)
}

/// The run failed with the pager's error naming a guest page in `[lo, hi)`, in time.
fn assert_names_a_page(e: &VmmError, took: Duration, what: &str, lo: u64, hi: u64) {
    let msg = e.to_string();
    println!("{what}: {msg} (after {took:?})");
    assert!(matches!(e, VmmError::Pager(_)), "{what}: {msg}");
    assert!(msg.contains(what), "{msg}");
    assert!(
        msg.contains("stopped rather than given wrong memory"),
        "{msg}"
    );
    let gpa = msg
        .split("gpa 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.split(')').next()?, 16).ok())
        .unwrap_or_else(|| panic!("no gpa in: {msg}"));
    assert!(
        (lo..hi).contains(&gpa),
        "gpa {gpa:#x} outside {lo:#x}..{hi:#x}: {msg}"
    );
    assert!(took < BOUND, "{what}: took {took:?}");
}

/// Runs a lazy restore of `dir` (20 ms per fetch: the scan needs about 0.7 s) and calls
/// `damage` 200 ms after the start, once the restore has opened and checked the snapshot and
/// the guest runs.
fn restore_then(
    dir: &Path,
    damage: impl FnOnce() + Send,
) -> (Result<vmm::RunReport, VmmError>, Duration) {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            damage();
        });
        let r = vmm::restore(&options(dir, "20ms"), &mut vmm::NoObserver);
        (r, t0.elapsed())
    })
}

#[test]
fn memory_file_truncated_under_a_running_restore_is_a_short_read_naming_the_page() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("truncate");
    copy_snapshot(&dir);
    let mem = dir.join("memory.raw");
    let (r, took) = restore_then(&dir, || {
        // Keep the eagerly loaded low 16 MiB and the first 1 MiB of the scan's region.
        let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        f.set_len(WORKLOAD_GPA + (1 << 20)).unwrap();
    });
    let e = r.expect_err("the guest ran to its end on a truncated memory file");
    assert_names_a_page(&e, took, "short read", WORKLOAD_GPA + (1 << 20), MEM);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_page_overwritten_under_a_running_restore_fails_its_checksum_naming_the_page() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("overwrite");
    copy_snapshot(&dir);
    let mem = dir.join("memory.raw");
    let bad = WORKLOAD_GPA + SCAN - (256 << 10);
    let (r, took) = restore_then(&dir, || {
        let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        f.write_all_at(&[0xa5; 4096], bad).unwrap();
    });
    let e = r.expect_err("the guest ran to its end on corrupted memory");
    // The page named is one of the corrupted chunk's (64 KiB).
    let chunk = bad & !0xffff;
    assert_names_a_page(&e, took, "fails its checksum", chunk, chunk + 0x1_0000);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- an I/O error: the fake NBD server answering reads of workload memory with EIO ----

#[test]
fn an_io_error_from_the_memory_source_stops_the_vm_naming_the_page() {
    if !testkit::require_kvm() {
        return;
    }
    let data = std::fs::read(snapshot().join("memory.raw")).unwrap();
    let server = FakeNbd::start(
        data,
        "mem",
        FakeOptions {
            eio_from: Some(WORKLOAD_GPA + (1 << 20)),
            ..FakeOptions::default()
        },
    );
    let t0 = Instant::now();
    let mut opts = options(snapshot(), "0");
    opts.source = SourceOptions {
        nbd: Some(server.url("mem").parse().unwrap()),
        ..SourceOptions::default()
    };
    let r = vmm::restore(&opts, &mut vmm::NoObserver);
    let e = r.expect_err("the guest ran to its end on a failing memory source");
    let took = t0.elapsed();
    let msg = e.to_string();
    assert!(msg.contains("error 5"), "{msg}");
    assert_names_a_page(&e, took, "gpa", WORKLOAD_GPA + (1 << 20) - 0x1_0000, MEM);
}
