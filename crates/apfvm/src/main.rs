//! The `apfvm` binary: parse the command line, catch SIGUSR1 for the commands that
//! snapshot, set up logging, run the command, exit with its status. Errors (bad arguments
//! included) are printed with their causes and give status 125; `--help` and `--version`
//! exit 0. The statuses are in [`status`].

mod arg_enums;
mod cli;
mod experiments;
mod output;
mod status;
mod values;
mod verdict;
mod vm;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version on stdout with status 0; every usage error with 125.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { status::ERROR } else { 0 });
        }
    };
    // Before anything slow: a SIGUSR1 from now on asks for the snapshot (issue 14 item 5);
    // one that came while the guest boots is acted on at its first instant.
    let sigusr1 = if cli.command.snapshots() {
        match catch_sigusr1() {
            Ok(flag) => Some(flag),
            Err(e) => return fail(&e),
        }
    } else {
        None
    };
    init_logging(cli.log.as_deref());
    let result = match &cli.command {
        Command::Run(args) => vm::run(args),
        Command::Snapshot(args) => vm::snapshot(args, sigusr1),
        Command::Restore(args) => vm::restore(args, sigusr1),
        Command::Demo(args) => experiments::demo(args),
        Command::Bench(args) => experiments::bench(args),
        Command::BenchClones(args) => experiments::bench_clones(args),
        Command::Soak(args) => experiments::soak(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("apfvm: error: {e:#}");
    let interrupted = e
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(vmm::VmmError::Interrupted)));
    ExitCode::from(if interrupted {
        status::INTERRUPTED
    } else {
        status::ERROR
    })
}

/// SIGUSR1 as a flag the run polls.
fn catch_sigusr1() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&flag))
        .map_err(|e| anyhow::anyhow!("catching SIGUSR1: {e}"))?;
    Ok(flag)
}

/// Logs on stderr, filtered by `--log`, else `RUST_LOG`, else warnings only.
fn init_logging(filter: Option<&str>) {
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter.unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
}
