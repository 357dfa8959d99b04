//! Helpers shared by the integration tests that run guests on `/dev/kvm`.
// Each test crate uses its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::lazy::FetchLatency;
use vmm::restore::{ApfPath, RestoreOptions};

/// Longest a restore in a test may run before it is stopped as hung.
pub const TIMEOUT: Duration = Duration::from_mins(1);

/// Returns from the test after printing exactly `SKIPPED: no /dev/kvm` where KVM is absent.
macro_rules! require_kvm {
    () => {
        if !vmm::kvm_available() {
            println!("SKIPPED: no /dev/kvm");
            return;
        }
    };
}

/// A fresh, empty scratch directory for one test (`kind` names the test file).
pub fn scratch(kind: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("apfvm-{kind}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Restore options for the tests: console not echoed, no second snapshot, no window, the
/// engine's default outstanding limit, stopped after [`TIMEOUT`].
pub fn restore_options(dir: &Path, lazy: bool, apf: ApfPath, latency: &str) -> RestoreOptions {
    RestoreOptions {
        dir: dir.to_path_buf(),
        lazy,
        apf,
        fetch_latency: latency.parse::<FetchLatency>().unwrap(),
        timeout: Some(TIMEOUT),
        echo_console: false,
        snapshot: None,
        window: None,
        apf_max_outstanding: None,
    }
}

/// `ApfPath::Userspace` when `apf`, else `ApfPath::Off`.
pub fn userspace_or_off(apf: bool) -> ApfPath {
    if apf {
        ApfPath::Userspace
    } else {
        ApfPath::Off
    }
}
