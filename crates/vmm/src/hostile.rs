//! `--workload hostile:<case>`: the hostile-guest workloads (`docs/reliability.md`).
//!
//! Cases `area-outside-ram` .. `int-change` run one `TaskKind::Hostile` task (the case's
//! index in `guest_abi::HOSTILE_CASES` in `arg0`) on the last vCPU, next to a fill scan
//! (so that a lazy restore of the workload has faults in flight on that vCPU) and one
//! compute task per vCPU (which must keep progressing). `same-page` and `flood` are workload
//! shapes: `same-page` = 16 scan tasks over the same region; `flood` = 40 scan tasks over
//! distinct regions, more sleepers per vCPU than an outstanding limit lowered with
//! `--apf-max-outstanding` (the guest has at most 48 tasks, the engine's default limit is 64).

use std::ops::Range;

use guest_abi::{HOSTILE_CASES, MAX_TASKS, SCAN_FILL, TaskKind, TaskSpec};

use crate::error::{Result, VmmError};

/// Scan tasks of `hostile:same-page`.
pub const SAME_PAGE_SCANS: usize = 16;
/// Scan tasks of `hostile:flood`.
pub const FLOOD_SCANS: usize = 40;
/// Bytes scanned by default (each scan of `same-page`, all scans together otherwise).
const DEFAULT_SCAN_BYTES: u64 = 1 << 20;
/// `flood`: bytes per scan task by default.
const FLOOD_SHARE: u64 = 64 << 10;

/// The case named `name`: its index in `HOSTILE_CASES`.
pub fn case_index(name: &str) -> Result<usize> {
    HOSTILE_CASES
        .iter()
        .position(|c| *c == name)
        .ok_or_else(|| {
            VmmError::Config(format!(
                "unknown hostile case {name:?} (one of: {})",
                HOSTILE_CASES.join(", ")
            ))
        })
}

fn scan(cpu: u32, start: u64, len: u64, passes: u64) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Scan as u32,
        cpu,
        flags: SCAN_FILL,
        arg0: start,
        arg1: len,
        arg2: passes.max(1),
        ..TaskSpec::default()
    }
}

/// The task table of `hostile:<case>` over `vcpus` vCPUs, its scans in `workload` (inside
/// one RAM region): `scan_bytes` per scan (same-page), in total (flood, the other cases),
/// `scan_passes` each.
pub fn tasks(
    case: &str,
    vcpus: u32,
    workload: Range<u64>,
    scan_bytes: Option<u64>,
    scan_passes: u64,
) -> Result<Vec<TaskSpec>> {
    let index = case_index(case.trim())?;
    let vcpus = vcpus.max(1);
    let region = workload.end.saturating_sub(workload.start);
    let base = workload.start;
    let mut t: Vec<TaskSpec> = (0..vcpus)
        .map(|cpu| TaskSpec {
            kind: TaskKind::Compute as u32,
            cpu,
            ..TaskSpec::default()
        })
        .collect();
    match case.trim() {
        "same-page" => {
            let len = scan_bytes.unwrap_or(DEFAULT_SCAN_BYTES).min(region) & !0xfff;
            for i in 0..SAME_PAGE_SCANS {
                let cpu = u32::try_from(i).unwrap_or(0) % vcpus;
                t.push(scan(cpu, base, len, scan_passes));
            }
        }
        "flood" => {
            let total = scan_bytes
                .unwrap_or(FLOOD_SHARE * FLOOD_SCANS as u64)
                .min(region);
            let share = (total / FLOOD_SCANS as u64) & !0xfff;
            if share == 0 {
                return Err(VmmError::Config(format!(
                    "hostile:flood: {FLOOD_SCANS} scans do not fit in {total} bytes"
                )));
            }
            for i in 0..FLOOD_SCANS {
                let cpu = u32::try_from(i).unwrap_or(0) % vcpus;
                t.push(scan(cpu, base + i as u64 * share, share, scan_passes));
            }
        }
        _ => {
            let cpu = vcpus - 1;
            t.push(TaskSpec {
                kind: TaskKind::Hostile as u32,
                cpu,
                arg0: index as u64,
                ..TaskSpec::default()
            });
            let len = scan_bytes.unwrap_or(DEFAULT_SCAN_BYTES).min(region) & !0xfff;
            t.push(scan(cpu, base, len, scan_passes));
        }
    }
    if t.len() > MAX_TASKS {
        return Err(VmmError::Config(format!(
            "hostile:{case}: {} tasks, at most {MAX_TASKS}",
            t.len()
        )));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::WORKLOAD_GPA;

    fn table(case: &str) -> Result<Vec<TaskSpec>> {
        tasks(case, 2, WORKLOAD_GPA..64 << 20, None, 1)
    }

    #[test]
    fn every_case_builds_a_valid_table() {
        for (i, name) in HOSTILE_CASES.iter().enumerate() {
            let t = table(name).unwrap();
            assert!(t.len() <= MAX_TASKS);
            assert!(t.iter().all(|t| t.cpu < 2));
            assert!(
                t.iter()
                    .filter(|t| t.kind == TaskKind::Scan as u32)
                    .all(|t| t.arg0 >= WORKLOAD_GPA && t.arg0 + t.arg1 <= 64 << 20)
            );
            if let Some(h) = t.iter().find(|t| t.kind == TaskKind::Hostile as u32) {
                assert_eq!((h.arg0, h.cpu), (i as u64, 1));
            }
        }
        assert!(table("nope").is_err());
    }

    #[test]
    fn flood_scans_distinct_regions_and_same_page_one() {
        let t = table("flood").unwrap();
        let scans: Vec<_> = t.iter().filter(|t| t.kind == 2).collect();
        assert_eq!(scans.len(), FLOOD_SCANS);
        assert!(scans.windows(2).all(|w| w[0].arg0 + w[0].arg1 <= w[1].arg0));
        let t = table("same-page").unwrap();
        assert!(
            t.iter()
                .filter(|t| t.kind == 2)
                .all(|t| t.arg0 == WORKLOAD_GPA)
        );
    }
}
