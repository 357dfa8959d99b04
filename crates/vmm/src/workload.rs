//! `--workload SPEC`: a comma list of `kind[:count]` (`compute:3,scan:1`, `msr-selftest`),
//! turned into guest-abi [`TaskSpec`]s: tasks round-robin over vCPUs, scan tasks each get an
//! equal, page-aligned share of the workload region: `[16 MiB, end of RAM region 0)`, or from
//! `--scan-at` to the end of the RAM region holding it, so that a scan never straddles the
//! MMIO hole.

use std::ops::Range;

use guest_abi::{MAX_TASKS, SCAN_FILL, SCAN_SNAPSHOT, TaskKind, TaskSpec, WORKLOAD_GPA};

use crate::error::{Result, VmmError};
use crate::layout;

/// The default `--workload`.
pub const DEFAULT: &str = "compute:2,scan:1";

/// Knobs for the task arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadParams {
    /// vCPUs to spread tasks over.
    pub vcpus: u32,
    /// Bytes of guest RAM (its regions: [`crate::layout::ram_regions`]).
    pub mem_size: u64,
    /// Where the scans' memory starts (page aligned, in RAM, at or above `WORKLOAD_GPA`);
    /// `None`: at `WORKLOAD_GPA`. The scans share the rest of that RAM region.
    pub scan_at: Option<u64>,
    /// Bytes scanned in total (split among scan tasks); `None` = the whole region.
    pub scan_bytes: Option<u64>,
    /// Passes of each scan (>= 1).
    pub scan_passes: u64,
    /// Duration of compute tasks in ms (0 = until every other task is done; a workload of
    /// only compute tasks uses [`COMPUTE_ALONE_MS`] instead).
    pub compute_ms: u64,
}

/// Compute duration when there is nothing else for compute tasks to wait for.
pub const COMPUTE_ALONE_MS: u64 = 50;

/// Parses `spec` into task kinds, in order.
pub fn parse_kinds(spec: &str) -> Result<Vec<TaskKind>> {
    let mut kinds = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, count) = match item.split_once(':') {
            Some((n, c)) => {
                let c: usize = c.trim().parse().map_err(|_| {
                    VmmError::Config(format!("workload {item:?}: count {c:?} is not a number"))
                })?;
                (n.trim(), c)
            }
            None => (item, 1),
        };
        let kind = match name {
            "compute" => TaskKind::Compute,
            "scan" => TaskKind::Scan,
            "msr-selftest" | "msr_selftest" | "msrselftest" => TaskKind::MsrSelftest,
            _ => {
                return Err(VmmError::Config(format!(
                    "workload {item:?}: unknown task kind {name:?} (compute, scan, msr-selftest)"
                )));
            }
        };
        if count == 0 {
            return Err(VmmError::Config(format!(
                "workload {item:?}: count must be at least 1"
            )));
        }
        if kinds.len() + count > MAX_TASKS {
            return Err(VmmError::Config(format!(
                "workload {spec:?}: more than {MAX_TASKS} tasks"
            )));
        }
        kinds.extend(std::iter::repeat_n(kind, count));
    }
    if kinds.is_empty() {
        return Err(VmmError::Config("workload is empty".into()));
    }
    Ok(kinds)
}

/// The workload region of `p`: from `scan_at` (default `WORKLOAD_GPA`) to the end of the
/// RAM region holding it.
pub fn scan_region(p: &WorkloadParams) -> Result<Range<u64>> {
    let start = p.scan_at.unwrap_or(WORKLOAD_GPA);
    let ram = layout::ram_regions(p.mem_size);
    let bad = |why: &str| {
        VmmError::Config(format!(
            "--scan-at {start:#x} {why} (RAM of {}: {})",
            layout::human_size(p.mem_size),
            ram.iter()
                .map(|r| format!("{:#x}..{:#x}", r.start, r.end))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    };
    if start < WORKLOAD_GPA {
        return Err(bad(&format!(
            "is below workload memory ({WORKLOAD_GPA:#x})"
        )));
    }
    if !start.is_multiple_of(4096) {
        return Err(bad("is not page aligned"));
    }
    ram.iter()
        .find(|r| r.contains(&start))
        .map(|r| start..r.end)
        .ok_or_else(|| bad("is not in guest RAM"))
}

/// Builds the task table.
pub fn build(spec: &str, p: WorkloadParams) -> Result<Vec<TaskSpec>> {
    let workload = scan_region(&p)?;
    if let Some(case) = spec.trim().strip_prefix("hostile:") {
        return crate::hostile::tasks(case, p.vcpus, workload, p.scan_bytes, p.scan_passes);
    }
    let kinds = parse_kinds(spec)?;
    let scans = kinds.iter().filter(|k| **k == TaskKind::Scan).count() as u64;
    let only_compute = kinds.iter().all(|k| *k == TaskKind::Compute);
    let region = workload.end - workload.start;
    let total = p.scan_bytes.map_or(region, |b| b.min(region));
    let share = total.checked_div(scans).unwrap_or(0) & !0xfff;
    if scans > 0 && share == 0 {
        return Err(VmmError::Config(format!(
            "{scans} scan tasks do not fit in {total} bytes of workload memory"
        )));
    }
    let mut scan_no = 0u64;
    let mut tasks = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.into_iter().enumerate() {
        let cpu = u32::try_from(i).unwrap_or(0) % p.vcpus.max(1);
        let mut t = TaskSpec {
            kind: kind as u32,
            cpu,
            ..TaskSpec::default()
        };
        match kind {
            TaskKind::Compute => {
                t.arg0 = if only_compute && p.compute_ms == 0 {
                    COMPUTE_ALONE_MS
                } else {
                    p.compute_ms
                };
            }
            TaskKind::Scan => {
                t.flags = SCAN_FILL;
                t.arg0 = workload.start + scan_no * share;
                t.arg1 = share;
                t.arg2 = p.scan_passes.max(1);
                scan_no += 1;
            }
            TaskKind::MsrSelftest | TaskKind::Hostile => {}
        }
        tasks.push(t);
    }
    Ok(tasks)
}

/// Sets `SCAN_SNAPSHOT` on every scan task: each asks for a snapshot after every pass but
/// its last (the first request right after its fill pass).
pub fn request_snapshots(tasks: &mut [TaskSpec]) {
    for t in tasks.iter_mut().filter(|t| t.kind == TaskKind::Scan as u32) {
        t.flags |= SCAN_SNAPSHOT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> WorkloadParams {
        WorkloadParams {
            vcpus: 2,
            mem_size: 256 << 20,
            scan_at: None,
            scan_bytes: None,
            scan_passes: 1,
            compute_ms: 0,
        }
    }

    #[test]
    fn spec_parses_counts_and_kinds() {
        let k = parse_kinds("compute:3, scan:1,msr-selftest").unwrap();
        assert_eq!(k.len(), 5);
        assert_eq!(k[3], TaskKind::Scan);
        assert_eq!(k[4], TaskKind::MsrSelftest);
        assert!(parse_kinds("dance:2").is_err());
        assert!(parse_kinds("compute:x").is_err());
        assert!(parse_kinds("compute:0").is_err());
        assert!(parse_kinds("").is_err());
        assert!(parse_kinds("compute:49").is_err());
    }

    #[test]
    fn tasks_round_robin_and_scans_split_the_region() {
        let t = build("compute:2,scan:2", params()).unwrap();
        assert_eq!(t.iter().map(|t| t.cpu).collect::<Vec<_>>(), [0, 1, 0, 1]);
        let share = ((256 << 20) - WORKLOAD_GPA) / 2;
        assert_eq!((t[2].arg0, t[2].arg1), (WORKLOAD_GPA, share));
        assert_eq!((t[3].arg0, t[3].arg1), (WORKLOAD_GPA + share, share));
        assert_eq!(t[2].flags, SCAN_FILL);
        assert!(t[3].arg0 + t[3].arg1 <= 256 << 20);
        assert_eq!(t[0].arg0, 0);
    }

    #[test]
    fn compute_alone_gets_a_duration_and_scan_size_is_capped() {
        let t = build("compute:1", params()).unwrap();
        assert_eq!(t[0].arg0, COMPUTE_ALONE_MS);
        let t = build(
            "scan:3",
            WorkloadParams {
                scan_bytes: Some(3 << 20),
                ..params()
            },
        )
        .unwrap();
        assert_eq!(t[0].arg1, 1 << 20);
    }

    #[test]
    fn scans_lie_in_one_ram_region_from_scan_at() {
        let big = WorkloadParams {
            mem_size: 5 << 30,
            ..params()
        };
        // By default the scans share region 0: they end at the MMIO hole.
        let t = build("scan:2", big).unwrap();
        assert_eq!(t[1].arg0 + t[1].arg1, 3 << 30);
        let high = WorkloadParams {
            scan_at: Some(4 << 30),
            scan_bytes: Some(8 << 20),
            ..big
        };
        let t = build("compute:1,scan:2", high).unwrap();
        assert_eq!((t[1].arg0, t[1].arg1), (4 << 30, 4 << 20));
        assert_eq!(t[2].arg0, (4 << 30) + (4 << 20));
        // The whole rest of region 1 without --scan-size.
        let t = build(
            "scan:1",
            WorkloadParams {
                scan_bytes: None,
                ..high
            },
        )
        .unwrap();
        assert_eq!(t[0].arg0 + t[0].arg1, 6 << 30);
        for (at, why) in [
            (3 << 30, "is not in guest RAM"),
            (6 << 30, "is not in guest RAM"),
            (0x1000, "is below workload memory"),
            ((4 << 30) + 8, "is not page aligned"),
        ] {
            let e = build(
                "scan:1",
                WorkloadParams {
                    scan_at: Some(at),
                    ..big
                },
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(why), "{e}");
        }
        let e = scan_region(&WorkloadParams {
            scan_at: Some(4 << 30),
            ..params()
        });
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("RAM of 256 MiB: 0x0..0x10000000")
        );
    }
}
