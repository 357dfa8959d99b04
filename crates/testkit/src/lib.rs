//! Test support shared by the workspace's tests, and only by tests (every crate takes it as
//! a dev-dependency):
//! - [`require_kvm`] / [`require_qemu_nbd`] / [`require_nbdkit`]: skip a test where the machine lacks what it
//!   needs — or fail it, where CI says the machine has it (`APFVM_REQUIRE_KVM=1`).
//! - [`fixture`]: guests to snapshot, snapshots shared by a test file, restore options, the
//!   checks every restored run must pass.
//! - [`fake_nbd`]: the one fake NBD server (handshake variants, reordered replies, dropped
//!   connections, I/O errors, a frozen server).
//! - [`manifest`]: a valid snapshot manifest to edit (parser tests, the fuzz target).

pub mod fake_nbd;
pub mod fixture;
pub mod manifest;

use std::path::PathBuf;

/// When set to `1`, a test that needs `/dev/kvm` (or `qemu-nbd`) fails where it is missing
/// instead of skipping: `.ci/run` sets it on machines that have `/dev/kvm`, so a skipped KVM
/// test can never pass CI unnoticed.
pub const REQUIRE_KVM_ENV: &str = "APFVM_REQUIRE_KVM";

fn required() -> bool {
    std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1")
}

/// True when `/dev/kvm` is there. Otherwise prints exactly `SKIPPED: no /dev/kvm` and
/// returns false — or panics when [`REQUIRE_KVM_ENV`] is `1`.
///
/// ```ignore
/// if !testkit::require_kvm() { return; }
/// ```
pub fn require_kvm() -> bool {
    if vmm::kvm_available() {
        return true;
    }
    assert!(
        !required(),
        "/dev/kvm is missing but {REQUIRE_KVM_ENV}=1: this KVM test must run here"
    );
    println!("SKIPPED: no /dev/kvm");
    false
}

/// True when `qemu-nbd` runs. Otherwise prints exactly `SKIPPED: qemu-nbd not installed`
/// and returns false — or panics when [`REQUIRE_KVM_ENV`] is `1` (CI installs it).
pub fn require_qemu_nbd() -> bool {
    if harness::qemu_nbd::available() {
        return true;
    }
    assert!(
        !required(),
        "qemu-nbd is missing but {REQUIRE_KVM_ENV}=1: CI installs it (.ci/run)"
    );
    println!("SKIPPED: qemu-nbd not installed");
    false
}

/// True when `nbdkit` runs (its file plugin serves the NBD tests' second server).
/// Otherwise prints exactly `SKIPPED: nbdkit not installed` and returns false — or panics
/// when [`REQUIRE_KVM_ENV`] is `1` (CI installs it).
pub fn require_nbdkit() -> bool {
    if harness::qemu_nbd::ServerKind::Nbdkit.available() {
        return true;
    }
    assert!(
        !required(),
        "nbdkit is missing but {REQUIRE_KVM_ENV}=1: CI installs it (.ci/run)"
    );
    println!("SKIPPED: nbdkit not installed");
    false
}

/// A fresh, empty scratch directory for one test (`kind` names the test file), under the
/// system's temporary directory.
pub fn scratch(kind: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("apfvm-{kind}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch directory");
    d
}

/// A read-only view of a directory: a read-only bind mount of it (root, where mounting is
/// allowed), or the directory itself made read-only (anyone else). Removed when dropped.
#[derive(Debug)]
pub struct ReadOnlyView {
    path: std::path::PathBuf,
    mounted: bool,
}

impl ReadOnlyView {
    /// `dir` seen read-only at `at` (created); `None` when neither way works here.
    pub fn new(dir: &std::path::Path, at: &std::path::Path) -> Option<ReadOnlyView> {
        use std::os::unix::fs::PermissionsExt;
        let run = |args: &[&std::ffi::OsStr]| {
            std::process::Command::new("mount")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        std::fs::create_dir_all(at).ok()?;
        if run(&["--bind".as_ref(), dir.as_os_str(), at.as_os_str()]) {
            let view = ReadOnlyView {
                path: at.to_path_buf(),
                mounted: true,
            };
            return run(&["-o".as_ref(), "remount,ro,bind".as_ref(), at.as_os_str()])
                .then_some(view);
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).ok()?;
        let view = ReadOnlyView {
            path: dir.to_path_buf(),
            mounted: false,
        };
        // Root ignores permissions: no read-only view then.
        std::fs::File::create(dir.join(".probe"))
            .is_err()
            .then_some(view)
    }

    /// Where the read-only directory is.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        if self.mounted {
            let _ = std::process::Command::new("umount")
                .arg(&self.path)
                .status();
        } else {
            let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755));
        }
    }
}
