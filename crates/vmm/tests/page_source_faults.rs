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

#[macro_use]
mod common;

use common::TIMEOUT;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use guest_abi::WORKLOAD_GPA;
use vmm::lazy::SourceOptions;
use vmm::restore::{ApfPath, RestoreOptions, restore, restore_with};
use vmm::workload::{self, WorkloadParams};
use vmm::{ApfMode, HaltMode, RunOptions, SnapshotPlan, VmConfig, VmmError, guest_image};

const MEM: u64 = 64 << 20;
/// The scan's region: 2 MiB from WORKLOAD_GPA (32 chunks of 64 KiB).
const SCAN: u64 = 2 << 20;
/// Every failing run must end within this (far below TIMEOUT: no hang).
const BOUND: Duration = Duration::from_secs(20);

fn scratch(name: &str) -> PathBuf {
    common::scratch("psf", name)
}

/// One snapshot for the whole file (taken after the scan's fill pass; the restored scan
/// re-reads its 2 MiB while they arrive). Tests that damage it work on a copy.
fn snapshot() -> &'static Path {
    static SNAP: OnceLock<PathBuf> = OnceLock::new();
    SNAP.get_or_init(|| {
        let dir = scratch("snap");
        let out = dir.join("snap");
        let mut tasks = workload::build(
            "compute:2,scan:1",
            WorkloadParams {
                vcpus: 2,
                ram_end: MEM,
                scan_bytes: Some(SCAN),
                scan_passes: 2,
                compute_ms: 0,
            },
        )
        .unwrap();
        workload::request_snapshots(&mut tasks);
        let cfg = VmConfig {
            vcpus: 2,
            mem_size: MEM,
            apf: ApfMode::V2,
            guest_image: guest_image::BUNDLED.to_vec(),
            tasks,
            quantum_us: 10_000,
            halt: HaltMode::InKernel,
            echo_console: false,
        };
        vmm::run_with(
            &cfg,
            &RunOptions {
                timeout: Some(TIMEOUT),
                snapshot: Some(SnapshotPlan {
                    out: out.clone(),
                    on_guest_request: true,
                    ..SnapshotPlan::default()
                }),
                window: None,
            },
        )
        .unwrap_or_else(|e| panic!("snapshot failed: {e}"));
        out
    })
}

fn copy_snapshot(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(snapshot()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn options(dir: &Path, latency: &str) -> RestoreOptions {
    common::restore_options(dir, true, ApfPath::Userspace, latency)
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
        let r = restore(&options(dir, "20ms"));
        (r, t0.elapsed())
    })
}

#[test]
fn memory_file_truncated_under_a_running_restore_is_a_short_read_naming_the_page() {
    require_kvm!();
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
    require_kvm!();
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

// ---- an I/O error: a fake NBD server answering reads of workload memory with EIO ----

fn rd<const N: usize>(s: &mut UnixStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn opt_reply(s: &mut UnixStream, opt: u32, rtype: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// Fixed-newstyle handshake with `NBD_OPT_GO`, then simple replies: data below `eio_from`,
/// errno 5 (EIO) for any read reaching it.
fn serve_nbd(mut conn: UnixStream, data: &[u8], eio_from: u64) -> std::io::Result<()> {
    conn.write_all(b"NBDMAGICIHAVEOPT")?;
    conn.write_all(&3u16.to_be_bytes())?;
    let _client_flags = rd::<4>(&mut conn)?;
    let size = data.len() as u64;
    let tflags: u16 = 1 | 2; // HAS_FLAGS | READ_ONLY
    loop {
        let _magic = rd::<8>(&mut conn)?;
        let opt = u32::from_be_bytes(rd::<4>(&mut conn)?);
        let len = u32::from_be_bytes(rd::<4>(&mut conn)?) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload)?;
        if opt == 7 {
            let mut info = vec![0u8, 0];
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&tflags.to_be_bytes());
            opt_reply(&mut conn, opt, 3, &info)?;
            opt_reply(&mut conn, opt, 1, b"")?;
            break;
        }
        opt_reply(&mut conn, opt, (1 << 31) | 1, b"")?;
    }
    loop {
        let req = rd::<28>(&mut conn)?;
        if u16::from_be_bytes([req[6], req[7]]) == 2 {
            return Ok(());
        }
        let handle = &req[8..16];
        let off = u64::from_be_bytes(req[16..24].try_into().unwrap());
        let len = u64::from(u32::from_be_bytes(req[24..28].try_into().unwrap()));
        let errno: u32 = if off + len > eio_from { 5 } else { 0 };
        let mut reply = Vec::new();
        reply.extend_from_slice(&0x6744_6698u32.to_be_bytes());
        reply.extend_from_slice(&errno.to_be_bytes());
        reply.extend_from_slice(handle);
        if errno == 0 {
            let (start, end) = (
                usize::try_from(off).unwrap(),
                usize::try_from(off + len).unwrap(),
            );
            reply.extend_from_slice(&data[start..end]);
        }
        conn.write_all(&reply)?;
    }
}

#[test]
fn an_io_error_from_the_memory_source_stops_the_vm_naming_the_page() {
    require_kvm!();
    let dir = scratch("eio");
    let data = std::sync::Arc::new(std::fs::read(snapshot().join("memory.raw")).unwrap());
    let socket = dir.join("nbd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let served = std::sync::Arc::clone(&data);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let data = std::sync::Arc::clone(&served);
            std::thread::spawn(move || {
                let _ = serve_nbd(conn, &data, WORKLOAD_GPA + (1 << 20));
            });
        }
    });
    let t0 = Instant::now();
    let r = restore_with(
        &options(snapshot(), "0"),
        &SourceOptions {
            memory_source: Some(format!("nbd+unix:///mem?socket={}", socket.display())),
            ..SourceOptions::default()
        },
    );
    let e = r.expect_err("the guest ran to its end on a failing memory source");
    let took = t0.elapsed();
    let msg = e.to_string();
    assert!(msg.contains("error 5"), "{msg}");
    assert_names_a_page(&e, took, "gpa", WORKLOAD_GPA + (1 << 20) - 0x1_0000, MEM);
    let _ = std::fs::remove_dir_all(&dir);
}
