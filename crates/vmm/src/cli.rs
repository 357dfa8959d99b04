//! The `apfvm` command line (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ApfMode, HaltMode};

/// apfvm: a KVM VMM serving the paravirtual asynchronous page fault protocol from userspace.
#[derive(Debug, Parser)]
#[command(name = "apfvm", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info`, `vmm=debug`); overrides RUST_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the guest kernel, show its console, print its counters, exit with its status.
    Run(RunArgs),
    /// Boot the guest and snapshot it at its request (after its scan tasks' fill pass),
    /// after `--at`, or on SIGUSR1; write the snapshot directory and exit.
    Snapshot(SnapshotArgs),
    /// Restore a snapshot (eagerly, or lazily with userfaultfd and userspace APF) and run the
    /// guest to its exit.
    Restore(RestoreArgs),
}

/// `apfvm snapshot` options.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The scan tasks get the SCAN_SNAPSHOT flag: after their fill pass they ask for a snapshot
(port 0xf5) and then run their remaining checksum passes (--scan-passes, at least 2 here).
The VM pauses every vCPU at a consistent point, writes DIR atomically (DIR.tmp-*, fsync,
rename) and exits with status 0.

Examples:
  apfvm snapshot --out /tmp/snap --apf v2 --vcpus 2 --mem 128M --workload compute:2,scan:1 --scan-size 2M
  apfvm snapshot --out /tmp/snap --at 200ms --workload compute:2")]
pub struct SnapshotArgs {
    /// The snapshot directory to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Snapshot this long after the start (e.g. 200ms, 1.5s) instead of waiting for the
    /// guest's request.
    #[arg(long)]
    pub at: Option<String>,
    /// Ignore the guest's requests (use with --at or SIGUSR1).
    #[arg(long)]
    pub no_guest_request: bool,
    /// Run options.
    #[command(flatten)]
    pub run: RunArgs,
}

/// `--apf` for a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RestoreApf {
    /// Missing pages touched at CPL 3 become asynchronous page faults (userspace APF).
    On,
    /// Never inject: every missing page stalls its vCPU until it arrives.
    Off,
    /// KVM's own in-kernel APF on the same userfaultfd memory (v2 guests only): the
    /// baseline stock KVM gives QEMU postcopy and Firecracker's UFFD restore.
    Kernel,
}

/// `apfvm restore` options.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Eager: the memory file is read and every 64 KiB chunk verified against the manifest before
the guest runs. Lazy: the first 16 MiB (kernel, tables, stacks) are loaded eagerly; workload
memory is mapped empty and served page by page through userfaultfd from the memory file
(each 64 KiB chunk verified before it is mapped), each fetch delayed by --fetch-latency.

FETCH LATENCY: 0 | DUR | uniform:DUR..DUR | exp:DUR (mean); DUR like 20ms, 100us, 1.5ms.

Exit status: the guest's; 125 when apfvm fails (refused snapshot, page that fails its
checksum: the guest page is named).

Examples:
  apfvm restore /tmp/snap
  apfvm restore /tmp/snap --lazy --fetch-latency 20ms --json out.json
  apfvm restore /tmp/snap --lazy --apf off --fetch-latency 1ms
  apfvm restore /tmp/snap --lazy --apf kernel --fetch-latency 20ms")]
pub struct RestoreArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Serve workload memory on demand through userfaultfd.
    #[arg(long)]
    pub lazy: bool,
    /// Userspace APF for missing pages (lazy restores).
    #[arg(long, value_enum, default_value_t = RestoreApf::On)]
    pub apf: RestoreApf,
    /// Delay per page fetch (lazy restores): see FETCH LATENCY.
    #[arg(long, default_value = "0")]
    pub fetch_latency: String,
    /// Write the counters as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Fail if the guest has not exited after this many seconds (0 = wait forever).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Do not print the counters summary at exit.
    #[arg(long)]
    pub quiet: bool,
    /// Take a new snapshot of the restored guest into this directory (at the guest's next
    /// request, or --snapshot-at) and exit.
    #[arg(long)]
    pub snapshot_out: Option<PathBuf>,
    /// With --snapshot-out: snapshot this long after the restore.
    #[arg(long)]
    pub snapshot_at: Option<String>,
}

/// `--apf` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ApfArg {
    /// Not offered: no CPUID bit; the APF MSRs answer #GP.
    Off,
    /// Seed protocol (2010): CPUID bit 4 only; page ready as #PF reason 2.
    V1,
    /// Modern protocol: CPUID bits 4 and 14; page ready as an interrupt + ACK.
    V2,
}

impl From<ApfArg> for ApfMode {
    fn from(a: ApfArg) -> ApfMode {
        match a {
            ApfArg::Off => ApfMode::Off,
            ApfArg::V1 => ApfMode::V1,
            ApfArg::V2 => ApfMode::V2,
        }
    }
}

/// `--hlt` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HaltArg {
    /// KVM emulates hlt in the kernel (the vCPU sleeps until an interrupt).
    InKernel,
    /// KVM_CAP_X86_DISABLE_EXITS(HLT): hlt never leaves the guest (needed by lazy restore).
    NoExit,
}

impl From<HaltArg> for HaltMode {
    fn from(a: HaltArg) -> HaltMode {
        match a {
            HaltArg::InKernel => HaltMode::InKernel,
            HaltArg::NoExit => HaltMode::NoExit,
        }
    }
}

/// `apfvm run` options.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
WORKLOAD SPEC: a comma list of kind[:count]; kinds: compute (counts loop iterations), scan
(walks its share of workload memory page by page, checksumming it), msr-selftest (the guest
writes every class of invalid and valid APF MSR value and checks the #GP answers).
Tasks are assigned round-robin to vCPUs; scan tasks split [16 MiB, end of RAM) between them.

Exit status: the guest's own (0 = every task passed); 125 when apfvm fails (bad option or
image, no /dev/kvm, the guest died: RIP and exit reason are printed).

Examples:
  apfvm run
  apfvm run --apf v1 --vcpus 2 --workload compute:3,scan:1 --json out.json
  apfvm run --workload msr-selftest --apf v2")]
pub struct RunArgs {
    /// Number of vCPUs (1..=8).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest RAM: a multiple of 2 MiB with an optional K/M/G suffix (18M..=3G).
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// APF protocol offered to the guest.
    #[arg(long, value_enum, default_value_t = ApfArg::V2)]
    pub apf: ApfArg,
    /// Tasks to run (see WORKLOAD SPEC below).
    #[arg(long, default_value = crate::workload::DEFAULT)]
    pub workload: String,
    /// Guest kernel ELF to boot instead of the bundled one.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Write the counters (guest, engine, VMM) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Scheduler quantum in microseconds (the guest's LAPIC timer period; 0 = no preemption).
    #[arg(long, default_value_t = 10_000)]
    pub quantum_us: u32,
    /// Total bytes the scan tasks walk (default: all workload memory).
    #[arg(long)]
    pub scan_size: Option<String>,
    /// Passes of each scan task.
    #[arg(long, default_value_t = 1)]
    pub scan_passes: u64,
    /// Duration of compute tasks in ms (0 = until the other tasks finish).
    #[arg(long, default_value_t = 0)]
    pub compute_ms: u64,
    /// How a guest `hlt` is handled.
    #[arg(long, value_enum, default_value_t = HaltArg::InKernel)]
    pub hlt: HaltArg,
    /// Fail if the guest has not exited after this many seconds (0 = wait forever).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Do not print the counters summary at exit.
    #[arg(long)]
    pub quiet: bool,
}
