//! A point's samples summarized: medians over the repeats, their spread, and the ratios to
//! `eager` and `off` at the same point.

use std::collections::BTreeMap;

use apf_host::FallbackReason;
use pager::{LatencySummary, Prefetch};

use super::mode::{Memory, Mode, Source};
use super::point::{Point, Sample};
use super::setup::Shape;

/// A point's samples summarized.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// `mixed` (one scan per vCPU, the other tasks compute) or `concurrent` (every task
    /// scans).
    pub shape: Shape,
    /// `eager`, `off`, `off-halt`, `apf-v1`, `apf-v2`, `kernel`.
    pub mode: Mode,
    /// Added delay per fetch, µs.
    pub fetch_latency_us: u64,
    /// Tasks per vCPU (one scan, the rest compute).
    pub tasks_per_vcpu: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Where memory came from: `file` (the snapshot's memory file) or `nbd` (`qemu-nbd`
    /// serving that file on a unix socket).
    pub source: Source,
    /// The pager's prefetch policy: `none`, `readahead` or `fill`.
    pub prefetch: Prefetch,
    /// Median compute iterations in the window.
    pub compute_work: u64,
    /// Smallest of the repeats.
    pub compute_work_min: u64,
    /// Largest of the repeats.
    pub compute_work_max: u64,
    /// Median restore → every scan done, ms.
    pub scan_ms: f64,
    /// Smallest.
    pub scan_ms_min: f64,
    /// Largest.
    pub scan_ms_max: f64,
    /// Median missing-page faults.
    pub faults: u64,
    /// Median APFs injected (not-present the guest received).
    pub apf_injected: u64,
    /// Median synchronous fallbacks (all reasons).
    pub sync_fallbacks: u64,
    /// Synchronous fallbacks by reason, summed over the repeats.
    pub sync_fallbacks_by_reason: BTreeMap<FallbackReason, u64>,
    /// uffd message → APF injected, each field the median of the repeats' (userspace APF
    /// only; `None` when no repeat injected).
    pub inject_latency: Option<LatencySummary>,
    /// Page mapped → page-ready handed out, each field the median of the repeats'.
    pub ready_latency: Option<LatencySummary>,
    /// Median guest timer ticks over the run.
    pub timer_ticks: u64,
    /// Median time to the first guest instruction, ms.
    pub setup_ms: f64,
    /// Scan tasks whose checksum was verified (the fewest over the repeats).
    pub scans_verified: u64,
    /// Median pages prefetched before any fault on them.
    pub prefetched_pages: u64,
    /// Median "resident at" over the repeats that got fully resident, ms.
    pub resident_ms: Option<f64>,
    /// Fetches retried or failed, summed over the repeats (0 in a healthy run).
    pub fetch_retries: u64,
    /// Compute work over eager's (memory file) at the same point (median over median).
    pub work_vs_eager: Option<f64>,
    /// Compute work over off's at the same point, with the same source and prefetch.
    pub work_vs_off: Option<f64>,
    /// How much faster the scans finished than eager's (memory file): eager's scan time over
    /// this one's (below 1: slower).
    pub scan_vs_eager: Option<f64>,
    /// The same against off with the same memory.
    pub scan_vs_off: Option<f64>,
    /// The same against kernel with the same memory.
    pub scan_vs_kernel: Option<f64>,
    /// Repeats.
    pub repeats: usize,
    /// Every repeat.
    pub samples: Vec<Sample>,
}

/// The median (the upper one of an even count); 0 for none.
pub fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The median (the upper one of an even count); 0 for none.
pub fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Field by field medians of `v` (`None` for none).
fn median_latency(v: &[LatencySummary]) -> Option<LatencySummary> {
    let m = |f: fn(&LatencySummary) -> u64| median_u64(v.iter().map(f).collect());
    (!v.is_empty()).then(|| LatencySummary {
        count: m(|l| l.count),
        min_ns: m(|l| l.min_ns),
        p50_ns: m(|l| l.p50_ns),
        p90_ns: m(|l| l.p90_ns),
        p99_ns: m(|l| l.p99_ns),
        max_ns: m(|l| l.max_ns),
        mean_ns: m(|l| l.mean_ns),
    })
}

impl Row {
    /// The row of `point` measured with `memory`, from its repeats (ratios not yet set).
    pub fn new(point: &Point, memory: Memory, samples: Vec<Sample>) -> Row {
        let u = |f: fn(&Sample) -> u64| median_u64(samples.iter().map(f).collect());
        let work: Vec<u64> = samples.iter().map(|s| s.compute_work).collect();
        let scan: Vec<f64> = samples.iter().map(|s| s.scan_ms).collect();
        let mut by_reason = BTreeMap::new();
        for s in &samples {
            for (k, n) in &s.sync_fallbacks {
                *by_reason.entry(*k).or_insert(0) += n;
            }
        }
        let latencies: Vec<LatencySummary> =
            samples.iter().filter_map(|s| s.inject_latency).collect();
        let ready: Vec<LatencySummary> = samples.iter().filter_map(|s| s.ready_latency).collect();
        let resident: Vec<f64> = samples.iter().filter_map(|s| s.resident_ms).collect();
        Row {
            shape: point.setup.shape,
            mode: point.mode,
            fetch_latency_us: u64::try_from(point.fetch_latency.as_micros()).unwrap_or(u64::MAX),
            tasks_per_vcpu: point.setup.tasks_per_vcpu,
            vcpus: point.setup.vcpus,
            source: memory.source,
            prefetch: memory.prefetch,
            compute_work: median_u64(work.clone()),
            compute_work_min: work.iter().copied().min().unwrap_or(0),
            compute_work_max: work.iter().copied().max().unwrap_or(0),
            scan_ms: median_f64(scan.clone()),
            scan_ms_min: scan.iter().copied().fold(f64::INFINITY, f64::min),
            scan_ms_max: scan.iter().copied().fold(0.0, f64::max),
            faults: u(|s| s.faults),
            apf_injected: u(|s| s.apf_injected),
            sync_fallbacks: u(|s| s.sync_fallbacks.values().sum()),
            sync_fallbacks_by_reason: by_reason,
            inject_latency: median_latency(&latencies),
            ready_latency: median_latency(&ready),
            timer_ticks: u(|s| s.timer_ticks),
            setup_ms: median_f64(samples.iter().map(|s| s.setup_ms).collect()),
            scans_verified: samples.iter().map(|s| s.scans_verified).min().unwrap_or(0),
            prefetched_pages: u(|s| s.prefetched_pages),
            resident_ms: (!resident.is_empty()).then(|| median_f64(resident)),
            fetch_retries: samples.iter().map(|s| s.fetch_retries).sum(),
            work_vs_eager: None,
            work_vs_off: None,
            scan_vs_eager: None,
            scan_vs_off: None,
            scan_vs_kernel: None,
            repeats: samples.len(),
            samples,
        }
    }

    /// The memory it was measured with.
    pub fn memory(&self) -> Memory {
        Memory {
            source: self.source,
            prefetch: self.prefetch,
        }
    }
}

/// Sets each row's ratios: compute work over eager's (memory file, no prefetch) and over
/// off's with the same memory; scan speed against eager's, off's and kernel's; among `group`
/// (the rows of one setup and latency).
#[allow(clippy::cast_precision_loss)]
pub fn set_ratios(group: &mut [Row]) {
    let scan_of = |mode: Mode, memory: Memory, g: &[Row]| {
        g.iter()
            .find(|r| r.mode == mode && r.memory() == memory)
            .map(|r| r.scan_ms)
            .filter(|ms| *ms > 0.0)
    };
    let eager_scan = scan_of(Mode::Eager, Memory::FILE, group);
    let bases: Vec<(Option<f64>, Option<f64>)> = group
        .iter()
        .map(|r| {
            (
                scan_of(Mode::Off, r.memory(), group),
                scan_of(Mode::Kernel, r.memory(), group),
            )
        })
        .collect();
    for (r, (off, kernel)) in group.iter_mut().zip(bases) {
        let faster = |base: Option<f64>| base.filter(|_| r.scan_ms > 0.0).map(|b| b / r.scan_ms);
        r.scan_vs_eager = faster(eager_scan);
        r.scan_vs_off = faster(off);
        r.scan_vs_kernel = faster(kernel);
    }
    let work_of = |mode: Mode, memory: Memory, g: &[Row]| {
        g.iter()
            .find(|r| r.mode == mode && r.memory() == memory)
            .map(|r| r.compute_work)
            .filter(|w| *w > 0)
    };
    let eager = work_of(Mode::Eager, Memory::FILE, group);
    let offs: Vec<Option<u64>> = group
        .iter()
        .map(|r| work_of(Mode::Off, r.memory(), group))
        .collect();
    for (r, off) in group.iter_mut().zip(offs) {
        let ratio = |base: Option<u64>| base.map(|b| r.compute_work as f64 / b as f64);
        r.work_vs_eager = ratio(eager);
        r.work_vs_off = ratio(off);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::setup::Setup;
    use super::*;

    fn point(mode: Mode) -> Point {
        Point {
            setup: Setup {
                shape: Shape::Mixed,
                vcpus: 1,
                tasks_per_vcpu: 2,
                scan_per_task: 1 << 20,
                mem_size: 48 << 20,
            },
            mode,
            fetch_latency: Duration::from_millis(1),
        }
    }

    fn sample(work: u64, p50_ns: u64) -> Sample {
        Sample {
            compute_work: work,
            scan_ms: 1.0,
            faults: 16,
            scans_verified: 1,
            inject_latency: (p50_ns > 0).then_some(LatencySummary {
                count: 16,
                p50_ns,
                p99_ns: 2 * p50_ns,
                ..LatencySummary::default()
            }),
            ..Sample::default()
        }
    }

    #[test]
    fn rows_take_medians_and_spread() {
        let r = Row::new(
            &point(Mode::ApfV2),
            Memory::FILE,
            vec![sample(5, 30_000), sample(1, 0), sample(9, 10_000)],
        );
        assert_eq!(
            (r.compute_work, r.compute_work_min, r.compute_work_max),
            (5, 1, 9)
        );
        // Latencies of the repeats that injected: median of [10 µs, 30 µs] (the upper one).
        let l = r.inject_latency.unwrap();
        assert_eq!((l.p50_ns, l.p99_ns), (30_000, 60_000));
        assert_eq!(r.repeats, 3);
    }

    #[test]
    fn ratios_compare_with_eager_and_with_off_of_the_same_memory() {
        let fill = Memory {
            source: Source::File,
            prefetch: Prefetch::Fill,
        };
        let mut g = vec![
            Row::new(&point(Mode::Eager), Memory::FILE, vec![sample(100, 0)]),
            Row::new(&point(Mode::Off), Memory::FILE, vec![sample(50, 0)]),
            Row::new(&point(Mode::ApfV2), Memory::FILE, vec![sample(75, 0)]),
            Row::new(&point(Mode::Off), fill, vec![sample(80, 0)]),
            Row::new(&point(Mode::ApfV2), fill, vec![sample(40, 0)]),
        ];
        set_ratios(&mut g);
        assert_eq!(g[2].work_vs_eager, Some(0.75));
        assert_eq!(g[2].work_vs_off, Some(1.5));
        assert_eq!(g[4].work_vs_off, Some(0.5));
        assert_eq!(g[4].work_vs_eager, Some(0.4));
    }
}
