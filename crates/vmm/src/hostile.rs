//! `--workload hostile:<case>`: the hostile-guest workloads (`docs/reliability.md`).
//!
//! Cases `area-outside-ram` .. `int-change` run one `TaskKind::Hostile` task (the case's
//! index in `guest_abi::HOSTILE_CASES` in `arg0`) on the last vCPU, next to a fill scan
//! (so that a lazy restore of the workload has faults in flight on that vCPU) and one
//! compute task per vCPU (which must keep progressing). `same-page` and `flood` are workload
//! shapes: `same-page` = 16 scan tasks over the same region; `flood` = 40 scan tasks over
//! distinct regions, more sleepers per vCPU than an outstanding limit lowered with
//! `--apf-max-outstanding` (the guest has at most 48 tasks, the engine's default limit is 64).
//! `area-in-lazy-memory` puts on every vCPU a compute task, a hostile task (which moves that
//! vCPU's APF area into workload memory at the top of RAM, `guest_abi::lazy_area_gpa`) and a
//! fill scan of its own region, below `guest_abi::lazy_area_floor`, that starts once every
//! area has moved: a lazy restore of it serves the areas on demand while every vCPU has
//! faults in flight.

use std::ops::Range;

use guest_abi::{
    HOSTILE_CASES, MAX_TASKS, SCAN_AFTER_AREAS_MOVED, SCAN_FILL, TaskKind, TaskSpec,
    lazy_area_floor,
};

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
        "area-in-lazy-memory" => {
            // Below the areas' blocks, should the workload region end where RAM does.
            let region = lazy_area_floor(workload.end).saturating_sub(base);
            let total = scan_bytes.unwrap_or(DEFAULT_SCAN_BYTES).min(region);
            let share = (total / u64::from(vcpus)) & !0xfff;
            if share == 0 {
                return Err(VmmError::Config(format!(
                    "hostile:{case}: {vcpus} scans do not fit in {total} bytes"
                )));
            }
            // Each vCPU picks its hostile task first (its round robin starts after the
            // compute task), and its scan waits until every area has moved besides (a
            // timer tick may preempt the hostile task before it moved).
            t.extend((0..vcpus).map(|cpu| TaskSpec {
                kind: TaskKind::Hostile as u32,
                cpu,
                arg0: index as u64,
                ..TaskSpec::default()
            }));
            t.extend((0..vcpus).map(|cpu| TaskSpec {
                flags: SCAN_FILL | SCAN_AFTER_AREAS_MOVED,
                ..scan(cpu, base + u64::from(cpu) * share, share, scan_passes)
            }));
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
            let hostile: Vec<_> = t
                .iter()
                .filter(|t| t.kind == TaskKind::Hostile as u32)
                .collect();
            assert!(hostile.iter().all(|h| h.arg0 == i as u64));
            if !matches!(*name, "same-page" | "flood" | "area-in-lazy-memory") {
                assert_eq!(hostile.iter().map(|h| h.cpu).collect::<Vec<_>>(), [1]);
            }
        }
        assert!(table("nope").is_err());
    }

    /// Every vCPU: a hostile task that its round robin picks first (the one after the
    /// compute task), and a scan of its own region below the lazy areas.
    #[test]
    fn area_in_lazy_memory_moves_every_vcpus_area_before_its_scan_runs() {
        let ram = 64 << 20;
        let t = tasks("area-in-lazy-memory", 2, WORKLOAD_GPA..ram, None, 2).unwrap();
        for cpu in 0..2 {
            let local: Vec<u32> = t.iter().filter(|t| t.cpu == cpu).map(|t| t.kind).collect();
            assert_eq!(
                local,
                [
                    TaskKind::Compute as u32,
                    TaskKind::Hostile as u32,
                    TaskKind::Scan as u32
                ]
            );
        }
        let scans: Vec<_> = t.iter().filter(|t| t.kind == 2).collect();
        assert!(scans.windows(2).all(|w| w[0].arg0 + w[0].arg1 <= w[1].arg0));
        assert!(
            scans
                .iter()
                .all(|s| s.arg1 > 0 && s.arg0 + s.arg1 <= lazy_area_floor(ram))
        );
        assert!(
            scans
                .iter()
                .all(|s| s.flags == SCAN_FILL | SCAN_AFTER_AREAS_MOVED)
        );
        let big = tasks(
            "area-in-lazy-memory",
            2,
            WORKLOAD_GPA..ram,
            Some(1 << 40),
            1,
        )
        .unwrap();
        assert!(big.iter().all(|s| s.arg0 + s.arg1 <= lazy_area_floor(ram)));
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
