//! `apfvm demo`, `bench` and `soak`: the options handed to the harness, its results written
//! where they were asked for, the exit status.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use harness::demo::DemoOptions;
use harness::soak::{SoakEvent, SoakOptions, Verdict};

use crate::cli::{BenchArgs, BenchClonesArgs, DemoArgs, SoakArgs};
use crate::output::ReportFile;
use crate::status;

fn inconsistent(problems: &[String]) -> anyhow::Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("inconsistent results:\n  {}", problems.join("\n  "))
    }
}

fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `apfvm demo`: 0, or an error (inconsistent results included).
pub fn demo(args: &DemoArgs) -> anyhow::Result<u8> {
    let json = args
        .json
        .as_deref()
        .map(|p| ReportFile::create("--json", p, &[]))
        .transpose()?;
    let out = harness::demo::demo(&DemoOptions {
        fetch_latency: args.fetch_latency,
        repeats: count(args.repeats),
        tasks_per_vcpu: args.tasks_per_vcpu,
        vcpus: args.vcpus,
        modes: args.modes.clone(),
        window: args.window,
        scan_per_task: args.scan_size,
        progress: !args.no_progress,
    })
    .context("apfvm demo")?;
    if let Some(f) = json {
        f.write_json(&out.results)?;
    }
    print!("{}", out.table);
    inconsistent(&out.problems)?;
    Ok(0)
}

/// `apfvm bench`: 0, or an error (inconsistent results included).
pub fn bench(args: &BenchArgs) -> anyhow::Result<u8> {
    let json = ReportFile::create("--json", &args.json, &[])?;
    let plot = args
        .plot
        .as_deref()
        .map(|p| ReportFile::create("--plot", p, &[]))
        .transpose()?;
    let out = harness::bench::bench(&harness::bench::BenchOptions {
        plot: plot.is_some(),
        quick: args.quick,
        repeats: args.repeats.map(count),
        modes: args.modes.clone(),
        window: args.window,
        progress: !args.no_progress,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        sources: args.sources.clone(),
        prefetch: args.prefetch.clone(),
        sources_latencies: args.sources_latencies.clone(),
        sources_modes: args.sources_modes.clone(),
    })
    .context("apfvm bench")?;
    json.write_json(&out.results)?;
    let plotted = match (plot, &out.svg) {
        (Some(f), Some(svg)) => {
            let path = f.path().to_path_buf();
            f.write(svg.as_bytes())?;
            Some(path)
        }
        _ => None,
    };
    print!("{}", out.table);
    println!("apfvm: results written to {}", args.json.display());
    if let Some(p) = plotted {
        println!("apfvm: plot written to {}", p.display());
    }
    inconsistent(&out.problems)?;
    Ok(0)
}

/// `apfvm bench-clones`: 0, or an error (a guest that failed or read wrong memory included;
/// a missed target is reported, not an error).
pub fn bench_clones(args: &BenchClonesArgs) -> anyhow::Result<u8> {
    let json = args
        .json
        .as_deref()
        .map(|p| ReportFile::create("--json", p, &[]))
        .transpose()?;
    let out = harness::clones::bench_clones(&harness::clones::ClonesBenchOptions {
        clones: args.clones,
        mem: args.mem,
        vcpus: args.vcpus,
        workload: args.workload.clone(),
        apf: vmm::ApfMode::V2,
        apf_path: args.apf.into(),
        fetch_latency: args.fetch_latency,
        prefetch: args.prefetch,
        server: args.server.kind(),
        repeats: count(args.repeats),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    })
    .context("apfvm bench-clones")?;
    print!("{}", out.table);
    if let Some(f) = json {
        let path = f.path().to_path_buf();
        f.write_json(&out.results)?;
        println!("apfvm: results written to {}", path.display());
    }
    inconsistent(&out.problems)?;
    Ok(0)
}

/// `apfvm soak`: 0 (PASS), 1 (FAIL) or 130 (INTERRUPTED).
pub fn soak(args: &SoakArgs) -> anyhow::Result<u8> {
    let json = args
        .json
        .as_deref()
        .map(|p| ReportFile::create("--json", p, &[]))
        .transpose()?;
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let report = harness::soak::soak(
        &SoakOptions {
            duration: args.duration,
            seed,
            restore_timeout: args.timeout.max(Duration::from_secs(1)),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        },
        |event| match event {
            SoakEvent::Started(line) => println!("{line}"),
            SoakEvent::Iteration(it) => println!("{}", it.line()),
        },
    )
    .context("apfvm soak")?;
    print!("{}", report.summary.text());
    if let Some(f) = json {
        let path = f.path().to_path_buf();
        f.write_json(&report)?;
        println!("apfvm: results written to {}", path.display());
    }
    Ok(match report.summary.result {
        Verdict::Pass => 0,
        Verdict::Fail => status::SOAK_FAILED,
        Verdict::Interrupted => status::INTERRUPTED,
    })
}
