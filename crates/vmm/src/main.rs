//! The `apfvm` binary: parse the command line, run, report. The exit status is the guest's;
//! errors are printed with their causes and give status 125.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vmm::cli::{Cli, Command, RunArgs};
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
    };
    match result {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX)),
        Err(e) => {
            eprintln!("apfvm: error: {e:#}");
            ExitCode::from(ERROR_EXIT)
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<u32> {
    let mem_size = parse_size(&args.mem).context("--mem")?;
    let scan_bytes = args
        .scan_size
        .as_deref()
        .map(parse_size)
        .transpose()
        .context("--scan-size")?;
    let tasks = workload::build(
        &args.workload,
        WorkloadParams {
            vcpus: args.vcpus.max(1),
            ram_end: mem_size,
            scan_bytes,
            scan_passes: args.scan_passes,
            compute_ms: args.compute_ms,
        },
    )
    .context("--workload")?;
    let guest_image = match &args.guest {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read guest image {}", path.display()))?,
        None => guest_image::BUNDLED.to_vec(),
    };
    let cfg = VmConfig {
        vcpus: args.vcpus,
        mem_size,
        apf: args.apf.into(),
        guest_image,
        tasks,
        quantum_us: args.quantum_us,
        halt: args.hlt.into(),
        echo_console: true,
    };
    let timeout = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    let report = vmm::run(&cfg, timeout).with_context(|| match &args.guest {
        Some(p) => format!("running guest {}", p.display()),
        None => "running the bundled guest".to_string(),
    })?;
    if !args.quiet {
        print!("{}", report.summary());
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.exit_status)
}
