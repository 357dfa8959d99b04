//! `apfvm bench`: the sweep (latency × tasks per vCPU × vCPUs × modes, plus the memory
//! rows), its JSON results, its plot and its table.

use std::time::Duration;

use pager::Prefetch;

use super::consistency::consistency;
use super::execute::execute;
use super::json::{MemoryRows, Results};
use super::mode::{Mode, Source};
use super::plan::{Plan, Variants};
use super::plot::{plot, plotted_setup};
use super::setup::{CONCURRENT_TASKS, MEM_SIZE, SCAN_PER_TASK, Setup, Shape};
use super::table::bench_table;
use crate::error::{Result, require_kvm};
use crate::progress::Bar;
use crate::qemu_nbd;

/// `apfvm bench` options.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Draw the plot.
    pub plot: bool,
    /// The reduced sweep (CI).
    pub quick: bool,
    /// Repeats per point (default 3, 1 with `quick`).
    pub repeats: Option<usize>,
    /// Modes (default: [`Mode::MAIN`]).
    pub modes: Vec<Mode>,
    /// The measured window of the full sweep (`quick` uses 150 ms).
    pub window: Duration,
    /// Show a progress bar.
    pub progress: bool,
    /// The command line, for the metadata.
    pub command: String,
    /// Memory sources of the extra rows (`file`, `nbd`; with `prefetch`).
    pub sources: Vec<Source>,
    /// Prefetch policies of the extra rows.
    pub prefetch: Vec<Prefetch>,
    /// Fetch latencies at which the extra rows are measured.
    pub sources_latencies: Vec<Duration>,
    /// Modes the extra rows are measured for.
    pub sources_modes: Vec<Mode>,
}

/// What a bench produced.
#[derive(Clone, Debug)]
pub struct BenchOutcome {
    /// The results (`--json`).
    pub results: Results,
    /// The plot (an SVG document), when asked for.
    pub svg: Option<String>,
    /// The table.
    pub table: String,
    /// Why the NBD rows were left out (printed on stderr as it happens too).
    pub nbd_skipped: Option<String>,
    /// Consistency problems (none in a healthy run).
    pub problems: Vec<String>,
}

/// The extra rows of a bench: `sources` × `prefetch` (less file/none, the plain rows) at
/// `sources_latencies` for `sources_modes`.
pub fn bench_variants(o: &BenchOptions) -> Variants {
    Variants::new(
        &o.sources,
        &o.prefetch,
        o.sources_latencies.clone(),
        o.sources_modes.clone(),
    )
}

/// The sweep a bench runs.
pub fn bench_plan(o: &BenchOptions) -> Plan {
    let ms = Duration::from_millis;
    let (latencies, tpv, vcpus): (Vec<Duration>, Vec<u32>, Vec<u32>) = if o.quick {
        (vec![Duration::ZERO, ms(1)], vec![1, 4], vec![1])
    } else {
        (
            vec![
                Duration::ZERO,
                Duration::from_micros(100),
                ms(1),
                ms(2),
                ms(5),
            ],
            vec![1, 2, 4, 8],
            vec![1, 2],
        )
    };
    let scan = if o.quick { 2 << 20 } else { SCAN_PER_TASK };
    // Mixed: every vCPU count × tasks per vCPU. Concurrent (every task scans): 4 tasks per
    // vCPU, each scanning as much as a mixed guest's one scan.
    let mut setups: Vec<Setup> = vcpus
        .iter()
        .flat_map(|&v| {
            tpv.iter().map(move |&t| Setup {
                shape: Shape::Mixed,
                vcpus: v,
                tasks_per_vcpu: t,
                scan_per_task: scan,
                mem_size: MEM_SIZE,
            })
        })
        .collect();
    setups.extend(vcpus.iter().map(|&v| Setup {
        shape: Shape::Concurrent,
        vcpus: v,
        tasks_per_vcpu: CONCURRENT_TASKS,
        scan_per_task: scan,
        mem_size: MEM_SIZE,
    }));
    Plan {
        setups,
        latencies,
        modes: o.modes.clone(),
        repeats: o.repeats.unwrap_or(if o.quick { 1 } else { 3 }).max(1),
        window: if o.quick { ms(150) } else { o.window },
    }
}

/// Runs the sweep; returns the results, the plot, the table and the problems found.
pub fn bench(o: &BenchOptions) -> Result<BenchOutcome> {
    require_kvm()?;
    let plan = bench_plan(o);
    let mut variants = bench_variants(o);
    let mut nbd_skipped = None;
    if variants.uses_nbd() && !qemu_nbd::available() {
        let line = "apfvm bench: qemu-nbd not found (Debian: qemu-utils): NBD rows skipped";
        eprintln!("{line}");
        nbd_skipped = Some(line.to_string());
        variants = variants.without_nbd();
    }
    let rows = Bar::run(o.progress, plan.runs() + variants.runs(&plan), |bar| {
        super::with_snapshots(|snapshots| execute(&plan, &variants, snapshots, |p| bar.update(p)))
    })?;
    let svg = match (o.plot, plotted_setup(&rows)) {
        (true, Some((v, t))) => Some(plot(&rows, v, t)?),
        _ => None,
    };
    let table = bench_table(&rows, plan.window);
    let problems = consistency(&rows);
    let results = Results::new(
        o.command.clone(),
        &plan,
        rows,
        Some(MemoryRows::new(&variants, nbd_skipped.clone())),
    );
    Ok(BenchOutcome {
        results,
        svg,
        table,
        nbd_skipped,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::mode::PREFETCH_ALL;

    fn options(quick: bool) -> BenchOptions {
        BenchOptions {
            plot: false,
            quick,
            repeats: None,
            modes: Mode::MAIN.to_vec(),
            window: Duration::from_millis(250),
            progress: false,
            command: String::new(),
            sources: Source::ALL.to_vec(),
            prefetch: PREFETCH_ALL.to_vec(),
            sources_latencies: vec![Duration::from_millis(1)],
            sources_modes: vec![Mode::Off, Mode::ApfV1, Mode::ApfV2],
        }
    }

    #[test]
    fn the_quick_sweep_is_small_and_the_full_one_is_the_documented_one() {
        let quick = bench_plan(&options(true));
        assert_eq!(
            (quick.runs(), quick.repeats, quick.window),
            (30, 1, Duration::from_millis(150))
        );
        // The memory rows: at 1 ms, for off, apf-v1 and apf-v2, three setups, 5 memories.
        assert_eq!(bench_variants(&options(true)).runs(&quick), 45);
        let full = bench_plan(&options(false));
        assert_eq!(
            (full.setups.len(), full.latencies.len(), full.repeats),
            (10, 5, 3)
        );
        let concurrent: Vec<&Setup> = full
            .setups
            .iter()
            .filter(|s| s.shape == Shape::Concurrent)
            .collect();
        assert_eq!(concurrent.len(), 2);
        assert!(
            concurrent.iter().all(|s| s.check().is_ok()),
            "{concurrent:?}"
        );
    }
}
