//! `apfvm demo`: one fetch latency, every mode side by side, for two guests: the mixed one
//! (per vCPU one scan over cold memory, the other tasks compute) and the concurrent one
//! (every task scans cold memory); one table each.

use std::fmt::Write as _;
use std::time::Duration;

use crate::bench::table::{latency_label, millions, p50_p99_us, ratio};
use crate::bench::{
    MEM_SIZE, Mode, Plan, Results, Row, Setup, Shape, Variants, consistency, execute,
    with_snapshots,
};
use crate::error::{Result, require_kvm};
use crate::progress::Bar;

/// What `apfvm demo` measures.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Added delay per fetch.
    pub fetch_latency: Duration,
    /// Repeats of every mode (interleaved).
    pub repeats: usize,
    /// Tasks per vCPU (mixed: one scan, the rest compute; concurrent: all scan).
    pub tasks_per_vcpu: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Modes, in table order.
    pub modes: Vec<Mode>,
    /// The measured window.
    pub window: Duration,
    /// Bytes each scan task reads (cold after a lazy restore).
    pub scan_per_task: u64,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a demo produced.
#[derive(Clone, Debug)]
pub struct DemoOutcome {
    /// The rows and their metadata (`--json`).
    pub results: Results,
    /// The table.
    pub table: String,
    /// Consistency problems (none in a healthy run).
    pub problems: Vec<String>,
}

/// Runs the demo.
pub fn demo(o: &DemoOptions) -> Result<DemoOutcome> {
    let setups = [Shape::Mixed, Shape::Concurrent].map(|shape| {
        let mut s = Setup {
            shape,
            vcpus: o.vcpus,
            tasks_per_vcpu: o.tasks_per_vcpu,
            scan_per_task: o.scan_per_task,
            mem_size: 0,
        };
        s.mem_size = mem_for(&s);
        s
    });
    for s in &setups {
        s.check()?;
    }
    require_kvm()?;
    let plan = Plan {
        setups: setups.to_vec(),
        latencies: vec![o.fetch_latency],
        modes: o.modes.clone(),
        repeats: o.repeats.max(1),
        window: o.window,
    };
    let rows = Bar::run(o.progress, plan.runs(), |bar| {
        with_snapshots(|snapshots| {
            execute(&plan, &Variants::default(), snapshots, |p| bar.update(p))
        })
    })?;
    let problems = consistency(&rows);
    let (mixed, concurrent): (Vec<Row>, Vec<Row>) =
        rows.iter().cloned().partition(|r| r.shape == Shape::Mixed);
    let table = format!(
        "{}\n{}",
        demo_table(o, &mixed),
        concurrent_table(o, &concurrent)
    );
    Ok(DemoOutcome {
        results: Results::new("demo", &plan, rows, None),
        table,
        problems,
    })
}

/// RAM for `setup`: the experiments' usual size, more when its scans need it (2 MiB units).
fn mem_for(setup: &Setup) -> u64 {
    let need = guest_abi::WORKLOAD_GPA + setup.scan_bytes();
    MEM_SIZE.max(need.next_multiple_of(2 << 20))
}

#[allow(clippy::cast_precision_loss)]
fn fallbacks(r: &Row) -> String {
    if r.sync_fallbacks_by_reason.is_empty() {
        return "-".into();
    }
    let per_run = |n: u64| n as f64 / r.repeats.max(1) as f64;
    r.sync_fallbacks_by_reason
        .iter()
        .map(|(k, n)| format!("{} {:.1}", k.name(), per_run(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The demo's table.
pub fn demo_table(o: &DemoOptions, rows: &[Row]) -> String {
    let mut s = String::new();
    let compute = o.tasks_per_vcpu.saturating_sub(1);
    let _ = writeln!(
        s,
        "apfvm demo: {} vCPU × ({} compute task{} + 1 scan of {} MiB cold memory), fetch latency {} per 64 KiB chunk; median of {} interleaved restores per mode",
        o.vcpus,
        compute,
        if compute == 1 { "" } else { "s" },
        o.scan_per_task >> 20,
        latency_label(o.fetch_latency),
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
        let _ = writeln!(
            s,
            "{:<9} {:>13.1} {:>7} {:>7} {:>9.1} {:>7} {:>6} {:>15}  {}",
            r.mode.name(),
            millions(r.compute_work),
            ratio(r.work_vs_eager),
            ratio(r.work_vs_off),
            r.scan_ms,
            r.faults,
            r.apf_injected,
            p50_p99_us(r.inject_latency.as_ref(), " / "),
            fallbacks(r)
        );
    }
    let _ = writeln!(
        s,
        "modes: eager = memory resident; off = every fault stalls the vCPU (blocked in its thread, no interrupt gets in); off-halt = KVM's \"APF halt\" (interrupts get in); apf-v1/apf-v2 = userspace APF (seed / modern protocol); kernel = KVM's in-kernel APF. fault→APF = uffd message → #PF injected, p50 / p99. Every scan's checksum was verified."
    );
    s
}

/// The concurrent guest's table: how soon every scan is done, side by side.
pub fn concurrent_table(o: &DemoOptions, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "apfvm demo, concurrent: {} vCPU × {} tasks, each scanning {} MiB of cold memory, fetch latency {} per 64 KiB chunk; median of {} interleaved restores per mode",
        o.vcpus,
        o.tasks_per_vcpu,
        o.scan_per_task >> 20,
        latency_label(o.fetch_latency),
        o.repeats.max(1)
    );
    let _ = writeln!(
        s,
        "scan = restore → every scan done; ×off, ×kernel = how much sooner than off, kernel (their scan ms over this one's)"
    );
    let _ = writeln!(
        s,
        "{:<9} {:>9} {:>7} {:>8} {:>7} {:>6} {:>15} {:>15}  sync fallbacks/run",
        "mode", "scan ms", "×off", "×kernel", "faults", "APFs", "fault→APF µs", "ready µs",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<9} {:>9.1} {:>7} {:>8} {:>7} {:>6} {:>15} {:>15}  {}",
            r.mode.name(),
            r.scan_ms,
            ratio(r.scan_vs_off),
            ratio(r.scan_vs_kernel),
            r.faults,
            r.apf_injected,
            p50_p99_us(r.inject_latency.as_ref(), " / "),
            p50_p99_us(r.ready_latency.as_ref(), " / "),
            fallbacks(r)
        );
    }
    let _ = writeln!(
        s,
        "ready = page mapped → its page-ready handed out, p50 / p99 (userspace APF). short_wait = faults the adaptive policy left to wait because the page was due sooner than an APF costs."
    );
    s
}

#[cfg(test)]
mod tests {
    use pager::LatencySummary;

    use super::*;
    use crate::bench::{Memory, Point, Sample};

    #[test]
    fn the_table_keeps_its_columns() {
        let o = DemoOptions {
            fetch_latency: Duration::from_millis(1),
            repeats: 3,
            tasks_per_vcpu: 4,
            vcpus: 1,
            modes: Mode::CLASSIC.to_vec(),
            window: Duration::from_millis(250),
            scan_per_task: 4 << 20,
            progress: false,
        };
        let point = Point {
            setup: Setup {
                shape: Shape::Mixed,
                vcpus: 1,
                tasks_per_vcpu: 4,
                scan_per_task: 4 << 20,
                mem_size: MEM_SIZE,
            },
            mode: Mode::ApfV1,
            fetch_latency: o.fetch_latency,
        };
        let s = Sample {
            compute_work: 124_300_000,
            scan_ms: 122.1,
            faults: 64,
            apf_injected: 64,
            inject_latency: Some(LatencySummary {
                count: 64,
                p50_ns: 34_000,
                p99_ns: 80_000,
                ..LatencySummary::default()
            }),
            ..Sample::default()
        };
        let t = demo_table(&o, &[Row::new(&point, Memory::FILE, vec![s])]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "apfvm demo: 1 vCPU × (3 compute tasks + 1 scan of 4 MiB cold memory), fetch latency 1 ms per 64 KiB chunk; median of 3 interleaved restores per mode"
        );
        assert_eq!(
            lines[2],
            "mode        work (M it)  ×eager    ×off   scan ms  faults   APFs    fault→APF µs  sync fallbacks/run"
        );
        assert_eq!(
            lines[3],
            "apf-v1            124.3       -       -     122.1      64     64         34 / 80  -"
        );
    }
}
