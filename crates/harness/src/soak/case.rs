//! What one soak iteration runs, picked from a seeded generator: the guest, the protocol it
//! boots with, the restore mode, the fetch latency and the prefetch policy.

use std::time::Duration;

use pager::{FetchLatency, Prefetch};
use vmm::ApfMode;

use crate::bench::{MEM_SIZE, Mode, PREFETCH_ALL, Setup, Shape};

/// What one iteration runs.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Case {
    /// The guest.
    pub setup: Setup,
    /// `--workload`.
    pub workload: String,
    /// The protocol the guest boots with.
    pub booted: ApfMode,
    /// The restore mode.
    pub mode: Mode,
    /// The added fetch latency (lazy modes; `None` for eager).
    #[serde(serialize_with = "display")]
    pub fetch_latency: Option<FetchLatency>,
    /// The prefetch policy (lazy modes; `None` for eager).
    pub prefetch: Option<Prefetch>,
}

/// `None` as null, a value as its `Display`.
#[allow(clippy::ref_option)] // the signature `serialize_with` calls
fn display<S: serde::Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// How a fetch latency is drawn, for the counts: `none`, `fixed`, `uniform`, `exp`.
pub fn latency_kind(l: &FetchLatency) -> &'static str {
    match l {
        FetchLatency::None => "none",
        FetchLatency::Fixed(_) => "fixed",
        FetchLatency::Uniform { .. } => "uniform",
        FetchLatency::Exponential { .. } => "exp",
    }
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

impl Case {
    /// Picks a case.
    pub fn random(rng: &mut fastrand::Rng) -> Case {
        let vcpus = rng.u32(1..=2);
        // k compute tasks in 1..=4 in all: (tasks_per_vcpu - 1) × vCPUs.
        let tasks_per_vcpu = if vcpus == 1 {
            rng.u32(2..=5)
        } else {
            rng.u32(2..=3)
        };
        let setup = Setup {
            shape: Shape::Mixed,
            vcpus,
            tasks_per_vcpu,
            scan_per_task: rng.u64(1..=4) << 20,
            mem_size: MEM_SIZE,
        };
        let booted = pick(rng, &[ApfMode::V1, ApfMode::V2]);
        let mode = match booted {
            ApfMode::V1 => pick(rng, &[Mode::Eager, Mode::Off, Mode::OffHalt, Mode::ApfV1]),
            _ => pick(
                rng,
                &[
                    Mode::Eager,
                    Mode::Off,
                    Mode::OffHalt,
                    Mode::ApfV2,
                    Mode::Kernel,
                ],
            ),
        };
        let us = Duration::from_micros;
        let (fetch_latency, prefetch) = if mode == Mode::Eager {
            (None, None)
        } else {
            let latency = match rng.u8(0..3) {
                0 if rng.u8(0..6) == 0 => FetchLatency::None,
                0 => FetchLatency::Fixed(us(rng.u64(1..=5000))),
                1 => {
                    let lo = rng.u64(0..=2000);
                    FetchLatency::Uniform {
                        min: us(lo),
                        max: us(lo + rng.u64(1..=3000)),
                    }
                }
                _ => FetchLatency::Exponential {
                    mean: us(rng.u64(100..=2000)),
                },
            };
            (Some(latency), Some(pick(rng, &PREFETCH_ALL)))
        };
        Case {
            workload: setup.workload(),
            setup,
            booted,
            mode,
            fetch_latency,
            prefetch,
        }
    }

    /// One line.
    pub fn describe(&self) -> String {
        let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
        format!(
            "{} vCPU {:<17} {} MiB/vCPU {:?} {:<8} {:<23} {:<9}",
            self.setup.vcpus,
            self.workload,
            self.setup.scan_per_task >> 20,
            self.booted,
            self.mode.name(),
            or_dash(self.fetch_latency.map(|l| l.to_string())),
            or_dash(self.prefetch.map(|p| p.to_string()))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_seeded_valid_and_cover_every_mode() {
        let mut a = fastrand::Rng::with_seed(7);
        let mut b = fastrand::Rng::with_seed(7);
        let mut modes = std::collections::BTreeSet::new();
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let c = Case::random(&mut a);
            assert_eq!(c, Case::random(&mut b));
            let compute = (c.setup.tasks_per_vcpu - 1) * c.setup.vcpus;
            assert!((1..=4).contains(&compute), "{c:?}");
            assert!((1..=2).contains(&c.setup.vcpus));
            assert!(c.setup.check().is_ok(), "{c:?}");
            if c.mode == Mode::Kernel {
                assert_eq!(c.booted, ApfMode::V2);
            }
            if c.mode == Mode::ApfV1 {
                assert_eq!(c.booted, ApfMode::V1);
            }
            assert_eq!(
                c.mode == Mode::Eager,
                c.fetch_latency.is_none() && c.prefetch.is_none()
            );
            if let Some(l) = c.fetch_latency {
                kinds.insert(latency_kind(&l));
                // What the line and the JSON show parses back.
                assert_eq!(l.to_string().parse::<FetchLatency>(), Ok(l));
            }
            modes.insert(c.mode);
        }
        assert_eq!(modes.len(), Mode::CLASSIC.len());
        assert_eq!(kinds.len(), 4);
        let json = serde_json::to_value(Case::random(&mut fastrand::Rng::with_seed(1))).unwrap();
        assert!(
            json["mode"].is_string() && json["workload"].is_string(),
            "{json}"
        );
    }
}
