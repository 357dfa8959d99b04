//! The `apfvm` binary: parse the command line, run, report. The exit status is the guest's;
//! errors are printed with their causes and give status 125.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vmm::cli::{
    BenchArgs, Cli, Command, DemoArgs, RestoreApf, RestoreArgs, RunArgs, SnapshotArgs, SoakArgs,
};
use vmm::layout::parse_size;
use vmm::workload::{self, WorkloadParams};
use vmm::{VmConfig, guest_image};

/// Exit status when apfvm itself fails (bad option, bad image, dead guest, no KVM), distinct
/// from the small statuses a guest reports.
const ERROR_EXIT: u8 = 125;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log {
        Some(f) => EnvFilter::try_new(f),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter.unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Snapshot(args) => snapshot(&args),
        Command::Restore(args) => restore(&args),
        Command::Demo(args) => demo(&args),
        Command::Bench(args) => bench(&args),
        Command::Soak(args) => soak(&args),
    };
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX)),
        Err(e) => {
            eprintln!("apfvm: error: {e:#}");
            ExitCode::from(ERROR_EXIT)
        }
    }
}

fn duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    pager::parse_duration(s)
        .with_context(|| format!("{what} {s:?}: expected e.g. 200ms, 100us, 1.5s"))
}

fn output(
    report: &vmm::RunReport,
    quiet: bool,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if !quiet {
        print!("{}", report.summary());
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report).context("serializing the report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn snapshot(args: &SnapshotArgs) -> anyhow::Result<u32> {
    let at = args
        .at
        .as_deref()
        .map(|s| duration("--at", s))
        .transpose()?;
    let mut cfg = config(&args.run, true)?;
    cfg.echo_console = !args.run.quiet;
    let opts = vmm::RunOptions {
        timeout: (args.run.timeout > 0).then(|| Duration::from_secs(args.run.timeout)),
        snapshot: Some(vmm::SnapshotPlan {
            out: args.out.clone(),
            on_guest_request: !args.no_guest_request,
            at,
            on_sigusr1: true,
        }),
        window: None,
    };
    let report = vmm::run_with(&cfg, &opts).context("taking a snapshot")?;
    output(&report, args.run.quiet, args.run.json.as_deref())?;
    println!("apfvm: snapshot written to {}", args.out.display());
    let (serve, url) = vmm::lazy::qemu_nbd_command(&args.out);
    println!("apfvm: serve its memory over NBD with: {serve}");
    println!(
        "apfvm:   then: apfvm restore {} --lazy --memory-source '{url}'",
        args.out.display()
    );
    Ok(0)
}

fn restore(args: &RestoreArgs) -> anyhow::Result<u32> {
    let fetch_latency: pager::FetchLatency =
        args.fetch_latency.parse().context("--fetch-latency")?;
    let snapshot_at = args
        .snapshot_at
        .as_deref()
        .map(|s| duration("--snapshot-at", s))
        .transpose()?;
    let opts = vmm::restore::RestoreOptions {
        dir: args.dir.clone(),
        lazy: args.lazy,
        apf: match args.apf {
            RestoreApf::On => vmm::restore::ApfPath::Userspace,
            RestoreApf::Off => vmm::restore::ApfPath::Off,
            RestoreApf::OffHalt => vmm::restore::ApfPath::OffHalt,
            RestoreApf::Kernel => vmm::restore::ApfPath::Kernel,
        },
        fetch_latency,
        timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
        echo_console: !args.quiet,
        snapshot: args.snapshot_out.as_ref().map(|out| vmm::SnapshotPlan {
            out: out.clone(),
            on_guest_request: snapshot_at.is_none(),
            at: snapshot_at,
            on_sigusr1: true,
        }),
        window: None,
        apf_max_outstanding: args.apf_max_outstanding,
    };
    let source = vmm::lazy::SourceOptions {
        memory_source: args.memory_source.clone(),
        deadline: duration("--source-deadline", &args.source_deadline)?,
        prefetch: args.prefetch.parse().context("--prefetch")?,
    };
    let report = vmm::restore::restore_with(&opts, &source)
        .with_context(|| format!("restoring {}", args.dir.display()))?;
    output(&report, args.quiet, args.json.as_deref())?;
    if let Some(out) = &args.snapshot_out {
        println!("apfvm: snapshot written to {}", out.display());
    }
    Ok(report.exit_status)
}

fn config(args: &RunArgs, snapshot: bool) -> anyhow::Result<VmConfig> {
    let mem_size = parse_size(&args.mem).context("--mem")?;
    // The memory size first: a workload that cannot fit in a wrong size says less.
    vmm::layout::check_ram_size(mem_size).context("--mem")?;
    let scan_bytes = args
        .scan_size
        .as_deref()
        .map(parse_size)
        .transpose()
        .context("--scan-size")?;
    let mut tasks = workload::build(
        &args.workload,
        WorkloadParams {
            vcpus: args.vcpus.max(1),
            ram_end: mem_size,
            scan_bytes,
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
        mem_size,
        apf: args.apf.into(),
        guest_image,
        tasks,
        quantum_us: args.quantum_us,
        halt: args.hlt.into(),
        echo_console: true,
    })
}

fn run(args: &RunArgs) -> anyhow::Result<u32> {
    let cfg = config(args, false)?;
    let timeout = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    let report = vmm::run(&cfg, timeout).with_context(|| match &args.guest {
        Some(p) => format!("running guest {}", p.display()),
        None => "running the bundled guest".to_string(),
    })?;
    output(&report, args.quiet, args.json.as_deref())?;
    Ok(report.exit_status)
}

fn demo(args: &DemoArgs) -> anyhow::Result<u32> {
    let fetch_latency = duration("--fetch-latency", &args.fetch_latency)?;
    let window = duration("--window", &args.window)?;
    let scan_per_vcpu = parse_size(&args.scan_size).context("--scan-size")?;
    let table = vmm::demo::demo(&vmm::demo::DemoOptions {
        fetch_latency,
        repeats: args.repeats,
        tasks_per_vcpu: args.tasks_per_vcpu,
        vcpus: args.vcpus,
        modes: args.modes.clone(),
        window,
        scan_per_vcpu,
        json: args.json.clone(),
        progress: !args.no_progress,
    })
    .context("apfvm demo")?;
    print!("{table}");
    Ok(0)
}

fn bench(args: &BenchArgs) -> anyhow::Result<u32> {
    let window = duration("--window", &args.window)?;
    let table = vmm::demo::bench(&vmm::demo::BenchOptions {
        json: args.json.clone(),
        plot: args.plot.clone(),
        quick: args.quick,
        repeats: args.repeats,
        modes: args.modes.clone(),
        window,
        progress: !args.no_progress,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        sources: args.sources.clone(),
        prefetch: args.prefetch.clone(),
        sources_latencies: args
            .sources_latencies
            .iter()
            .map(|s| duration("--sources-latencies", s))
            .collect::<anyhow::Result<_>>()?,
        sources_modes: args.sources_modes.clone(),
    })
    .context("apfvm bench")?;
    print!("{table}");
    println!("apfvm: results written to {}", args.json.display());
    if let Some(p) = &args.plot {
        println!("apfvm: plot written to {}", p.display());
    }
    Ok(0)
}

fn soak(args: &SoakArgs) -> anyhow::Result<u32> {
    let duration = vmm::soak::parse_duration(&args.duration)
        .with_context(|| format!("--duration {:?}: expected e.g. 10s, 30m, 1h", args.duration))?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let report = vmm::soak::soak(&vmm::soak::SoakOptions {
        duration,
        seed,
        restore_timeout: Duration::from_secs(args.timeout.max(1)),
        json: args.json.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    })
    .context("apfvm soak")?;
    print!("{}", report.summary.text());
    if let Some(p) = &args.json {
        println!("apfvm: results written to {}", p.display());
    }
    Ok(u32::from(!report.summary.passed))
}
