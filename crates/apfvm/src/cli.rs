//! The `apfvm` command line (clap derive). Values are parsed and range-checked here
//! ([`crate::values`]): a bad one is refused before anything runs, with its argument named,
//! and exits 125 like every other error of apfvm.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use guest_abi::{HOSTILE_CASES, MAX_CPUS, MAX_TASKS};
use harness::bench::{Mode, PREFETCH_ALL, Source};
use harness::qemu_nbd::ServerKind;
use pager::{FetchLatency, NbdUrl, Prefetch};
use vmm::ApfPath;

pub use crate::arg_enums::{ApfArg, HaltArg, OnOff, PolicyArg};
use crate::status;
use crate::values::{self, MAX_COMPUTE_MS};

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
    /// What asynchronous page faults buy: snapshot the bundled guest, restore it in every
    /// mode side by side, print one table (well under a minute; needs /dev/kvm).
    Demo(DemoArgs),
    /// Sweep fetch latency × tasks per vCPU × vCPUs × modes; write JSON (and an SVG plot).
    Bench(BenchArgs),
    /// N clones of one snapshot sharing one page cache against one restore of it, from one
    /// NBD export: bytes read from the source, host memory, wall time, against the targets.
    BenchClones(BenchClonesArgs),
    /// Restore random workloads in random modes, latencies and prefetch policies over and
    /// over for --duration; check every run (checksums, no task stuck, every APF token
    /// answered) and report the counts.
    Soak(SoakArgs),
}

impl Command {
    /// True for the commands that take a snapshot, which SIGUSR1 then triggers.
    pub fn snapshots(&self) -> bool {
        match self {
            Command::Snapshot(_) => true,
            Command::Restore(a) => a.snapshot_out.is_some(),
            _ => false,
        }
    }
}

/// The `--workload` help, every kind and hostile case named.
fn workload_help() -> String {
    format!(
        "Tasks to run: a comma list of KIND[:COUNT], KIND one of compute, scan, msr-selftest; or \
         hostile:CASE, CASE one of {} (see WORKLOAD SPEC below)",
        HOSTILE_CASES.join(", ")
    )
}

/// WORKLOAD SPEC and the exit statuses of `run` and `snapshot`.
fn run_after_help(examples: &str) -> String {
    format!(
        "\
WORKLOAD SPEC: a comma list of kind[:count] (at most {MAX_TASKS} tasks); kinds: compute (counts
loop iterations), scan (walks its share of workload memory page by page, checksumming it),
msr-selftest (the guest writes every class of invalid and valid APF MSR value and checks the
#GP answers). Tasks are assigned round-robin to vCPUs; scan tasks split [16 MiB, end of RAM
below the MMIO hole) between them, or from --scan-at to the end of its RAM region. Or `hostile:<case>`, a hostile-guest workload, <case> one of: {}
(see docs/reliability.md); use --vcpus 2.

DURATIONS: 0, or a number with a unit: 250us, 200ms, 2s, 10m, 1h; --timeout also takes whole
seconds (30).

{}

Examples:
{examples}",
        HOSTILE_CASES.join(", "),
        status::RUN_HELP
    )
}

/// `apfvm run` options.
#[derive(Debug, clap::Args)]
#[command(after_help = run_after_help("  apfvm run
  apfvm run --apf v1 --vcpus 2 --workload compute:3,scan:1 --json out.json
  apfvm run --workload msr-selftest --apf v2
  apfvm run --vcpus 2 --workload hostile:toggle"))]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..=MAX_CPUS as i64))]
    pub vcpus: u32,
    /// Guest RAM: a multiple of 2 MiB with an optional K/M/G suffix (18M..=64G). Up to 3G
    /// it lies at [0, size); the rest of a bigger guest lies above the MMIO hole, at
    /// [4G, 4G + size - 3G). A size the host cannot map or address is refused.
    #[arg(long, default_value = "256M", allow_hyphen_values = true, value_parser = values::mem)]
    pub mem: u64,
    /// APF protocol offered to the guest.
    #[arg(long, value_enum, default_value_t = ApfArg::V2)]
    pub apf: ApfArg,
    #[arg(long, default_value = vmm::workload::DEFAULT, value_parser = values::workload, help = workload_help())]
    pub workload: String,
    /// Guest kernel ELF to boot instead of the bundled one.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Write the counters (guest, engine, VMM) as JSON to this file (not into a snapshot
    /// directory; checked before the guest runs).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Scheduler quantum in microseconds (the guest's LAPIC timer period; 0 = no preemption).
    #[arg(long, default_value_t = 10_000, allow_hyphen_values = true)]
    pub quantum_us: u32,
    /// Total bytes the scan tasks walk, K/M/G suffix (default: all workload memory of the
    /// RAM region they start in).
    #[arg(long, allow_hyphen_values = true, value_parser = values::size)]
    pub scan_size: Option<u64>,
    /// Guest-physical address where the scans' memory starts, K/M/G suffix (default 16M,
    /// the start of workload memory); the scans share the rest of the RAM region holding
    /// it, e.g. `--scan-at 4G` on a guest of more than 3G scans memory above the MMIO hole.
    #[arg(long, allow_hyphen_values = true, value_parser = values::size)]
    pub scan_at: Option<u64>,
    /// Passes of each scan task (at least 1).
    #[arg(long, default_value_t = 1, allow_hyphen_values = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub scan_passes: u64,
    /// Duration of compute tasks in ms (0 = until the other tasks finish); at most 10000000
    /// (about 2.8 hours: the guest counts it in TSC ticks, which must fit 64 bits).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true, value_parser = clap::value_parser!(u64).range(0..=MAX_COMPUTE_MS))]
    pub compute_ms: u64,
    /// How a guest `hlt` is handled.
    #[arg(long, value_enum, default_value_t = HaltArg::InKernel)]
    pub hlt: HaltArg,
    /// Fail if the guest has not exited after this long: seconds or a duration (0 = wait
    /// forever; so does a limit too far away to represent).
    #[arg(long, default_value = "0", allow_hyphen_values = true, value_parser = values::timeout)]
    pub timeout: Duration,
    /// Do not print the counters summary at exit.
    #[arg(long)]
    pub quiet: bool,
}

/// `apfvm snapshot` options.
#[derive(Debug, clap::Args)]
#[command(after_help = run_after_help("  apfvm snapshot --out /tmp/snap --apf v2 --vcpus 2 --mem 128M --workload compute:2,scan:1 --scan-size 2M
  apfvm snapshot --out /tmp/snap --at 200ms --workload compute:2
  apfvm snapshot /tmp/snap

The scan tasks get the SCAN_SNAPSHOT flag: after their fill pass they ask for a snapshot
(port 0xf5) and then run their remaining checksum passes (--scan-passes, at least 2 here).
SIGUSR1 (from the moment apfvm starts) pauses it for a snapshot too. The VM pauses every vCPU
at a consistent point, writes DIR atomically (DIR.tmp-*, fsync, rename) and exits with
status 0; apfvm then prints the qemu-nbd command that serves its memory."))]
pub struct SnapshotArgs {
    /// The snapshot directory to create (must not exist); or --out DIR.
    #[arg(
        value_name = "DIR",
        conflicts_with = "out",
        required_unless_present = "out"
    )]
    pub dir: Option<PathBuf>,
    /// The snapshot directory to create (must not exist).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Snapshot this long after the start (e.g. 200ms, 1500us, 2s) instead of waiting for
    /// the guest's request.
    #[arg(long, allow_hyphen_values = true, value_parser = values::duration)]
    pub at: Option<Duration>,
    /// Ignore the guest's requests (use with --at or SIGUSR1).
    #[arg(long)]
    pub no_guest_request: bool,
    /// Run options.
    #[command(flatten)]
    pub run: RunArgs,
}

impl SnapshotArgs {
    /// The snapshot directory to create.
    pub fn out(&self) -> &Path {
        self.dir
            .as_deref()
            .or(self.out.as_deref())
            .unwrap_or(Path::new(""))
    }
}

/// `--apf` for a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RestoreApf {
    /// Missing pages touched at CPL 3 become asynchronous page faults (userspace APF).
    On,
    /// Never inject: every missing page stalls its vCPU until it arrives (the vCPU thread
    /// sleeps in the kernel's userfaultfd handling; no interrupt gets in).
    Off,
    /// Never inject, with in-kernel `hlt`: KVM faults the page in a kworker and parks the
    /// vCPU in its "APF halt", which lets interrupts (the guest's timer) in.
    OffHalt,
    /// KVM's own in-kernel APF on the same userfaultfd memory (v2 guests only): the
    /// baseline stock KVM gives QEMU postcopy and Firecracker's UFFD restore.
    Kernel,
}

impl From<RestoreApf> for ApfPath {
    fn from(a: RestoreApf) -> ApfPath {
        match a {
            RestoreApf::On => ApfPath::Userspace,
            RestoreApf::Off => ApfPath::Off,
            RestoreApf::OffHalt => ApfPath::OffHalt,
            RestoreApf::Kernel => ApfPath::Kernel,
        }
    }
}

/// `apfvm restore` options.
#[derive(Debug, clap::Args)]
#[command(after_help = format!("\
Eager: the memory file is read and every 64 KiB chunk verified against the manifest before
the guest runs. Lazy: the first 16 MiB (kernel, tables, stacks) are loaded eagerly; workload
memory is mapped empty and served page by page through userfaultfd from the memory file
(each 64 KiB chunk verified before it is mapped), each fetch delayed by --fetch-latency.

CLONES: --clones N restores N guests in one process from one snapshot: the memory source is
read once into a shared page cache (a memfd; the first 16 MiB eagerly, the rest chunk by
chunk on the first fault of any clone, a chunk in flight joined by the others), which every
clone maps copy-on-write: its writes are its own. Each clone runs with its own vCPU threads,
APF driver and userfaultfd; a clone that dies ends alone. The summary (and --json) has one
entry per clone (exit status, time to done, faults, APFs, pages written) and the totals:
bytes read from the source, the guests' host memory (shared cache + the clones' own pages;
PSS), wall time. Refused (status 125) before anything runs when (N + 1) x the guest's RAM
exceeds MemAvailable (the worst case: every clone writes all of its memory). A source that
fails stops every clone with the same error (status 125). Consoles are not echoed.

FETCH LATENCY: 0 | DUR | uniform:DUR..DUR | exp:DUR (mean); DUR a number with a unit, like
20ms, 250us, 1500us, 2s; at most 1h.

MEMORY SOURCE: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH, an NBD export of
the snapshot's memory.raw (`apfvm snapshot` prints the qemu-nbd command); every chunk is
still verified against the manifest. A dropped connection reconnects with backoff; a server
away for --source-deadline stops the VM with an error. See docs/remote-memory.md.

{}

Examples:
  apfvm restore /tmp/snap
  apfvm restore /tmp/snap --lazy --fetch-latency 20ms --json out.json
  apfvm restore /tmp/snap --lazy --apf off --fetch-latency 1ms
  apfvm restore /tmp/snap --lazy --apf kernel --fetch-latency 20ms
  apfvm restore /tmp/snap --lazy --record-working-set   # then: apfvm restore /tmp/snap --lazy
  apfvm restore /tmp/snap --lazy --memory-source 'nbd+unix:///mem?socket=/tmp/snap/nbd.sock' --prefetch fill
  apfvm restore /tmp/snap --lazy --clones 8 --memory-source 'nbd+unix:///mem?socket=/tmp/snap/nbd.sock' --json clones.json",
    status::RUN_HELP
))]
pub struct RestoreArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Serve workload memory on demand through userfaultfd.
    #[arg(long)]
    pub lazy: bool,
    /// Who turns a missing page into an APF (lazy restores).
    #[arg(long, value_enum, default_value_t = RestoreApf::On)]
    pub apf: RestoreApf,
    /// With --apf on: when a fault becomes an APF. adaptive: only when the page is expected
    /// later than an APF cycle costs this vCPU (both measured as the guest runs; the others
    /// wait for their page, counted as short_wait); always: every fault the protocol allows.
    #[arg(long, value_enum, default_value_t = PolicyArg::Adaptive)]
    pub apf_policy: PolicyArg,
    /// Delay per page fetch (lazy restores): see FETCH LATENCY.
    #[arg(long, allow_hyphen_values = true, default_value = "0", value_parser = values::fetch_latency)]
    pub fetch_latency: FetchLatency,
    /// Write the counters as JSON to this file (not into a snapshot directory; checked
    /// before the guest runs).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Fail if the guest has not exited after this long: seconds or a duration (0 = wait
    /// forever; so does a limit too far away to represent).
    #[arg(long, default_value = "0", allow_hyphen_values = true, value_parser = values::timeout)]
    pub timeout: Duration,
    /// Do not print the counters summary at exit.
    #[arg(long)]
    pub quiet: bool,
    /// Take a new snapshot of the restored guest into this directory (at the guest's next
    /// request, --snapshot-at, or SIGUSR1) and exit.
    #[arg(long)]
    pub snapshot_out: Option<PathBuf>,
    /// With --snapshot-out: snapshot this long after the restore.
    #[arg(long, allow_hyphen_values = true, requires = "snapshot_out", value_parser = values::duration)]
    pub snapshot_at: Option<Duration>,
    /// Guest memory from this NBD export instead of the snapshot's memory file (see MEMORY
    /// SOURCE).
    #[arg(long, value_parser = values::nbd_url)]
    pub memory_source: Option<NbdUrl>,
    /// With --memory-source: a server unreachable this long ends the VM with an error.
    #[arg(long, allow_hyphen_values = true, default_value = "10s", value_parser = values::duration)]
    pub source_deadline: Duration,
    /// Prefetch (lazy restores): none, readahead (sequential, adaptive window) or fill
    /// (stream every page not yet present in the background until fully resident).
    #[arg(long, default_value = "none", value_parser = values::prefetch())]
    pub prefetch: Prefetch,
    /// Outstanding APFs allowed per vCPU before a fault is served synchronously (default
    /// 64, Linux's ASYNC_PF_PER_VCPU); lower it to flood the limit with the guest's at most
    /// 48 tasks (`--workload hostile:flood`, docs/reliability.md).
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub apf_max_outstanding: Option<u64>,
    /// Lazy restores: replay the snapshot's working set (working-set.bin, recorded with
    /// --record-working-set) if it has one: only its must-have pages before the first
    /// instruction, the rest streamed in recorded order; off: ignore it.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub working_set: OnOff,
    /// Serve all of RAM on demand and record the pages the guest touches first, in order,
    /// into the snapshot directory (working-set.bin; needs --lazy, not --apf kernel; the
    /// directory must be writable, checked before the guest runs).
    #[arg(long, requires = "lazy", conflicts_with = "clones")]
    pub record_working_set: bool,
    /// Run N guests from the snapshot at once (lazy restores), sharing one host page cache:
    /// each chunk fetched once from the memory source and mapped copy-on-write into every
    /// clone (see CLONES).
    #[arg(long, value_name = "N", requires = "lazy", conflicts_with = "snapshot_out", allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub clones: Option<u32>,
}

/// `apfvm demo` options.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Two guests, one table each. Mixed: per vCPU one scan task over cold memory and
--tasks-per-vcpu - 1 compute tasks. Concurrent: every one of the --tasks-per-vcpu tasks
scans its own cold memory (every task waits on memory: where APF pays). Each is
snapshotted (in a temporary directory, removed at the end) right after the scans' fill
pass, once booted with APF v1 and once with v2, then restored in each mode, the modes
interleaved, --repeats times each. The restored scans re-read their memory (checksums
verified: any mismatch fails the demo) while the compute tasks count loop iterations.

Columns: work = compute iterations in the first --window after the restore (median);
×eager, ×off = that over eager's and off's (mixed); ×off, ×kernel = scans done that much
sooner than off's, kernel's (concurrent); scan ms = restore → every scan done; faults =
userfaultfd messages; APFs = not-present APFs the guest received; fault→APF = uffd message
→ #PF injected, ready = page mapped → page-ready handed out (userspace APF); sync
fallbacks = faults left synchronous (short_wait: the adaptive policy's choice).

Durations: 0, or a number with a unit (250us, 1ms, 2s).

Exit status: 0; 125 when something fails (bad option, no /dev/kvm, a run failed or was
inconsistent, Ctrl-C).")]
pub struct DemoArgs {
    /// Added delay per 64 KiB fetch (0, 100us, 1ms, ...; at most 1h).
    #[arg(long, allow_hyphen_values = true, default_value = "1ms", value_parser = values::fixed_latency)]
    pub fetch_latency: Duration,
    /// Restores per mode (medians are reported).
    #[arg(long, default_value_t = 3, allow_hyphen_values = true, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub repeats: u64,
    /// Tasks per vCPU: mixed, one scan and the rest compute; concurrent, all scan (at most
    /// 48 tasks in all).
    #[arg(long, default_value_t = 4, allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..=MAX_TASKS as i64))]
    pub tasks_per_vcpu: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..=MAX_CPUS as i64))]
    pub vcpus: u32,
    /// Modes to compare (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = Mode::CLASSIC, value_parser = values::mode())]
    pub modes: Vec<Mode>,
    /// The window in which compute work is counted (at most 1m).
    #[arg(long, allow_hyphen_values = true, default_value = "250ms", value_parser = values::window)]
    pub window: Duration,
    /// Cold memory each scan task reads (K/M suffix).
    #[arg(long, allow_hyphen_values = true, default_value = "4M", value_parser = values::size)]
    pub scan_size: u64,
    /// Write every row (medians, spread, each repeat) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// `apfvm bench` options.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Full sweep: fetch latency 0, 100us, 1ms, 2ms, 5ms × vCPUs 1, 2 × two workloads (mixed: one
scan per vCPU and tasks per vCPU 1, 2, 4, 8, the others computing; concurrent: 4 tasks per
vCPU, every one scanning) × modes, 3 repeats (tens of minutes). --quick: latency 0 and 1ms ×
1 vCPU × mixed with 1 and 4 tasks and concurrent, one repeat, a 150 ms window (CI). For
file and NBD at every latency: --sources-latencies 0,100us,1ms,2ms,5ms. The JSON has metadata and a \"runs\" array, one element per
point (medians, min/max, every repeat). --plot draws compute work against fetch latency,
one line per mode, for 1 vCPU and 4 tasks per vCPU (memory file, no prefetch).

Memory rows: every point is measured from the snapshot's memory file without prefetch
(source \"file\", prefetch \"none\" in the JSON); at --sources-latencies and for
--sources-modes it is measured again with each other pair of --sources × --prefetch (by
default file+readahead, file+fill, nbd, nbd+readahead, nbd+fill at 1ms for off, apf-v1 and
apf-v2; --quick too). NBD rows: bench serves each snapshot's memory file with `qemu-nbd
--read-only --persistent --shared=8 --format=raw` on a unix socket in its temporary
directory (killed at the end, also on error and Ctrl-C); without qemu-nbd they are skipped
with one line on stderr. `--sources file --prefetch none`: the plain rows only.

Exit status: 0; 125 when something fails (bad option, no /dev/kvm, a run failed or was
inconsistent, Ctrl-C).")]
pub struct BenchArgs {
    /// Write the results here (not into a snapshot directory; checked before anything runs).
    #[arg(long)]
    pub json: PathBuf,
    /// Draw an SVG plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The reduced sweep (about a minute or less).
    #[arg(long)]
    pub quick: bool,
    /// Repeats per point (default 3; 1 with --quick).
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub repeats: Option<u64>,
    /// Modes (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = Mode::MAIN, value_parser = values::mode())]
    pub modes: Vec<Mode>,
    /// The window in which compute work is counted (the full sweep's; at most 1m).
    #[arg(long, allow_hyphen_values = true, default_value = "250ms", value_parser = values::window)]
    pub window: Duration,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Memory sources of the memory rows (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = Source::ALL, value_parser = values::source())]
    pub sources: Vec<Source>,
    /// Prefetch policies of the memory rows (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = PREFETCH_ALL, value_parser = values::prefetch())]
    pub prefetch: Vec<Prefetch>,
    /// Fetch latencies of the sweep at which the memory rows are measured (comma list).
    #[arg(long, allow_hyphen_values = true, value_delimiter = ',', default_value = "1ms", value_parser = values::fixed_latency)]
    pub sources_latencies: Vec<Duration>,
    /// Modes the memory rows are measured for (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = [Mode::Off, Mode::ApfV1, Mode::ApfV2], value_parser = values::mode())]
    pub sources_modes: Vec<Mode>,
}

/// Where `bench-clones` serves the snapshot's memory from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServerArg {
    /// `qemu-nbd` on a unix socket.
    QemuNbd,
    /// `nbdkit` (file plugin) on a unix socket.
    Nbdkit,
    /// The snapshot's memory file itself (no server).
    File,
}

impl ServerArg {
    /// The NBD server to start (`None`: the file).
    pub fn kind(self) -> Option<ServerKind> {
        match self {
            ServerArg::QemuNbd => Some(ServerKind::QemuNbd),
            ServerArg::Nbdkit => Some(ServerKind::Nbdkit),
            ServerArg::File => None,
        }
    }
}

/// `apfvm bench-clones` options.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Boots the guest (--vcpus, --mem, --workload: by default 4 scan tasks over all workload
memory, every task reading cold memory after the restore), snapshots it after the scans'
fill pass into a temporary directory (removed at the end), serves its memory file with
--server on a unix socket, then per repeat, interleaved: one plain lazy restore (userspace
APF) and --clones clones restored at once on one shared page cache, both at --fetch-latency
per 64 KiB chunk. Every guest's scans are checked (a wrong checksum fails the bench).

Columns: source MiB = bytes read from the memory source (eager 16 MiB included); host mem
MiB = one restore: the RSS of its RAM; clones: the shared cache plus the pages they wrote;
PSS MiB = the proportional set size of the guests' RAM mappings (summed); written MiB =
the clones' own copies of pages they wrote; wall ms = start of the restore (set-up
included) to the last guest done. The targets (issue 13): source bytes <= 1.1x one
guest's, host memory less the written pages <= 1.5x one guest's, wall time <= 2x one
restore's; a missed target is reported, not an error.

Exit status: 0; 125 when something fails (bad option, no /dev/kvm, no NBD server, a guest
failed or read wrong memory, Ctrl-C).

Example:
  apfvm bench-clones --clones 8 --mem 256M --workload scan:4 --fetch-latency 1ms --json clones.json
  apfvm bench-clones --prefetch readahead --repeats 3")]
pub struct BenchClonesArgs {
    /// Clones restored at once.
    #[arg(long, default_value_t = 8, allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub clones: u32,
    /// Guest RAM: a multiple of 2 MiB with an optional K/M/G suffix (18M..=3G).
    #[arg(long, default_value = "256M", allow_hyphen_values = true, value_parser = values::mem)]
    pub mem: u64,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true, value_parser = clap::value_parser!(u32).range(1..=MAX_CPUS as i64))]
    pub vcpus: u32,
    #[arg(long, default_value = "scan:4", value_parser = values::workload, help = workload_help())]
    pub workload: String,
    /// Added delay per 64 KiB fetch (0, 100us, 1ms, ...; at most 1h).
    #[arg(long, allow_hyphen_values = true, default_value = "1ms", value_parser = values::fixed_latency)]
    pub fetch_latency: Duration,
    /// Where the memory comes from.
    #[arg(long, value_enum, default_value_t = ServerArg::QemuNbd)]
    pub server: ServerArg,
    /// Who turns a missing page into an APF, in both restores (the guest offers v2).
    #[arg(long, value_enum, default_value_t = RestoreApf::On)]
    pub apf: RestoreApf,
    /// Prefetch of both restores: none, readahead or fill.
    #[arg(long, default_value = "none", value_parser = values::prefetch())]
    pub prefetch: Prefetch,
    /// Runs of each (medians are reported).
    #[arg(long, default_value_t = 1, allow_hyphen_values = true, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub repeats: u64,
    /// Write the results as JSON to this file (checked before anything runs).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `apfvm soak` options.
#[derive(Debug, clap::Args)]
#[command(after_help = format!("\
Each iteration picks (from --seed) 1 or 2 vCPUs, compute:k,scan:m (k 1..=4, one scan of 1-4
MiB per vCPU), a guest booted with APF v1 or v2, snapshots it (temporary directory, removed
after the iteration) and restores it: eager, lazy off, lazy off-halt, lazy userspace APF
(apf-v1/apf-v2) or lazy kernel APF (v2 guests), with a random fetch latency (fixed 0-5 ms,
uniform:, exp:) and prefetch (none, readahead, fill). Every run must exit 0 with every task
done before --timeout, every scan checksum verified on the host, and every APF token the
engine injected answered (page ready or covered by a wake-all, none outstanding).

One line per iteration, then a summary (iterations by mode, faults, APFs, page readies,
wake-alls, lost wakeups, checksum mismatches, VMM errors and panics) and the result: PASS,
FAIL, or INTERRUPTED (SIGINT or SIGTERM stopped it before --duration, after the iteration in
progress; a second signal ends it at once).

Exit status: 0 if it ran for --duration and every iteration passed (result: PASS); 1 if an
iteration failed (FAIL); {} if interrupted (INTERRUPTED, the counts so far); 125 when apfvm
cannot run (no /dev/kvm, bad option).

Examples:
  apfvm soak --duration 10s
  apfvm soak --duration 30m --seed 1 --json /tmp/soak.json", status::INTERRUPTED))]
pub struct SoakArgs {
    /// How long to keep starting iterations (e.g. 10s, 30m, 1h).
    #[arg(long, allow_hyphen_values = true, value_parser = values::duration)]
    pub duration: Duration,
    /// Seed of the choice of cases (default: from the clock; printed, so a run can be
    /// repeated).
    #[arg(long, allow_hyphen_values = true)]
    pub seed: Option<u64>,
    /// Write the summary and every iteration as JSON to this file (not into a snapshot
    /// directory; checked before anything runs).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A restore not finished after this long counts as stuck: seconds or a duration (at
    /// least 1s).
    #[arg(long, default_value = "60", allow_hyphen_values = true, value_parser = values::timeout)]
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
