//! What every measurement must show whatever the speed: eager has no fault, `off` injects
//! nothing, every APF mode injected some when there were faults, every scan was verified, no
//! fetch was retried.

use apf_host::FallbackReason;
use pager::Prefetch;

use super::mode::Mode;
use super::row::Row;
use super::setup::Shape;

/// The problems found in `rows` (none in a healthy run).
pub fn consistency(rows: &[Row]) -> Vec<String> {
    let mut bad = Vec::new();
    for r in rows {
        let at = format!(
            "{} at {} µs, {} vCPU, {} tasks/vCPU, memory {}",
            r.mode,
            r.fetch_latency_us,
            r.vcpus,
            r.tasks_per_vcpu,
            r.memory().label()
        );
        // A replayed working set streams pages ahead of the guest as a prefetch does.
        let prefetching = r.prefetch != Prefetch::None || r.mode.working_set();
        match r.mode {
            Mode::Eager if r.faults != 0 => bad.push(format!("{at}: {} faults", r.faults)),
            Mode::Off | Mode::OffHalt | Mode::OffWs if r.apf_injected != 0 => {
                bad.push(format!("{at}: {} APFs injected", r.apf_injected));
            }
            // A prefetch may map a faulted page before its vCPU takes the fault (no APF
            // then), or every page before any fault.
            // The adaptive policy may leave every fault to wait when pages come quickly
            // (counted as short_wait).
            m if m.is_apf()
                && !prefetching
                && r.faults > 0
                && r.apf_injected == 0
                && !r
                    .sync_fallbacks_by_reason
                    .contains_key(&FallbackReason::ShortWait) =>
            {
                bad.push(format!("{at}: {} faults but no APF injected", r.faults));
            }
            // A replayed working set may bring every page before the guest asks.
            m if m != Mode::Eager
                && !m.working_set()
                && r.faults == 0
                && !(prefetching && r.prefetched_pages > 0) =>
            {
                bad.push(format!("{at}: no fault"));
            }
            _ => {}
        }
        let scans = match r.shape {
            Shape::Mixed => r.vcpus,
            Shape::Concurrent => r.vcpus * r.tasks_per_vcpu,
        };
        if r.scans_verified < u64::from(scans) {
            bad.push(format!(
                "{at}: {} of {scans} scans verified",
                r.scans_verified
            ));
        }
        if r.fetch_retries > 0 {
            bad.push(format!(
                "{at}: {} fetches retried or failed (checksum mismatch or I/O error)",
                r.fetch_retries
            ));
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::mode::{Memory, Source};
    use super::super::point::{Point, Sample};
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

    #[test]
    fn flags_what_cannot_be() {
        let s = |apfs: u64| Sample {
            faults: 16,
            apf_injected: apfs,
            scans_verified: 1,
            ..Sample::default()
        };
        assert!(consistency(&[Row::new(&point(Mode::Off), Memory::FILE, vec![s(0)])]).is_empty());
        assert_eq!(
            consistency(&[Row::new(&point(Mode::Off), Memory::FILE, vec![s(3)])]).len(),
            1
        );
        assert_eq!(
            consistency(&[Row::new(&point(Mode::ApfV1), Memory::FILE, vec![s(0)])]).len(),
            1
        );
        assert_eq!(
            consistency(&[Row::new(&point(Mode::Eager), Memory::FILE, vec![s(0)])]).len(),
            1
        );
        // No APF because the adaptive policy let every fault wait: fine.
        let waited = Sample {
            sync_fallbacks: [(FallbackReason::ShortWait, 16)].into_iter().collect(),
            ..s(0)
        };
        assert!(
            consistency(&[Row::new(&point(Mode::ApfV2), Memory::FILE, vec![waited])]).is_empty()
        );
        // A replayed working set may bring a faulted page before its vCPU takes the fault.
        assert!(consistency(&[Row::new(&point(Mode::ApfWs), Memory::FILE, vec![s(0)])]).is_empty());
    }

    #[test]
    fn a_concurrent_row_verifies_every_task_s_scan() {
        let mut p = point(Mode::Off);
        p.setup.shape = Shape::Concurrent;
        let s = |verified: u64| Sample {
            faults: 16,
            scans_verified: verified,
            ..Sample::default()
        };
        assert_eq!(
            consistency(&[Row::new(&p, Memory::FILE, vec![s(1)])]).len(),
            1
        );
        assert!(consistency(&[Row::new(&p, Memory::FILE, vec![s(2)])]).is_empty());
    }

    #[test]
    fn a_prefetched_row_may_have_no_fault_but_must_verify_its_scans() {
        let fill = Memory {
            source: Source::Nbd,
            prefetch: Prefetch::Fill,
        };
        let s = Sample {
            scans_verified: 1,
            prefetched_pages: 256,
            ..Sample::default()
        };
        let p = point(Mode::ApfV2);
        assert!(consistency(&[Row::new(&p, fill, vec![s.clone()])]).is_empty());
        assert_eq!(
            consistency(&[Row::new(&p, Memory::FILE, vec![s.clone()])]).len(),
            1
        );
        let unverified = Sample {
            scans_verified: 0,
            ..s
        };
        assert_eq!(
            consistency(&[Row::new(&p, fill, vec![unverified])]).len(),
            1
        );
    }
}
