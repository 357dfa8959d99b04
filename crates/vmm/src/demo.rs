//! `apfvm demo` and `apfvm bench`: the commands over [`crate::bench`]'s shared
//! orchestration (snapshots in a temporary directory, one restore per mode, medians).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::bench::{
    self, Machine, Memory, Mode, Plan, PrefetchPolicy, Row, Setup, Snapshots, Source, Variants,
};
use crate::error::{Result, VmmError};

/// What `apfvm demo` measures.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Added delay per fetch.
    pub fetch_latency: Duration,
    /// Repeats of every mode (interleaved).
    pub repeats: usize,
    /// Tasks per vCPU (one scan, the rest compute).
    pub tasks_per_vcpu: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Modes, in table order.
    pub modes: Vec<Mode>,
    /// The measured window.
    pub window: Duration,
    /// Bytes each vCPU's scan reads (cold after a lazy restore).
    pub scan_per_vcpu: u64,
    /// Write the rows as JSON here.
    pub json: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Guest RAM of the demo and bench guests (the scans' regions lie above the first 16 MiB).
pub const MEM_SIZE: u64 = 48 << 20;
/// Default scan per vCPU.
pub const SCAN_PER_VCPU: u64 = 4 << 20;
/// Default measured window.
pub const WINDOW: Duration = Duration::from_millis(250);

fn fmt_latency(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        "0".into()
    } else if us.is_multiple_of(1000) {
        format!("{} ms", us / 1000)
    } else {
        format!("{us} µs")
    }
}

fn check_setup(vcpus: u32, tasks_per_vcpu: u32, scan_per_vcpu: u64) -> Result<()> {
    if vcpus == 0 || vcpus as usize > guest_abi::MAX_CPUS {
        return Err(VmmError::Config(format!("--vcpus {vcpus}: 1..=8")));
    }
    if tasks_per_vcpu == 0 || tasks_per_vcpu as usize * vcpus as usize > guest_abi::MAX_TASKS {
        return Err(VmmError::Config(format!(
            "--tasks-per-vcpu {tasks_per_vcpu}: at least 1, at most {} tasks in all",
            guest_abi::MAX_TASKS
        )));
    }
    if scan_per_vcpu * u64::from(vcpus) > MEM_SIZE - guest_abi::WORKLOAD_GPA {
        return Err(VmmError::Config(format!(
            "scans of {} MiB per vCPU do not fit in the guest's {} MiB of workload memory",
            scan_per_vcpu >> 20,
            (MEM_SIZE - guest_abi::WORKLOAD_GPA) >> 20
        )));
    }
    Ok(())
}

fn execute_with_bar(plan: &Plan, progress: bool) -> Result<Vec<Row>> {
    execute_variants_with_bar(plan, &Variants::default(), progress)
}

fn execute_variants_with_bar(plan: &Plan, variants: &Variants, progress: bool) -> Result<Vec<Row>> {
    bench::catch_interrupts();
    let mut snapshots = Snapshots::new()?;
    let bar = progress.then(|| bench::progress_bar(plan.runs() + variants.runs(plan)));
    let result = bench::execute_with(plan, variants, &mut snapshots, |p, m, s| {
        if let Some(bar) = &bar {
            if s.is_some() {
                bar.inc(1);
            } else {
                bar.set_message(format!(
                    "{} · {} · {} vCPU · {} tasks/vCPU · {}",
                    p.mode,
                    fmt_latency(p.fetch_latency),
                    p.setup.vcpus,
                    p.setup.tasks_per_vcpu,
                    m.label()
                ));
            }
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // `snapshots` (the temporary directory, and any qemu-nbd serving from it) is removed
    // here, on success and on error.
    drop(snapshots);
    result
}

/// Runs the demo; returns the table.
pub fn demo(o: &DemoOptions) -> Result<String> {
    bench::require_kvm()?;
    check_setup(o.vcpus, o.tasks_per_vcpu, o.scan_per_vcpu)?;
    let plan = Plan {
        setups: vec![Setup {
            vcpus: o.vcpus,
            tasks_per_vcpu: o.tasks_per_vcpu,
            scan_per_vcpu: o.scan_per_vcpu,
            mem_size: MEM_SIZE,
        }],
        latencies: vec![o.fetch_latency],
        modes: o.modes.clone(),
        repeats: o.repeats.max(1),
        window: o.window,
    };
    let rows = execute_with_bar(&plan, o.progress)?;
    let problems = bench::consistency(&rows);
    let table = demo_table(o, &rows);
    if let Some(path) = &o.json {
        write_json(path, "demo", &plan, &rows)?;
    }
    if !problems.is_empty() {
        return Err(VmmError::Bench(format!(
            "{table}inconsistent results:\n  {}",
            problems.join("\n  ")
        )));
    }
    Ok(table)
}

fn fallbacks(r: &Row) -> String {
    if r.sync_fallbacks_by_reason.is_empty() {
        return "-".into();
    }
    #[allow(clippy::cast_precision_loss)]
    let per_run = |n: u64| n as f64 / r.repeats.max(1) as f64;
    r.sync_fallbacks_by_reason
        .iter()
        .map(|(k, n)| format!("{k} {}", per_run(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.2}×"))
}

/// The demo's table.
#[allow(clippy::cast_precision_loss)]
pub fn demo_table(o: &DemoOptions, rows: &[Row]) -> String {
    let mut s = String::new();
    let compute = o.tasks_per_vcpu - 1;
    let _ = writeln!(
        s,
        "apfvm demo: {} vCPU × ({} compute task{} + 1 scan of {} MiB cold memory), fetch latency {} per 64 KiB chunk; median of {} interleaved restores per mode",
        o.vcpus,
        compute,
        if compute == 1 { "" } else { "s" },
        o.scan_per_vcpu >> 20,
        fmt_latency(o.fetch_latency),
        o.repeats.max(1)
    );
    let _ = writeln!(
        s,
        "work = compute-task loop iterations in the first {} ms after the restore; scan = restore → every scan done",
        o.window.as_millis()
    );
    let _ = writeln!(
        s,
        "{:<9} {:>13} {:>7} {:>7} {:>9} {:>7} {:>6} {:>15}  sync fallbacks/run",
        "mode", "work (M it)", "×eager", "×off", "scan ms", "faults", "APFs", "fault→APF µs",
    );
    for r in rows {
        let lat = r
            .inject_latency_us
            .map_or_else(|| "-".into(), |p| format!("{:.0} / {:.0}", p.p50, p.p99));
        let _ = writeln!(
            s,
            "{:<9} {:>13.1} {:>7} {:>7} {:>9.1} {:>7} {:>6} {:>15}  {}",
            r.mode.name(),
            r.compute_work as f64 / 1e6,
            ratio(r.work_vs_eager),
            ratio(r.work_vs_off),
            r.scan_ms,
            r.faults,
            r.apf_injected,
            lat,
            fallbacks(r)
        );
    }
    let _ = writeln!(
        s,
        "modes: eager = memory resident; off = every fault stalls the vCPU (blocked in its thread, no interrupt gets in); off-halt = KVM's \"APF halt\" (interrupts get in); apf-v1/apf-v2 = userspace APF (seed / modern protocol); kernel = KVM's in-kernel APF. fault→APF = uffd message → #PF injected, p50 / p99. Every scan's checksum was verified."
    );
    s
}

/// `apfvm bench` options.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Write the results here.
    pub json: PathBuf,
    /// Draw the plot here (SVG).
    pub plot: Option<PathBuf>,
    /// The reduced sweep (CI).
    pub quick: bool,
    /// Repeats per point (default 3, 1 with `--quick`).
    pub repeats: Option<usize>,
    /// Modes (default: eager, off, apf-v1, apf-v2, kernel).
    pub modes: Vec<Mode>,
    /// The measured window.
    pub window: Duration,
    /// Show a progress bar.
    pub progress: bool,
    /// The command line, for the metadata.
    pub command: String,
    /// Memory sources of the extra rows (`file`, `nbd`; with `prefetch`).
    pub sources: Vec<Source>,
    /// Prefetch policies of the extra rows.
    pub prefetch: Vec<PrefetchPolicy>,
    /// Fetch latencies at which the extra rows are measured.
    pub sources_latencies: Vec<Duration>,
    /// Modes the extra rows are measured for.
    pub sources_modes: Vec<Mode>,
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
            vec![Duration::ZERO, Duration::from_micros(100), ms(1), ms(5)],
            vec![1, 2, 4, 8],
            vec![1, 2],
        )
    };
    let scan = if o.quick { 2 << 20 } else { SCAN_PER_VCPU };
    let mut setups = Vec::new();
    for v in &vcpus {
        for t in &tpv {
            setups.push(Setup {
                vcpus: *v,
                tasks_per_vcpu: *t,
                scan_per_vcpu: scan,
                mem_size: MEM_SIZE,
            });
        }
    }
    Plan {
        setups,
        latencies,
        modes: o.modes.clone(),
        repeats: o.repeats.unwrap_or(if o.quick { 1 } else { 3 }).max(1),
        window: if o.quick { ms(150) } else { o.window },
    }
}

fn write_json(path: &std::path::Path, command: &str, plan: &Plan, rows: &[Row]) -> Result<()> {
    write_json_with(path, command, plan, rows, &serde_json::Value::Null)
}

fn write_json_with(
    path: &std::path::Path,
    command: &str,
    plan: &Plan,
    rows: &[Row],
    memory: &serde_json::Value,
) -> Result<()> {
    let doc = serde_json::json!({
        "memory": memory,
        "command": command,
        "date": bench::utc_now(),
        "machine": Machine::this(),
        "version": env!("CARGO_PKG_VERSION"),
        "window_ms": u64::try_from(plan.window.as_millis()).unwrap_or(u64::MAX),
        "repeats": plan.repeats,
        "setups": plan.setups,
        "workload": "per vCPU: 1 scan over cold memory (snapshot taken after its fill pass, restored guest re-reads it, checksum verified) + tasks_per_vcpu - 1 compute tasks; compute_work = their loop iterations in the window; scan_ms = restore -> every scan done",
        "runs": rows,
    });
    let text = serde_json::to_string_pretty(&doc)
        .map_err(|e| VmmError::Config(format!("serializing the results: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|err| VmmError::Os {
        what: "write the JSON results",
        err,
    })
}

/// Runs the sweep, writes the JSON (and the plot); returns a summary table.
pub fn bench(o: &BenchOptions) -> Result<String> {
    bench::require_kvm()?;
    let plan = bench_plan(o);
    let mut variants = bench_variants(o);
    let mut nbd_skipped = None;
    if variants.uses_nbd() && !bench::qemu_nbd_available() {
        let line = "apfvm bench: qemu-nbd not found (Debian: qemu-utils): NBD rows skipped";
        eprintln!("{line}");
        nbd_skipped = Some(line);
        variants = variants.without_nbd();
    }
    let rows = execute_variants_with_bar(&plan, &variants, o.progress)?;
    let memory = serde_json::json!({
        "plain_rows": "source file, prefetch none",
        "other_rows": variants.memories,
        "other_rows_at_latency_us": variants
            .latencies
            .iter()
            .map(|l| u64::try_from(l.as_micros()).unwrap_or(u64::MAX))
            .collect::<Vec<_>>(),
        "other_rows_modes": variants.modes,
        "nbd": "qemu-nbd --read-only --persistent --shared=8 --format=raw on a unix socket in the temporary directory, one per snapshot",
        "nbd_skipped": nbd_skipped,
    });
    write_json_with(&o.json, &o.command, &plan, &rows, &memory)?;
    if let Some(svg) = &o.plot {
        let (v, t) = if rows.iter().any(|r| r.vcpus == 1 && r.tasks_per_vcpu == 4) {
            (1, 4)
        } else {
            (rows[0].vcpus, rows[0].tasks_per_vcpu)
        };
        bench::plot::plot(&rows, v, t, svg)?;
    }
    let table = bench_table(&rows, plan.window);
    let problems = bench::consistency(&rows);
    if !problems.is_empty() {
        return Err(VmmError::Bench(format!(
            "{table}inconsistent results:\n  {}",
            problems.join("\n  ")
        )));
    }
    Ok(table)
}

/// One line per point, grouped by setup and latency.
#[allow(clippy::cast_precision_loss)]
pub fn bench_table(rows: &[Row], window: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "work = compute iterations (M) in the first {} ms, median [min..max]; scan = ms to every scan done",
        window.as_millis()
    );
    let _ = writeln!(
        s,
        "{:>4} {:>4} {:>7} {:<8} {:<14} {:>22} {:>7} {:>7} {:>8} {:>6} {:>5} {:>5} {:>11} {:>8} {:>9}",
        "vcpu",
        "tpv",
        "latency",
        "mode",
        "memory",
        "work (M) [min..max]",
        "×eager",
        "×off",
        "scan ms",
        "faults",
        "APFs",
        "sync",
        "p50/p99 µs",
        "prefetch",
        "resident"
    );
    for r in rows {
        let lat = r
            .inject_latency_us
            .map_or_else(|| "-".into(), |p| format!("{:.0}/{:.0}", p.p50, p.p99));
        let _ = writeln!(
            s,
            "{:>4} {:>4} {:>7} {:<8} {:<14} {:>22} {:>7} {:>7} {:>8.1} {:>6} {:>5} {:>5} {:>11} {:>8} {:>9}",
            r.vcpus,
            r.tasks_per_vcpu,
            fmt_latency(Duration::from_micros(r.fetch_latency_us)),
            r.mode.name(),
            Memory {
                source: r.source,
                prefetch: r.prefetch
            }
            .label(),
            format!(
                "{:.1} [{:.1}..{:.1}]",
                r.compute_work as f64 / 1e6,
                r.compute_work_min as f64 / 1e6,
                r.compute_work_max as f64 / 1e6
            ),
            ratio(r.work_vs_eager),
            ratio(r.work_vs_off),
            r.scan_ms,
            r.faults,
            r.apf_injected,
            r.sync_fallbacks,
            lat,
            r.prefetched_pages,
            r.resident_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms"))
        );
    }
    let _ = writeln!(
        s,
        "memory = source (file: the snapshot's memory file; nbd: qemu-nbd serving it on a unix socket) + prefetch policy; ×off = over off with the same memory; prefetch = pages prefetched before any fault; resident = every lazily served page present (\"resident at\")"
    );
    s
}
