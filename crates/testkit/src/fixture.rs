//! Guests to boot and snapshot, restore options, and the checks every restored run passes.
//!
//! The standard guest: 2 vCPUs, 64 MiB, `compute:2,scan:1` with the scan over 2 MiB (32
//! chunks of 64 KiB, the pager's fetch unit), 2 passes, snapshot requested by the scan right
//! after its fill pass, so a restored scan re-reads its whole region while it arrives.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use guest_abi::TaskKind;
use vmm::report::TaskState;
use vmm::workload::{self, WorkloadParams};
use vmm::{
    ApfMode, ApfPath, HaltMode, RestoreOptions, RunOptions, RunReport, SnapshotPlan, VmConfig,
};

/// Guest RAM of the standard guest.
pub const MEM: u64 = 64 << 20;
/// Bytes its scan reads.
pub const SCAN: u64 = 2 << 20;
/// Longest a run in a test may take before it is stopped as hung.
pub const TIMEOUT: Duration = Duration::from_mins(1);

/// A guest to boot.
#[derive(Clone, Debug)]
pub struct Guest {
    /// vCPUs.
    pub vcpus: u32,
    /// RAM bytes.
    pub mem: u64,
    /// `--workload`.
    pub workload: String,
    /// Bytes scanned (all scans together).
    pub scan_bytes: Option<u64>,
    /// Where the scans start (`--scan-at`); `None`: at the start of workload memory.
    pub scan_at: Option<u64>,
    /// Passes of each scan.
    pub passes: u64,
    /// The APF protocol offered.
    pub apf: ApfMode,
}

impl Guest {
    /// The standard guest (see the module doc) booted with `apf`.
    pub fn standard(apf: ApfMode) -> Guest {
        Guest {
            vcpus: 2,
            mem: MEM,
            workload: "compute:2,scan:1".into(),
            scan_bytes: Some(SCAN),
            scan_at: None,
            passes: 2,
            apf,
        }
    }

    /// Its configuration; every scan asks for a snapshot after its fill pass.
    pub fn config(&self) -> VmConfig {
        let mut tasks = workload::build(
            &self.workload,
            WorkloadParams {
                vcpus: self.vcpus,
                mem_size: self.mem,
                scan_at: self.scan_at,
                scan_bytes: self.scan_bytes,
                scan_passes: self.passes,
                compute_ms: 0,
            },
        )
        .expect("a valid test workload");
        workload::request_snapshots(&mut tasks);
        VmConfig {
            vcpus: self.vcpus,
            mem_size: self.mem,
            apf: self.apf,
            guest_image: vmm::guest_image::BUNDLED.to_vec(),
            tasks,
            quantum_us: 10_000,
            halt: HaltMode::InKernel,
        }
    }

    /// Boots it and snapshots it into `out` at its first request.
    pub fn snapshot(&self, out: &Path) -> RunReport {
        let r = vmm::boot_and_run(
            &self.config(),
            &RunOptions {
                timeout: Some(TIMEOUT),
                snapshot: Some(SnapshotPlan {
                    out: out.to_path_buf(),
                    on_guest_request: true,
                    ..SnapshotPlan::default()
                }),
                ..RunOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("snapshot of {self:?} failed: {e}"));
        assert!(r.snapshot.is_some(), "no snapshot was taken");
        r
    }
}

/// One snapshot of the standard guest booted with `apf`, taken once per test process
/// (tests that damage it work on a [`copy_dir`]).
pub fn standard_snapshot(apf: ApfMode) -> &'static Path {
    static V1: OnceLock<PathBuf> = OnceLock::new();
    static V2: OnceLock<PathBuf> = OnceLock::new();
    static OFF: OnceLock<PathBuf> = OnceLock::new();
    let cell = match apf {
        ApfMode::V1 => &V1,
        ApfMode::V2 => &V2,
        ApfMode::Off => &OFF,
    };
    cell.get_or_init(|| {
        let out = crate::scratch("fixture", &format!("{apf:?}")).join("snap");
        Guest::standard(apf).snapshot(&out);
        out
    })
}

/// Copies the files of directory `from` into `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    for e in std::fs::read_dir(from).expect("read the directory to copy") {
        let e = e.expect("a directory entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy a file");
    }
}

/// A directory `to` holding only the manifest of `snapshot`: what a machine restoring from
/// an NBD export has locally.
pub fn manifest_only(snapshot: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).expect("create the manifest's directory");
    std::fs::copy(snapshot.join("manifest.json"), to.join("manifest.json"))
        .expect("copy the manifest");
    to.to_path_buf()
}

/// Restore options for the tests: `lazy` or not, APF path `apf`, `--fetch-latency latency`,
/// console not echoed, stopped after [`TIMEOUT`], and `--apf-policy always`: a test of the
/// protocol path wants every fault to reach it, whatever the machine's load makes the
/// adaptive policy measure (crates/vmm/tests/adaptive_policy.rs tests that policy).
pub fn restore_options(dir: &Path, lazy: bool, apf: ApfPath, latency: &str) -> RestoreOptions {
    let mut o = RestoreOptions::new(dir);
    o.lazy = lazy;
    o.apf = apf;
    o.apf_policy = vmm::ApfPolicy::Always;
    o.fetch_latency = latency.parse().expect("a valid test latency");
    o.timeout = Some(TIMEOUT);
    o
}

/// Restores per `opts`, panicking with the error.
pub fn restore_ok(opts: &RestoreOptions) -> RunReport {
    vmm::restore(opts, &mut vmm::NoObserver)
        .unwrap_or_else(|e| panic!("restore of {} failed: {e}", opts.dir.display()))
}

/// Exit status 0, every task done with exit code 0, every scan's checksum verified.
pub fn assert_passed(r: &RunReport) {
    assert_eq!(r.exit_status, 0, "console:\n{}", r.console);
    assert!(r.guest_counters_valid, "console:\n{}", r.console);
    for t in &r.tasks {
        assert_eq!(
            (t.state, t.exit_code),
            (TaskState::Done, 0),
            "task {t:?}\nconsole:\n{}",
            r.console
        );
    }
    for scan in r.tasks.iter().filter(|t| t.kind == Some(TaskKind::Scan)) {
        assert_eq!(
            scan.checksum_ok,
            Some(true),
            "restored memory differs from the fill pattern: {scan:?}"
        );
    }
}

/// Every token the engine handed out was answered once, by its own page-ready or by a
/// wake-all that covered it, and nothing is left outstanding.
pub fn assert_every_token_answered(r: &RunReport) {
    let e = &r.apf.engine;
    assert_eq!(
        e.page_ready_delivered + e.dropped.wake_all,
        e.injected,
        "engine: {e:?}"
    );
    assert_eq!(r.apf.outstanding_at_end, 0, "{:?}", r.apf);
    assert_eq!(
        e.dropped.disable + e.dropped.reset + e.dropped.restore,
        0,
        "{e:?}"
    );
}
