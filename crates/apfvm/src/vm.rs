//! `apfvm run`, `snapshot` and `restore`: one guest, its console, its report.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use harness::qemu_nbd::ServeCommand;
use vmm::source::SourceOptions;
use vmm::working_set::WorkingSetMode;
use vmm::workload::{self, WorkloadParams};
use vmm::{RestoreOptions, RunOptions, RunReport, SnapshotPlan, VmConfig, guest_image};

use crate::cli::{RestoreArgs, RunArgs, SnapshotArgs};
use crate::output::ReportFile;
use crate::verdict;

/// `0` means no limit.
/// SIGINT and SIGTERM as the flag that stops a run: the VM stops, a snapshot being written
/// is removed, and apfvm exits with [`crate::status::INTERRUPTED`].
fn interrupt() -> anyhow::Result<Arc<AtomicBool>> {
    harness::interrupt::catch()?;
    Ok(Arc::clone(harness::interrupt::flag()))
}

fn limit(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// The `--json` file of a command, checked and opened before anything runs.
fn json_file(path: Option<&Path>, snapshots: &[&Path]) -> anyhow::Result<Option<ReportFile>> {
    path.map(|p| ReportFile::create("--json", p, snapshots))
        .transpose()
}

/// Prints the summary (unless `quiet`) and writes the JSON report.
fn output(report: &RunReport, quiet: bool, json: Option<ReportFile>) -> anyhow::Result<()> {
    if !quiet {
        print!("{}", report.summary());
    }
    if let Some(f) = json {
        f.write_json(report)?;
    }
    Ok(())
}

/// The machine `args` describe; with `snapshot`, the scans ask for one after their fill
/// pass (and run at least 2 passes).
fn config(args: &RunArgs, snapshot: bool) -> anyhow::Result<VmConfig> {
    let mut tasks = workload::build(
        &args.workload,
        WorkloadParams {
            vcpus: args.vcpus,
            mem_size: args.mem,
            scan_at: args.scan_at,
            scan_bytes: args.scan_size,
            scan_passes: if snapshot {
                args.scan_passes.max(2)
            } else {
                args.scan_passes
            },
            compute_ms: args.compute_ms,
        },
    )
    .context("--workload")?;
    if snapshot {
        workload::request_snapshots(&mut tasks);
    }
    let guest_image = match &args.guest {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read guest image {}", path.display()))?,
        None => guest_image::BUNDLED.to_vec(),
    };
    Ok(VmConfig {
        vcpus: args.vcpus,
        mem_size: args.mem,
        apf: args.apf.into(),
        guest_image,
        tasks,
        quantum_us: args.quantum_us,
        halt: args.hlt.into(),
    })
}

/// `apfvm run`: the guest's status, or [`crate::status::CHECK_FAILED`].
pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let json = json_file(args.json.as_deref(), &[])?;
    let cfg = config(args, false)?;
    let opts = RunOptions {
        timeout: limit(args.timeout),
        echo_console: true,
        interrupt: Some(interrupt()?),
        ..RunOptions::default()
    };
    let report = vmm::boot_and_run(&cfg, &opts).with_context(|| match &args.guest {
        Some(p) => format!("running guest {}", p.display()),
        None => "running the bundled guest".to_string(),
    })?;
    output(&report, args.quiet, json)?;
    Ok(verdict::exit_status(&report))
}

/// `apfvm snapshot`: 0 once it is written (and the qemu-nbd command that serves it
/// printed). `sigusr1` is raised by SIGUSR1.
pub fn snapshot(args: &SnapshotArgs, sigusr1: Option<Arc<AtomicBool>>) -> anyhow::Result<u8> {
    let out = args.out();
    let json = json_file(args.run.json.as_deref(), &[out])?;
    let cfg = config(&args.run, true)?;
    let opts = RunOptions {
        timeout: limit(args.run.timeout),
        snapshot: Some(SnapshotPlan {
            out: out.to_path_buf(),
            on_guest_request: !args.no_guest_request,
            at: args.at,
            on_flag: sigusr1,
        }),
        echo_console: !args.run.quiet,
        interrupt: Some(interrupt()?),
        ..RunOptions::default()
    };
    let report = vmm::boot_and_run(&cfg, &opts).context("taking a snapshot")?;
    output(&report, args.run.quiet, json)?;
    println!("apfvm: snapshot written to {}", out.display());
    let serve = ServeCommand::for_snapshot(out);
    println!("apfvm: serve its memory over NBD with: {}", serve.command);
    println!(
        "apfvm:   then: apfvm restore {} --lazy --memory-source '{}'",
        out.display(),
        serve.url
    );
    Ok(0)
}

/// `apfvm restore`: the guest's status, or [`crate::status::CHECK_FAILED`]; 0 when it
/// ended with a new snapshot. `sigusr1` is raised by SIGUSR1.
pub fn restore(args: &RestoreArgs, sigusr1: Option<Arc<AtomicBool>>) -> anyhow::Result<u8> {
    let mut snapshots = vec![args.dir.as_path()];
    snapshots.extend(args.snapshot_out.as_deref());
    let json = json_file(args.json.as_deref(), &snapshots)?;
    let mut opts = RestoreOptions::new(&args.dir);
    opts.lazy = args.lazy;
    opts.apf = args.apf.into();
    opts.apf_policy = args.apf_policy.into();
    opts.fetch_latency = args.fetch_latency;
    opts.prefetch = args.prefetch;
    opts.working_set = match (args.record_working_set, args.working_set) {
        (true, _) => WorkingSetMode::Record,
        (false, crate::cli::OnOff::On) => WorkingSetMode::Replay,
        (false, crate::cli::OnOff::Off) => WorkingSetMode::Ignore,
    };
    opts.source = SourceOptions {
        nbd: args.memory_source.clone(),
        deadline: args.source_deadline,
    };
    opts.timeout = limit(args.timeout);
    opts.echo_console = !args.quiet;
    opts.interrupt = Some(interrupt()?);
    opts.snapshot = args.snapshot_out.as_ref().map(|out| SnapshotPlan {
        out: out.clone(),
        on_guest_request: args.snapshot_at.is_none(),
        at: args.snapshot_at,
        on_flag: sigusr1,
    });
    opts.apf_max_outstanding = args
        .apf_max_outstanding
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if let Some(clones) = args.clones {
        return restore_clones(opts, clones, args.quiet, json);
    }
    let report = vmm::restore(&opts, &mut vmm::NoObserver)
        .with_context(|| format!("restoring {}", args.dir.display()))?;
    output(&report, args.quiet, json)?;
    if let Some(out) = &args.snapshot_out {
        println!("apfvm: snapshot written to {}", out.display());
    }
    Ok(verdict::exit_status(&report))
}

/// `apfvm restore --clones N`: 0 when every clone's guest exited 0 and passed the host's
/// checks; 125 when a clone's run ended in an error (each printed); else the first failing
/// clone's status (a guest's, or [`crate::status::CHECK_FAILED`]).
fn restore_clones(
    opts: RestoreOptions,
    clones: u32,
    quiet: bool,
    json: Option<ReportFile>,
) -> anyhow::Result<u8> {
    let dir = opts.dir.clone();
    let interrupted = opts.interrupt.clone();
    let report = vmm::clones::restore_clones(
        &vmm::clones::CloneOptions {
            restore: opts,
            clones,
        },
        &|_| Box::new(vmm::NoObserver),
    )
    .with_context(|| format!("restoring {} clones of {}", clones, dir.display()))?;
    // SIGINT/SIGTERM stopped every clone: status 130, like a single restore.
    if interrupted.is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst)) {
        return Err(vmm::VmmError::Interrupted.into());
    }
    if !quiet {
        print!("{}", report.summary());
    }
    if let Some(f) = json {
        f.write_json(&report)?;
    }
    verdict::clones_exit_status(&report)
}
