//! The guest an experiment snapshots, in one of two shapes: **mixed**, per vCPU one scan task
//! over its own cold region and `tasks_per_vcpu - 1` compute tasks; **concurrent**, every
//! task a scan over its own cold region (every task waits on memory: where APF pays). The
//! scans ask for the snapshot right after their fill pass.

use std::time::Duration;

use vmm::workload::{self, WorkloadParams};
use vmm::{ApfMode, HaltMode, VmConfig};

use crate::error::{Error, Result};

/// Guest RAM of the demo, bench and soak guests (the scans' regions lie above the first
/// 16 MiB).
pub const MEM_SIZE: u64 = 48 << 20;
/// Default scan per scan task.
pub const SCAN_PER_TASK: u64 = 4 << 20;
/// Tasks per vCPU of the concurrent guests of `bench`.
pub const CONCURRENT_TASKS: u32 = 4;

/// What the tasks do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Per vCPU one scan, the other tasks compute.
    #[default]
    Mixed,
    /// Every task scans its own cold memory.
    Concurrent,
}

impl Shape {
    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Mixed => "mixed",
            Shape::Concurrent => "concurrent",
        }
    }
}
/// Default measured window.
pub const WINDOW: Duration = Duration::from_millis(250);

/// The guest's shape: what a snapshot is taken of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Setup {
    /// What the tasks do.
    pub shape: Shape,
    /// vCPUs.
    pub vcpus: u32,
    /// Tasks per vCPU (mixed: one scan and `tasks_per_vcpu - 1` compute tasks; concurrent:
    /// all scans).
    pub tasks_per_vcpu: u32,
    /// Bytes each scan task walks (cold after a lazy restore).
    pub scan_per_task: u64,
    /// Guest RAM.
    pub mem_size: u64,
}

impl Setup {
    /// Checks that the guest can be built: vCPUs and tasks within the guest's limits, the
    /// scans within its workload memory. Errors name the option.
    pub fn check(&self) -> Result<()> {
        let (vcpus, tpv) = (self.vcpus, self.tasks_per_vcpu);
        if vcpus == 0 || vcpus as usize > guest_abi::MAX_CPUS {
            return Err(Error::Config(format!(
                "--vcpus {vcpus}: 1..={}",
                guest_abi::MAX_CPUS
            )));
        }
        if tpv == 0 || tpv as usize * vcpus as usize > guest_abi::MAX_TASKS {
            return Err(Error::Config(format!(
                "--tasks-per-vcpu {tpv}: at least 1, at most {} tasks in all ({vcpus} vCPU)",
                guest_abi::MAX_TASKS
            )));
        }
        let room = self.mem_size.saturating_sub(guest_abi::WORKLOAD_GPA);
        if self.scan_per_task == 0 || self.scan_bytes() > room {
            return Err(Error::Config(format!(
                "--scan-size {} KiB per scan task ({} scans, {}): more than 0 and at most the guest's {} MiB of workload memory in all",
                self.scan_per_task >> 10,
                self.scans(),
                self.shape.name(),
                room >> 20
            )));
        }
        Ok(())
    }

    /// Scan tasks in all.
    pub fn scans(&self) -> u32 {
        match self.shape {
            Shape::Mixed => self.vcpus,
            Shape::Concurrent => self.vcpus * self.tasks_per_vcpu,
        }
    }

    /// Bytes all scans walk together.
    pub fn scan_bytes(&self) -> u64 {
        self.scan_per_task.saturating_mul(u64::from(self.scans()))
    }

    /// The `--workload` spec.
    pub fn workload(&self) -> String {
        let compute = self.tasks_per_vcpu * self.vcpus - self.scans();
        if compute == 0 {
            format!("scan:{}", self.scans())
        } else {
            format!("compute:{compute},scan:{}", self.scans())
        }
    }

    /// The machine to boot and snapshot, offering `apf`.
    pub fn config(&self, apf: ApfMode) -> Result<VmConfig> {
        let mut tasks = workload::build(
            &self.workload(),
            WorkloadParams {
                vcpus: self.vcpus,
                mem_size: self.mem_size,
                scan_at: None,
                scan_bytes: Some(self.scan_bytes()),
                scan_passes: 2,
                compute_ms: 0,
            },
        )?;
        workload::request_snapshots(&mut tasks);
        Ok(VmConfig {
            vcpus: self.vcpus,
            mem_size: self.mem_size,
            apf,
            guest_image: vmm::guest_image::BUNDLED.to_vec(),
            tasks,
            quantum_us: 10_000,
            halt: HaltMode::InKernel,
        })
    }
}

#[cfg(test)]
mod tests {
    use guest_abi::TaskKind;

    use super::*;

    fn setup() -> Setup {
        Setup {
            shape: Shape::Mixed,
            vcpus: 2,
            tasks_per_vcpu: 4,
            scan_per_task: 2 << 20,
            mem_size: MEM_SIZE,
        }
    }

    #[test]
    fn workload_has_one_scan_per_task() {
        assert_eq!(setup().workload(), "compute:6,scan:2");
        let cfg = setup().config(ApfMode::V2).unwrap();
        let scans: Vec<u32> = cfg
            .tasks
            .iter()
            .filter(|t| t.kind == TaskKind::Scan as u32)
            .map(|t| t.cpu)
            .collect();
        assert_eq!(scans, [0, 1]);
        let one = Setup {
            tasks_per_vcpu: 1,
            ..setup()
        };
        assert_eq!(one.workload(), "scan:2");
    }

    #[test]
    fn a_concurrent_guest_scans_in_every_task() {
        let s = Setup {
            shape: Shape::Concurrent,
            tasks_per_vcpu: 4,
            vcpus: 1,
            ..setup()
        };
        assert_eq!(s.workload(), "scan:4");
        assert_eq!(s.scan_bytes(), 8 << 20);
        let cfg = s.config(ApfMode::V2).unwrap();
        assert_eq!(
            cfg.tasks
                .iter()
                .filter(|t| t.kind == TaskKind::Scan as u32)
                .count(),
            4
        );
        let too_big = Setup {
            scan_per_task: 16 << 20,
            ..s
        };
        assert!(
            too_big
                .check()
                .unwrap_err()
                .to_string()
                .contains("4 scans, concurrent")
        );
    }

    #[test]
    fn check_names_the_option_at_fault() {
        assert!(setup().check().is_ok());
        let bad = |s: Setup| s.check().unwrap_err().to_string();
        assert!(
            bad(Setup {
                vcpus: 9,
                ..setup()
            })
            .contains("--vcpus 9")
        );
        assert!(
            bad(Setup {
                tasks_per_vcpu: 0,
                ..setup()
            })
            .contains("--tasks-per-vcpu 0")
        );
        assert!(
            bad(Setup {
                tasks_per_vcpu: 25,
                ..setup()
            })
            .contains("--tasks-per-vcpu 25")
        );
        assert!(
            bad(Setup {
                scan_per_task: 64 << 20,
                ..setup()
            })
            .contains("--scan-size")
        );
    }
}
