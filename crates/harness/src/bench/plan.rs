//! What a measurement runs: setups × fetch latencies × modes, repeated ([`Plan`]), and the
//! points measured again with other memory ([`Variants`]).

use std::time::Duration;

use pager::Prefetch;

use super::mode::{Memory, Mode, Source};
use super::setup::Setup;

/// A measurement plan: setups × latencies × modes, repeated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Guest shapes.
    pub setups: Vec<Setup>,
    /// Fetch latencies.
    pub latencies: Vec<Duration>,
    /// Modes.
    pub modes: Vec<Mode>,
    /// Repeats of every point.
    pub repeats: usize,
    /// The measured window.
    pub window: Duration,
}

impl Plan {
    /// Restores of the plain rows.
    pub fn runs(&self) -> usize {
        self.setups.len() * self.latencies.len() * self.modes.len() * self.repeats
    }
}

/// Points measured again with other memory (`bench --sources`, `--prefetch`): every pair of
/// a source and a prefetch policy other than the plain rows' (`file`, `none`), at the plan's
/// latencies and modes that are also listed here.
#[derive(Clone, Debug, Default)]
pub struct Variants {
    /// The other memories, in table order.
    pub memories: Vec<Memory>,
    /// At these fetch latencies only.
    pub latencies: Vec<Duration>,
    /// For these modes only.
    pub modes: Vec<Mode>,
}

impl Variants {
    /// `sources` × `prefetch`, less the plain rows' pair.
    pub fn new(
        sources: &[Source],
        prefetch: &[Prefetch],
        latencies: Vec<Duration>,
        modes: Vec<Mode>,
    ) -> Variants {
        let mut memories = Vec::new();
        for &source in sources {
            for &prefetch in prefetch {
                let m = Memory { source, prefetch };
                if m != Memory::FILE && !memories.contains(&m) {
                    memories.push(m);
                }
            }
        }
        Variants {
            memories,
            latencies,
            modes,
        }
    }

    /// The memories `mode` at `latency` is measured with: the file first, then the others.
    pub fn memories_for(&self, latency: Duration, mode: Mode) -> Vec<Memory> {
        let mut v = vec![Memory::FILE];
        if self.latencies.contains(&latency) && self.modes.contains(&mode) {
            v.extend(self.memories.iter().copied());
        }
        v
    }

    /// Restores they add to `plan`.
    pub fn runs(&self, plan: &Plan) -> usize {
        let lats = plan
            .latencies
            .iter()
            .filter(|l| self.latencies.contains(l))
            .count();
        let modes = plan.modes.iter().filter(|m| self.modes.contains(m)).count();
        plan.setups.len() * lats * modes * self.memories.len() * plan.repeats
    }

    /// True if some row of `plan` reads memory from NBD for `mode`.
    pub fn nbd_for(&self, plan: &Plan, mode: Mode) -> bool {
        self.uses_nbd()
            && self.modes.contains(&mode)
            && plan.latencies.iter().any(|l| self.latencies.contains(l))
    }

    /// True if some row reads memory from NBD.
    pub fn uses_nbd(&self) -> bool {
        self.memories.iter().any(|m| m.source == Source::Nbd)
    }

    /// The same without the NBD rows.
    #[must_use]
    pub fn without_nbd(&self) -> Variants {
        Variants {
            memories: self
                .memories
                .iter()
                .copied()
                .filter(|m| m.source != Source::Nbd)
                .collect(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mode::PREFETCH_ALL;
    use super::super::setup::Shape;
    use super::*;

    #[test]
    fn variants_cross_sources_and_policies_less_the_plain_pair() {
        let ms = Duration::from_millis;
        let v = Variants::new(
            &Source::ALL,
            &PREFETCH_ALL,
            vec![ms(1)],
            vec![Mode::Off, Mode::ApfV2],
        );
        let labels: Vec<String> = v.memories.iter().map(|m| m.label()).collect();
        assert_eq!(
            labels,
            [
                "file+readahead",
                "file+fill",
                "nbd",
                "nbd+readahead",
                "nbd+fill"
            ]
        );
        assert!(v.uses_nbd() && !v.without_nbd().uses_nbd());
        assert_eq!(v.memories_for(ms(1), Mode::ApfV2).len(), 6);
        assert_eq!(v.memories_for(ms(1), Mode::Eager), [Memory::FILE]);
        assert_eq!(v.memories_for(ms(0), Mode::Off), [Memory::FILE]);
        let setup = Setup {
            shape: Shape::Mixed,
            vcpus: 1,
            tasks_per_vcpu: 2,
            scan_per_task: 1 << 20,
            mem_size: 48 << 20,
        };
        let plan = Plan {
            setups: vec![setup; 2],
            latencies: vec![ms(0), ms(1)],
            modes: vec![Mode::Eager, Mode::Off, Mode::ApfV2],
            repeats: 3,
            window: ms(100),
        };
        // 2 setups × 1 latency × 2 modes × 5 memories × 3 repeats.
        assert_eq!(v.runs(&plan), 60);
        assert_eq!(plan.runs(), 36);
        assert!(v.nbd_for(&plan, Mode::Off) && !v.nbd_for(&plan, Mode::Eager));
        assert!(
            Variants::new(&[Source::File], &[Prefetch::None], vec![ms(1)], vec![])
                .memories
                .is_empty()
        );
    }
}
