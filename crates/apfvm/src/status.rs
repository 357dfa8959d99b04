//! apfvm's exit statuses, in one place with the words `--help` says about them.

/// apfvm itself failed: a bad argument (clap's errors included), a bad image or snapshot, no
/// `/dev/kvm`, a dead guest, an experiment that failed. Distinct from the small statuses a
/// guest reports.
pub const ERROR: u8 = 125;

/// The guest exited 0 but the host's check of its memory failed: a scan's checksum is not
/// the one its fill pattern gives, or a scan whose checksum is checked did not finish.
pub const CHECK_FAILED: u8 = 120;

/// Stopped by SIGINT or SIGTERM: `apfvm soak` before its duration; `run`, `snapshot`,
/// `restore` with the VM stopped and nothing left behind (128 + SIGINT).
pub const INTERRUPTED: u8 = 130;

/// `apfvm soak`: an iteration failed.
pub const SOAK_FAILED: u8 = 1;

/// The exit statuses of `run`, `snapshot` and `restore`, as `--help` says them.
pub const RUN_HELP: &str = "\
Exit status: the guest's own (0 = every task passed; 1 a task failed, 2 bad boot info, 3 a
fatal exception, 4 a genuine page fault, 5 a kernel panic); 120 when the guest exited 0 but
the host's check of its memory failed (a scan's checksum is not its fill pattern's, or a
checked scan did not finish: the task is named on stderr); 125 when apfvm fails (bad option
or image, refused snapshot, no /dev/kvm, the guest died: RIP and exit reason are printed);
130 when stopped by SIGINT or SIGTERM (a snapshot being written is removed). `snapshot`
exits 0 once the snapshot is written.";

/// A guest status (or [`CHECK_FAILED`]) as a process exit status.
pub fn of_guest(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(u8::MAX)
}
