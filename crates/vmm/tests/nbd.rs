//! Restores whose memory comes from a real NBD server (`qemu-nbd`, on a unix socket):
//! lazily with and without APF, with each prefetch policy, eagerly; a corrupted byte served
//! by the server; the server killed mid-restore and restarted; a server that never comes
//! back. Each test prints `SKIPPED: no /dev/kvm` or `SKIPPED: qemu-nbd not installed` and
//! passes where that is missing.
//!
//! The workload is `tests/snapshot_restore.rs`'s: 2 vCPUs, `compute:2,scan:1`, the scan over
//! 2 MiB (32 chunks of 64 KiB), snapshot right after its fill pass; the restored scan
//! re-reads the whole region and its checksum is compared with the fill pattern.

#[macro_use]
mod common;

use common::TIMEOUT;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guest_abi::WORKLOAD_GPA;
use pager::Prefetch;
use pager::nbd::{NbdClient, NbdClientConfig};
use vmm::lazy::SourceOptions;
use vmm::restore::{RestoreOptions, restore_with};
use vmm::workload::{self, WorkloadParams};
use vmm::{ApfMode, HaltMode, RunOptions, RunReport, SnapshotPlan, VmConfig, guest_image};

const MEM: u64 = 64 << 20;

macro_rules! require_kvm_and_qemu_nbd {
    () => {
        require_kvm!();
        let ok = Command::new("qemu-nbd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("SKIPPED: qemu-nbd not installed");
            return;
        }
    };
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("nbd", name)
}

/// Snapshots the workload into `dir/snap`; returns a directory holding only its manifest
/// (what a machine restoring from the server has) and the memory file to serve.
fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let mut tasks = workload::build(
        "compute:2,scan:1",
        WorkloadParams {
            vcpus: 2,
            ram_end: MEM,
            scan_bytes: Some(2 << 20),
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
    let snap = dir.join("snap");
    vmm::run_with(
        &cfg,
        &RunOptions {
            timeout: Some(TIMEOUT),
            snapshot: Some(SnapshotPlan {
                out: snap.clone(),
                on_guest_request: true,
                ..SnapshotPlan::default()
            }),
            window: None,
        },
    )
    .unwrap_or_else(|e| panic!("snapshot failed: {e}"));
    let remote = dir.join("manifest-only");
    std::fs::create_dir_all(&remote).unwrap();
    std::fs::copy(snap.join("manifest.json"), remote.join("manifest.json")).unwrap();
    (remote, snap.join("memory.raw"))
}

/// `qemu-nbd` serving `file` as export `mem` on `socket`; killed on drop.
struct Server {
    child: Option<Child>,
    file: PathBuf,
    socket: PathBuf,
}

impl Server {
    fn start(file: &Path, socket: &Path) -> Server {
        let mut s = Server {
            child: None,
            file: file.to_path_buf(),
            socket: socket.to_path_buf(),
        };
        s.restart();
        s
    }

    fn url(&self) -> String {
        format!("nbd+unix:///mem?socket={}", self.socket.display())
    }

    fn restart(&mut self) {
        let child = Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=8",
                "--format=raw",
                "--export-name=mem",
            ])
            .arg(format!("--socket={}", self.socket.display()))
            .arg(&self.file)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd starts");
        self.child = Some(child);
        let url = self.url().parse().unwrap();
        let t0 = Instant::now();
        while let Err(e) = NbdClient::connect(&url, &NbdClientConfig::default()) {
            assert!(t0.elapsed() < Duration::from_secs(10), "qemu-nbd: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn options(dir: &Path, lazy: bool, apf: bool, latency: &str) -> RestoreOptions {
    common::restore_options(dir, lazy, common::userspace_or_off(apf), latency)
}

fn source(url: &str, prefetch: Prefetch, deadline: Duration) -> SourceOptions {
    SourceOptions {
        memory_source: Some(url.to_string()),
        deadline,
        prefetch,
    }
}

fn assert_passed(r: &RunReport) {
    assert_eq!(r.exit_status, 0, "console:\n{}", r.console);
    for t in &r.tasks {
        assert_eq!((t.state.as_str(), t.exit_code), ("done", 0), "task {t:?}");
    }
    let scan = r.tasks.iter().find(|t| t.kind == "scan").unwrap();
    assert_eq!(
        scan.checksum_ok,
        Some(true),
        "restored memory differs from the fill pattern"
    );
}

fn lazy(r: &RunReport) -> &vmm::lazy::LazyReport {
    r.restore.as_ref().unwrap().lazy.as_ref().unwrap()
}

#[test]
fn lazy_restore_from_nbd_with_and_without_apf_and_each_prefetch_policy() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("lazy");
    let (remote, memory) = snapshot(&dir);
    let server = Server::start(&memory, &dir.join("nbd.sock"));
    let deadline = Duration::from_secs(10);

    let on = restore_with(
        &options(&remote, true, true, "5ms"),
        &source(&server.url(), Prefetch::None, deadline),
    )
    .unwrap();
    assert_passed(&on);
    assert!(on.engine.injected > 0, "no APF injected: {:?}", on.engine);
    let l = lazy(&on);
    assert!(l.source.starts_with("NBD nbd+unix:///mem"), "{}", l.source);
    assert_eq!(l.pager_fetch_errors, 0);
    assert!(l.pager_fetches >= 32, "{l:?}");

    let off = restore_with(
        &options(&remote, true, false, "5ms"),
        &source(&server.url(), Prefetch::None, deadline),
    )
    .unwrap();
    assert_passed(&off);
    assert_eq!(off.engine.injected, 0);
    assert!(lazy(&off).apf_off_faults > 0);

    let ra = restore_with(
        &options(&remote, true, true, "5ms"),
        &source(&server.url(), Prefetch::Readahead, deadline),
    )
    .unwrap();
    assert_passed(&ra);
    let l = lazy(&ra);
    assert!(l.pager_prefetched_pages > 0, "{l:?}");
    assert!(
        l.vcpu_faults < lazy(&on).vcpu_faults,
        "readahead: {} faults, none: {}",
        l.vcpu_faults,
        lazy(&on).vcpu_faults
    );

    let fill = restore_with(
        &options(&remote, true, true, "0"),
        &source(&server.url(), Prefetch::Fill, deadline),
    )
    .unwrap();
    assert_passed(&fill);
    let l = lazy(&fill);
    assert!(l.pager_prefetch_fetches > 0, "{l:?}");
    println!(
        "fill: resident at {:?} ms, {} pages prefetched",
        l.resident_at_ms, l.pager_prefetched_pages
    );
    assert!(l.summary().contains("prefetch fill"), "{}", l.summary());

    // Eager: everything read (and verified) from the server before the guest runs.
    let eager = restore_with(
        &options(&remote, false, true, "0"),
        &source(&server.url(), Prefetch::None, deadline),
    )
    .unwrap();
    assert_passed(&eager);
    assert!(
        eager
            .restore
            .as_ref()
            .unwrap()
            .memory_source
            .starts_with("NBD")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupted_byte_served_over_nbd_stops_the_vm_naming_the_page() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("corrupt");
    let (remote, memory) = snapshot(&dir);
    let bad = dir.join("corrupted.raw");
    let mut mem = std::fs::read(&memory).unwrap();
    let gpa = WORKLOAD_GPA + 5 * 4096 + 17;
    mem[usize::try_from(gpa).unwrap()] ^= 0x40;
    std::fs::write(&bad, &mem).unwrap();
    let server = Server::start(&bad, &dir.join("nbd.sock"));
    for lazy in [true, false] {
        let t0 = Instant::now();
        let e = restore_with(
            &options(&remote, lazy, true, "0"),
            &source(&server.url(), Prefetch::None, Duration::from_secs(10)),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("fails its checksum") && e.contains("gpa 0x1000000"),
            "lazy {lazy}: {e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    drop(server);
    // An export of another size is refused before the guest runs.
    std::fs::write(&bad, &mem[..mem.len() / 2]).unwrap();
    let server = Server::start(&bad, &dir.join("nbd2.sock"));
    let e = restore_with(
        &options(&remote, true, true, "0"),
        &source(&server.url(), Prefetch::None, Duration::from_secs(10)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("the export has 33554432 bytes"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_server_killed_mid_restore_and_restarted_the_guest_completes() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("restart");
    let (remote, memory) = snapshot(&dir);
    let mut server = Server::start(&memory, &dir.join("nbd.sock"));
    let url = server.url();
    let run = std::thread::spawn(move || {
        restore_with(
            &options(&remote, true, true, "20ms"),
            &source(&url, Prefetch::None, Duration::from_secs(10)),
        )
    });
    std::thread::sleep(Duration::from_millis(250));
    server.kill();
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !run.is_finished(),
        "the restore finished before the server came back"
    );
    server.restart();
    let r = run.join().unwrap().unwrap();
    assert_passed(&r);
    assert_eq!(lazy(&r).pager_fetch_errors, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_server_that_never_comes_back_ends_the_vm_within_the_deadline() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("gone");
    let (remote, memory) = snapshot(&dir);
    let mut server = Server::start(&memory, &dir.join("nbd.sock"));
    let url = server.url();
    let run = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = restore_with(
            &options(&remote, true, true, "20ms"),
            &source(&url, Prefetch::None, Duration::from_secs(1)),
        );
        (r, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(250));
    let killed = Instant::now();
    server.kill();
    let (r, _) = run.join().unwrap();
    let after_kill = killed.elapsed();
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("unreachable") && e.contains("deadline 1s") && e.contains("guest page"),
        "{e}"
    );
    assert!(
        after_kill < Duration::from_secs(5),
        "the VM ended {after_kill:?} after the server went away (deadline 1 s)"
    );
    println!("error {after_kill:?} after the kill: {e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The command line end to end: `apfvm snapshot` prints the qemu-nbd command that serves
/// the snapshot; run as printed, it serves a `restore --memory-source --prefetch` that exits
/// 0 with the NBD source and the policy in its JSON report.
#[test]
fn the_printed_qemu_nbd_command_serves_a_cli_restore() {
    require_kvm_and_qemu_nbd!();
    let dir = scratch("cli");
    let snap = dir.join("snap");
    let out = Command::new(env!("CARGO_BIN_EXE_apfvm"))
        .args(["snapshot", "--out"])
        .arg(&snap)
        .args([
            "--apf",
            "v2",
            "--mem",
            "64M",
            "--workload",
            "compute:1,scan:1",
            "--scan-size",
            "2M",
            "--quiet",
            "--timeout",
            "60",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let serve = stdout
        .lines()
        .find_map(|l| l.strip_prefix("apfvm: serve its memory over NBD with: "))
        .unwrap_or_else(|| panic!("no qemu-nbd line in:\n{stdout}"));
    let url = stdout
        .lines()
        .find_map(|l| {
            l.split_once("--memory-source '")
                .map(|(_, u)| u.trim_end_matches('\''))
        })
        .unwrap_or_else(|| panic!("no URL in:\n{stdout}"))
        .to_string();
    let mut argv = serve.split_whitespace();
    assert_eq!(argv.next(), Some("qemu-nbd"));
    let mut child = Command::new("qemu-nbd")
        .args(argv)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let parsed = url.parse().unwrap();
    let t0 = Instant::now();
    while NbdClient::connect(&parsed, &NbdClientConfig::default()).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let json = dir.join("r.json");
    let status = Command::new(env!("CARGO_BIN_EXE_apfvm"))
        .arg("restore")
        .arg(&snap)
        .args(["--lazy", "--memory-source", &url, "--prefetch", "readahead"])
        .args([
            "--source-deadline",
            "5s",
            "--quiet",
            "--timeout",
            "60",
            "--json",
        ])
        .arg(&json)
        .status()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.success(), "{status:?}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let l = &r["restore"]["lazy"];
    assert_eq!(l["prefetch"], "readahead", "{l}");
    assert!(
        l["source"]
            .as_str()
            .unwrap()
            .starts_with("NBD nbd+unix:///mem"),
        "{l}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
