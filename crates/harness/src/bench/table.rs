//! The bench's text table, one line per row, and the formats it shares with the demo's.

use std::fmt::Write as _;
use std::time::Duration;

use pager::LatencySummary;

use super::row::Row;

/// A fetch latency as the tables and the plot write it: `0`, `100 µs`, `5 ms`.
pub fn latency_label(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        "0".into()
    } else if us.is_multiple_of(1000) {
        format!("{} ms", us / 1000)
    } else {
        format!("{us} µs")
    }
}

/// A ratio as `1.23×`, `-` for none.
pub fn ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.2}×"))
}

/// p50 and p99 in µs, `sep` between them, `-` for none.
#[allow(clippy::cast_precision_loss)]
pub fn p50_p99_us(l: Option<&LatencySummary>, sep: &str) -> String {
    l.map_or_else(
        || "-".into(),
        |l| {
            format!(
                "{:.0}{sep}{:.0}",
                l.p50_ns as f64 / 1e3,
                l.p99_ns as f64 / 1e3
            )
        },
    )
}

/// Millions, one decimal.
#[allow(clippy::cast_precision_loss)]
pub fn millions(n: u64) -> f64 {
    n as f64 / 1e6
}

/// One line per row, grouped by setup and latency.
pub fn bench_table(rows: &[Row], window: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "work = compute iterations (M) in the first {} ms, median [min..max]; scan = ms to every scan done",
        window.as_millis()
    );
    let _ = writeln!(
        s,
        "{:<10} {:>4} {:>4} {:>7} {:<8} {:<14} {:>22} {:>7} {:>7} {:>8} {:>6} {:>8} {:>6} {:>5} {:>5} {:>11} {:>8} {:>9}",
        "workload",
        "vcpu",
        "tpv",
        "latency",
        "mode",
        "memory",
        "work (M) [min..max]",
        "×eager",
        "×off",
        "scan ms",
        "s×off",
        "s×kernel",
        "faults",
        "APFs",
        "sync",
        "p50/p99 µs",
        "prefetch",
        "resident"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<10} {:>4} {:>4} {:>7} {:<8} {:<14} {:>22} {:>7} {:>7} {:>8.1} {:>6} {:>8} {:>6} {:>5} {:>5} {:>11} {:>8} {:>9}",
            r.shape.name(),
            r.vcpus,
            r.tasks_per_vcpu,
            latency_label(Duration::from_micros(r.fetch_latency_us)),
            r.mode.name(),
            r.memory().label(),
            format!(
                "{:.1} [{:.1}..{:.1}]",
                millions(r.compute_work),
                millions(r.compute_work_min),
                millions(r.compute_work_max)
            ),
            ratio(r.work_vs_eager),
            ratio(r.work_vs_off),
            r.scan_ms,
            ratio(r.scan_vs_off),
            ratio(r.scan_vs_kernel),
            r.faults,
            r.apf_injected,
            r.sync_fallbacks,
            p50_p99_us(r.inject_latency.as_ref(), "/"),
            r.prefetched_pages,
            r.resident_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms"))
        );
    }
    let _ = writeln!(
        s,
        "workload = mixed (one scan per vCPU, the other tasks compute) or concurrent (every task scans); s×off, s×kernel = scans done that much sooner than off's, kernel's with the same memory; memory = source (file: the snapshot's memory file; nbd: qemu-nbd serving it on a unix socket) + prefetch policy; ×off = over off with the same memory; prefetch = pages prefetched before any fault; resident = every lazily served page present (\"resident at\")"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_and_ratios_read_as_in_the_docs() {
        assert_eq!(latency_label(Duration::ZERO), "0");
        assert_eq!(latency_label(Duration::from_micros(100)), "100 µs");
        assert_eq!(latency_label(Duration::from_millis(5)), "5 ms");
        assert_eq!(ratio(Some(1.5)), "1.50×");
        assert_eq!(ratio(None), "-");
        let l = LatencySummary {
            p50_ns: 34_400,
            p99_ns: 80_000,
            ..LatencySummary::default()
        };
        assert_eq!(p50_p99_us(Some(&l), " / "), "34 / 80");
    }
}
