//! `apfvm bench-clones`: N clones of one snapshot sharing one page cache against one plain
//! lazy restore of the same snapshot, from the same memory source, in one run, interleaved
//! over the repeats: bytes read from the source, the guests' host memory, wall time, and the
//! ratios the issue set as targets.
//!
//! ```text
//! snapshot (temporary dir, the guest booted with APF v2) ─► server (qemu-nbd or nbdkit on a unix socket, or the file)
//!   ─► per repeat: single = vmm::restore (lazy, --apf, --prefetch; its RAM measured at the end)
//!                  clones = vmm::clones::restore_clones (N clones; measured by it)
//!   ─► medians ─► ratios against the targets ─► table + JSON
//! ```
//!
//! One guest's figures: bytes = the eager part plus every chunk its pager fetched (no
//! prefetch: each fetched page is mapped, copied or found present); host memory = the RSS of
//! its RAM mapping at the end (private anonymous memory: every page it touched). Wall time
//! includes each restore's set-up (snapshot opened, VMs made, eager memory loaded).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pager::{FetchLatency, NbdUrl, Prefetch};
use vmm::clones::{CloneOptions, ClonesReport};
use vmm::host_memory::{self, MappingUsage};
use vmm::memory::GuestRam;
use vmm::source::SourceOptions;
use vmm::workload::{self, WorkloadParams};
use vmm::{ApfMode, ApfPath, HaltMode, RestoreOptions, RunObserver, RunOptions, SnapshotPlan};

use crate::bench::row::median_u64;
use crate::error::{Error, Result};
use crate::host::{Host, utc_now};
use crate::interrupt;
use crate::qemu_nbd::{Server, ServerKind};

/// Longest a boot, a restore or the clones may take.
const TIMEOUT: Duration = Duration::from_mins(5);

/// What to measure.
#[derive(Clone, Debug)]
pub struct ClonesBenchOptions {
    /// Clones restored at once.
    pub clones: u32,
    /// Guest RAM bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The workload (`--workload` syntax); its scans cover all workload memory.
    pub workload: String,
    /// The APF protocol the guest is booted with (restores use userspace APF).
    pub apf: ApfMode,
    /// Who turns missing pages into APFs, in both restores.
    pub apf_path: ApfPath,
    /// Added delay per 64 KiB fetch.
    pub fetch_latency: Duration,
    /// The pager's prefetch policy, in both restores.
    pub prefetch: Prefetch,
    /// The NBD server of the memory file (`None`: the snapshot's file itself).
    pub server: Option<ServerKind>,
    /// Repeats (medians are reported).
    pub repeats: usize,
    /// The command line, for the JSON.
    pub command: String,
}

/// One restore's (or one set of clones') figures.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Figures {
    /// Bytes read from the memory source.
    pub source_bytes: u64,
    /// Host memory of the guest RAM: one guest's RSS; the clones' cache + written pages.
    pub host_bytes: u64,
    /// PSS of the guest RAM mappings (summed over the clones).
    pub pss_bytes: u64,
    /// Pages the guests wrote (anonymous; for one guest: all of its RAM is anonymous).
    pub private_bytes: u64,
    /// Start of the restore to the last guest done, µs.
    pub wall_us: u64,
}

/// A measured ratio and its target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Target {
    /// What is compared.
    pub what: &'static str,
    /// Measured.
    pub ratio: f64,
    /// At most this.
    pub at_most: f64,
    /// Met.
    pub met: bool,
}

/// The results, as written to `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClonesBenchResults {
    /// The command line.
    pub command: String,
    /// When it ended (UTC).
    pub date: String,
    /// Where it ran.
    pub machine: Host,
    /// Clones.
    pub clones: u32,
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The workload.
    pub workload: String,
    /// Fetch latency, µs.
    pub fetch_latency_us: u64,
    /// The APF path of both restores.
    pub apf_path: ApfPath,
    /// The prefetch policy of both restores.
    pub prefetch: Prefetch,
    /// Where memory came from.
    pub source: String,
    /// Repeats.
    pub repeats: usize,
    /// One plain lazy restore (medians).
    pub single: Figures,
    /// The clones (medians).
    pub clones_run: Figures,
    /// Every repeat: (single, clones).
    pub samples: Vec<(Figures, Figures)>,
    /// The clones' ratios against the targets.
    pub targets: Vec<Target>,
}

/// Measures the RAM of a plain restore when its vCPUs have stopped.
#[derive(Default)]
struct RamMeter(Option<MappingUsage>);

impl RunObserver for RamMeter {
    fn finish(&mut self, ram: &GuestRam, _: Duration) {
        self.0 = host_memory::ram_usage(ram).ok();
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Boots the guest and snapshots it into `out` after its scans' fill pass.
fn snapshot(o: &ClonesBenchOptions, out: &Path) -> Result<()> {
    let mut tasks = workload::build(
        &o.workload,
        WorkloadParams {
            vcpus: o.vcpus,
            mem_size: o.mem,
            scan_at: None,
            scan_bytes: None,
            scan_passes: 2,
            compute_ms: 0,
        },
    )?;
    workload::request_snapshots(&mut tasks);
    let cfg = vmm::VmConfig {
        vcpus: o.vcpus,
        mem_size: o.mem,
        apf: o.apf,
        guest_image: vmm::guest_image::BUNDLED.to_vec(),
        tasks,
        quantum_us: 10_000,
        halt: HaltMode::InKernel,
    };
    vmm::boot_and_run(
        &cfg,
        &RunOptions {
            timeout: Some(TIMEOUT),
            snapshot: Some(SnapshotPlan {
                out: out.to_path_buf(),
                on_guest_request: true,
                ..SnapshotPlan::default()
            }),
            ..RunOptions::default()
        },
    )?;
    Ok(())
}

fn restore_options(dir: &Path, o: &ClonesBenchOptions, url: Option<&NbdUrl>) -> RestoreOptions {
    let mut r = RestoreOptions::new(dir);
    r.lazy = true;
    r.apf = o.apf_path;
    r.fetch_latency = FetchLatency::Fixed(o.fetch_latency);
    r.prefetch = o.prefetch;
    r.timeout = Some(TIMEOUT);
    r.interrupt = Some(std::sync::Arc::clone(interrupt::flag()));
    r.source = SourceOptions {
        nbd: url.cloned(),
        ..SourceOptions::default()
    };
    r
}

/// What is wrong with the memory a guest read (empty: nothing).
fn check(run: &vmm::RunReport, who: &str) -> Vec<String> {
    let mut bad = Vec::new();
    if run.exit_status != 0 {
        bad.push(format!("{who}: guest exit status {}", run.exit_status));
    }
    for t in &run.tasks {
        if t.checksum_ok == Some(false) || t.state != vmm::report::TaskState::Done {
            bad.push(format!("{who}: task {} {t:?}", t.index));
        }
    }
    bad
}

fn single(
    dir: &Path,
    o: &ClonesBenchOptions,
    url: Option<&NbdUrl>,
) -> Result<(Figures, Vec<String>)> {
    interrupt::check()?;
    let mut meter = RamMeter::default();
    let t0 = Instant::now();
    let r = vmm::restore(&restore_options(dir, o, url), &mut meter)?;
    let wall_us = micros(t0.elapsed());
    let lazy = r.lazy.as_ref().map(|l| &l.pager);
    let eager = r.restore.as_ref().map_or(0, |x| x.eager_bytes);
    let fetched = lazy.map_or(0, |p| (p.pages_copied + p.eexist) * pager::PAGE_SIZE as u64);
    let ram = meter.0.unwrap_or_default();
    let figures = Figures {
        source_bytes: eager + fetched,
        host_bytes: ram.rss_bytes,
        pss_bytes: ram.pss_bytes,
        private_bytes: ram.anonymous_bytes,
        wall_us,
    };
    Ok((figures, check(&r, "single restore")))
}

fn clones(
    dir: &Path,
    o: &ClonesBenchOptions,
    url: Option<&NbdUrl>,
) -> Result<(Figures, ClonesReport, Vec<String>)> {
    interrupt::check()?;
    let r = vmm::clones::restore_clones(
        &CloneOptions {
            restore: restore_options(dir, o, url),
            clones: o.clones,
        },
        &|_| Box::new(vmm::NoObserver),
    )?;
    let mut bad = Vec::new();
    for c in &r.clones {
        match &c.report {
            Some(run) => bad.extend(check(run, &format!("clone {}", c.index))),
            None => bad.push(format!(
                "clone {}: {}",
                c.index,
                c.error.as_deref().unwrap_or("?")
            )),
        }
    }
    let m = &r.totals.guest_memory;
    let figures = Figures {
        source_bytes: r.totals.source_bytes_fetched,
        host_bytes: m.host_bytes,
        pss_bytes: m.pss_bytes,
        private_bytes: m.private_bytes,
        wall_us: r.totals.wall_us,
    };
    Ok((figures, r, bad))
}

fn ratio(a: u64, b: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // a ratio for people
    let (a, b) = (a as f64, b as f64);
    if b == 0.0 { f64::INFINITY } else { a / b }
}

/// The issue's targets for the clones against one guest.
fn targets(single: &Figures, clones: &Figures) -> Vec<Target> {
    let t = |what, ratio: f64, at_most| Target {
        what,
        ratio,
        at_most,
        met: ratio <= at_most,
    };
    vec![
        t(
            "bytes read from the source, over one guest's",
            ratio(clones.source_bytes, single.source_bytes),
            1.1,
        ),
        t(
            "guest memory on the host less the pages the clones wrote, over one guest's",
            ratio(
                clones.host_bytes.saturating_sub(clones.private_bytes),
                single.host_bytes,
            ),
            1.5,
        ),
        t(
            "wall time to all done, over one restore's",
            ratio(clones.wall_us, single.wall_us),
            2.0,
        ),
    ]
}

fn medians(
    samples: &[(Figures, Figures)],
    pick: impl Fn(&(Figures, Figures)) -> Figures,
) -> Figures {
    let m = |f: fn(&Figures) -> u64| median_u64(samples.iter().map(|s| f(&pick(s))).collect());
    Figures {
        source_bytes: m(|f| f.source_bytes),
        host_bytes: m(|f| f.host_bytes),
        pss_bytes: m(|f| f.pss_bytes),
        private_bytes: m(|f| f.private_bytes),
        wall_us: m(|f| f.wall_us),
    }
}

/// What the bench produced: the results, the table, and what was wrong (a guest that read
/// wrong memory or failed).
#[derive(Debug)]
pub struct ClonesBenchOutcome {
    /// For `--json`.
    pub results: ClonesBenchResults,
    /// The table.
    pub table: String,
    /// Problems (empty: every guest passed).
    pub problems: Vec<String>,
}

/// Runs the bench.
pub fn bench_clones(o: &ClonesBenchOptions) -> Result<ClonesBenchOutcome> {
    crate::require_kvm()?;
    interrupt::catch()?;
    let tmp = tempfile::Builder::new()
        .prefix("apfvm-bench-clones-")
        .tempdir()
        .map_err(Error::io("creating a temporary directory"))?;
    let snap: PathBuf = tmp.path().join("snap");
    snapshot(o, &snap)?;
    let server = o
        .server
        .map(|k| {
            Server::start_kind(
                k,
                &snap.join(vmm::snapshot::format::MEMORY),
                &tmp.path().join("nbd.sock"),
            )
        })
        .transpose()?;
    let url = server.as_ref().map(Server::url);
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    let mut last = None;
    for _ in 0..o.repeats.max(1) {
        let (s, bad) = single(&snap, o, url)?;
        problems.extend(bad);
        let (c, report, bad) = clones(&snap, o, url)?;
        problems.extend(bad);
        samples.push((s, c));
        last = Some(report);
    }
    let single = medians(&samples, |s| s.0);
    let clones_run = medians(&samples, |s| s.1);
    let source = last.as_ref().map_or_else(String::new, |r| r.source.clone());
    let results = ClonesBenchResults {
        command: o.command.clone(),
        date: utc_now(),
        machine: Host::this(),
        clones: o.clones,
        mem_size: o.mem,
        vcpus: o.vcpus,
        workload: o.workload.clone(),
        fetch_latency_us: micros(o.fetch_latency),
        apf_path: o.apf_path,
        prefetch: o.prefetch,
        source,
        repeats: samples.len(),
        single,
        clones_run,
        targets: targets(&single, &clones_run),
        samples,
    };
    let table = table(&results, last.as_ref());
    drop(server);
    Ok(ClonesBenchOutcome {
        results,
        table,
        problems,
    })
}

fn mib(b: u64) -> f64 {
    ratio(b, 1 << 20)
}

fn table(r: &ClonesBenchResults, last: Option<&ClonesReport>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "apfvm bench-clones: {} clones of a {} MiB guest ({} vCPU, {}), APF path {}, fetch latency {:?} per 64 KiB chunk, prefetch {}, memory from {}; median of {} interleaved runs",
        r.clones,
        r.mem_size >> 20,
        r.vcpus,
        r.workload,
        r.apf_path,
        Duration::from_micros(r.fetch_latency_us),
        r.prefetch,
        r.source,
        r.repeats
    );
    let _ = writeln!(
        s,
        "{:<14} {:>12} {:>14} {:>12} {:>14} {:>10}",
        "", "source MiB", "host mem MiB", "PSS MiB", "written MiB", "wall ms"
    );
    for (name, f) in [
        ("one restore", &r.single),
        (&*format!("{} clones", r.clones), &r.clones_run),
    ] {
        let _ = writeln!(
            s,
            "{:<14} {:>12.1} {:>14.1} {:>12.1} {:>14.1} {:>10.1}",
            name,
            mib(f.source_bytes),
            mib(f.host_bytes),
            mib(f.pss_bytes),
            mib(f.private_bytes),
            ratio(f.wall_us, 1000)
        );
    }
    for t in &r.targets {
        let _ = writeln!(
            s,
            "target: {}: {:.2}× (at most {:.1}×) {}",
            t.what,
            t.ratio,
            t.at_most,
            if t.met { "met" } else { "MISSED" }
        );
    }
    if let Some(l) = last {
        let _ = writeln!(s, "last run's clones:");
        s.push_str(&l.summary());
    }
    s
}
