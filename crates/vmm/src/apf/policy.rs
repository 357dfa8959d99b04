//! When an APF pays: the adaptive policy (`--apf-policy adaptive`, the default).
//!
//! An APF lets a vCPU run other tasks while a page is fetched, but it costs the vCPU time of
//! its own: the exit and injection of "not present", the guest's #PF handler and task switch
//! (emulated at CPL 0 on our hosts), and later the page-ready's delivery and handler. When the
//! page is expected sooner than that, waiting for it is cheaper. For each fault the policy
//! compares two measured quantities:
//! - the **expected remaining fetch time**: the source's recent fetch times (a running
//!   average of first fault → page mapped) minus the age of this page's fetch in flight;
//! - the **cost of an APF cycle on this vCPU**: its recent fault message → injection times,
//!   injection → the guest's handler done (interrupts on again, sampled with an interrupt
//!   window after some injections), and page-ready handed out → the guest done with it (v2:
//!   its ACK; v1: interrupts on again).
//!
//! Until both have been measured (the cycle three times), the policy takes the APF (the
//! protocol's own behaviour), which is also what gives it the measurements; after a run of
//! waits it takes one APF to measure the cycle again. Nothing here is tuned to a workload:
//! the only numbers are the averaging weights, the sampling and probing periods and the
//! three samples.

use std::time::{Duration, Instant};

/// `--apf-policy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApfPolicy {
    /// Every fault the protocol allows becomes an APF.
    Always,
    /// An APF only when the page is expected later than an APF cycle costs.
    #[default]
    Adaptive,
}

/// A running average of durations: the plain mean of the first 8 samples (so that one slow
/// first sample does not dominate), then exponentially weighted, 1/8 for a new sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Average {
    avg: Option<Duration>,
    samples: u32,
}

impl Average {
    /// Takes in a sample.
    pub fn add(&mut self, sample: Duration) {
        self.samples = self.samples.saturating_add(1);
        let weight = self.samples.min(8);
        self.avg = Some(match self.avg {
            None => sample,
            Some(avg) => (avg * (weight - 1) + sample) / weight,
        });
    }

    /// The average, once there is one.
    pub fn get(self) -> Option<Duration> {
        self.avg
    }

    /// Samples taken in.
    pub fn samples(self) -> u32 {
        self.samples
    }
}

/// Samples of each part of a vCPU's APF cycle before the policy trusts it.
const TRUSTED_SAMPLES: u32 = 3;

/// Sample one injection in this many with an interrupt window (after the first ones): each
/// sample costs an exit.
const PROBE_PERIOD: u64 = 16;
/// Injections sampled before the period applies.
const FIRST_PROBES: u64 = 8;
/// Waits in a row after which one fault is an APF again, to measure the cycle anew.
pub const EXPLORE_PERIOD: u32 = 32;
/// The longest run of waits between two such probes.
pub const EXPLORE_MAX: u32 = 4096;

/// The measured costs of one vCPU.
#[derive(Clone, Copy, Debug, Default)]
struct VcpuCosts {
    /// Fault message read → "not present" injected.
    inject: Average,
    /// "Not present" injected → the guest back in user mode.
    handler: Average,
    /// Page-ready handed out → the guest done with it.
    ready: Average,
    /// A sampled injection whose handler is being timed.
    probe: Option<Instant>,
    /// A page-ready being timed.
    ready_out: Option<Instant>,
    injections: u64,
    readies: u64,
    /// Waits chosen since its last APF.
    waits: u32,
    /// Waits in a row before the next probe (0: [`EXPLORE_PERIOD`]).
    explore_after: u32,
}

impl VcpuCosts {
    fn cycle(&self) -> Option<Duration> {
        Some(self.inject.get()? + self.handler.get()? + self.ready.get()?)
    }

    /// The cycle, once each part has been measured [`TRUSTED_SAMPLES`] times.
    fn trusted_cycle(&self) -> Option<Duration> {
        [self.inject, self.handler, self.ready]
            .iter()
            .all(|a| a.samples() >= TRUSTED_SAMPLES)
            .then(|| self.cycle())
            .flatten()
    }
}

/// What the policy decides for a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Ask for an APF.
    Apf,
    /// Let the vCPU wait for the page: it is expected in `remaining`, sooner than `cycle`.
    Wait {
        /// Expected remaining fetch time.
        remaining: Duration,
        /// The vCPU's APF cycle cost.
        cycle: Duration,
    },
}

/// The policy's state: one page source, several vCPUs.
#[derive(Clone, Debug)]
pub struct Policy {
    mode: ApfPolicy,
    fetch: Average,
    vcpus: Vec<VcpuCosts>,
}

impl Policy {
    /// A policy for `vcpus` vCPUs.
    pub fn new(mode: ApfPolicy, vcpus: usize) -> Policy {
        Policy {
            mode,
            fetch: Average::default(),
            vcpus: vec![VcpuCosts::default(); vcpus],
        }
    }

    /// A fetch took `d` (first fault on the page → page mapped).
    pub fn fetched(&mut self, d: Duration) {
        self.fetch.add(d);
    }

    /// vCPU `vcpu` faulted on a page whose fetch has been in flight for `age`: APF or wait?
    ///
    /// After [`EXPLORE_PERIOD`] waits in a row the vCPU takes one APF anyway: a cycle cost
    /// measured too high (one slow sample) would otherwise never be measured again. Each
    /// such probe doubles the run of waits before the next (up to [`EXPLORE_MAX`]), so
    /// that where waiting is right the probes cost next to nothing; an APF the policy
    /// chooses itself starts over.
    pub fn choose(&mut self, vcpu: usize, age: Duration) -> Choice {
        if self.mode == ApfPolicy::Always {
            return Choice::Apf;
        }
        let fetch = self.fetch.get();
        let Some(v) = self.vcpus.get_mut(vcpu) else {
            return Choice::Apf;
        };
        let (Some(fetch), Some(cycle)) = (fetch, v.trusted_cycle()) else {
            return Choice::Apf;
        };
        let remaining = fetch.saturating_sub(age);
        if remaining > cycle {
            v.waits = 0;
            v.explore_after = EXPLORE_PERIOD;
            Choice::Apf
        } else if v.waits >= v.explore_after.max(EXPLORE_PERIOD) {
            v.waits = 0;
            v.explore_after = (v.explore_after.max(EXPLORE_PERIOD) * 2).min(EXPLORE_MAX);
            Choice::Apf
        } else {
            v.waits += 1;
            Choice::Wait { remaining, cycle }
        }
    }

    /// Whether the `n`th injection or page-ready is timed. Only the adaptive policy times
    /// them (each sample costs an exit); `always` is the protocol's behaviour and nothing
    /// more.
    fn sampled(mode: ApfPolicy, n: u64) -> bool {
        mode == ApfPolicy::Adaptive && (n <= FIRST_PROBES || n.is_multiple_of(PROBE_PERIOD))
    }

    /// vCPU `vcpu` was injected "not present" at `now` for a fault message read at `fault_at`.
    /// Returns whether this one is sampled: ask for an interrupt window, and report the guest
    /// back in user mode with [`Policy::injectable`].
    pub fn injected(&mut self, vcpu: usize, fault_at: Instant, now: Instant) -> bool {
        let Some(v) = self.vcpus.get_mut(vcpu) else {
            return false;
        };
        v.inject.add(now.saturating_duration_since(fault_at));
        v.injections += 1;
        if Self::sampled(self.mode, v.injections) && v.probe.is_none() {
            v.probe = Some(now);
            return true;
        }
        false
    }

    /// vCPU `vcpu` was seen able to take an interrupt at `now` (IF = 1, no shadow): the end of
    /// a sampled #PF handler, or of a v1 page-ready's. The guest's handlers run with
    /// interrupts off and return to a task (or to its idle loop) with them on, so this is
    /// the first moment its handling is over.
    pub fn injectable(&mut self, vcpu: usize, now: Instant) {
        let Some(v) = self.vcpus.get_mut(vcpu) else {
            return;
        };
        if let Some(t0) = v.probe.take() {
            v.handler.add(now.saturating_duration_since(t0));
        }
        if let Some(t0) = v.ready_out.take() {
            v.ready.add(now.saturating_duration_since(t0));
        }
    }

    /// A page-ready for vCPU `vcpu` went out at `now`. Returns whether this one is sampled:
    /// it is timed to the guest able to take interrupts again ([`Policy::injectable`]: for a v1 #PF,
    /// ask for an interrupt window) or, in v2, to its ACK ([`Policy::acked`]).
    pub fn ready_out(&mut self, vcpu: usize, now: Instant) -> bool {
        let Some(v) = self.vcpus.get_mut(vcpu) else {
            return false;
        };
        v.readies += 1;
        if Self::sampled(self.mode, v.readies) && v.ready_out.is_none() {
            v.ready_out = Some(now);
            return true;
        }
        false
    }

    /// vCPU `vcpu` ACKed a v2 page-ready at `now`.
    pub fn acked(&mut self, vcpu: usize, now: Instant) {
        if let Some(v) = self.vcpus.get_mut(vcpu)
            && let Some(t0) = v.ready_out.take()
        {
            v.ready.add(now.saturating_duration_since(t0));
        }
    }

    /// The measured APF cycle of vCPU `vcpu` (for the report), once known.
    pub fn cycle(&self, vcpu: usize) -> Option<Duration> {
        self.vcpus.get(vcpu)?.cycle()
    }

    /// The measured fetch time, once known.
    pub fn fetch(&self) -> Option<Duration> {
        self.fetch.get()
    }

    /// What the policy measured, for the report.
    pub fn report(&self) -> PolicyReport {
        let us = |a: Average| a.get().map(|d| d.as_secs_f64() * 1e6);
        PolicyReport {
            mode: self.mode,
            fetch_us: us(self.fetch),
            vcpus: self
                .vcpus
                .iter()
                .map(|v| CycleReport {
                    inject_us: us(v.inject),
                    handler_us: us(v.handler),
                    ready_us: us(v.ready),
                    cycle_us: v.cycle().map(|d| d.as_secs_f64() * 1e6),
                })
                .collect(),
        }
    }
}

/// The policy's measurements at the end of a run (µs, running averages; `null` where
/// nothing was measured).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PolicyReport {
    /// `--apf-policy`.
    pub mode: ApfPolicy,
    /// First fault on a page → page mapped.
    pub fetch_us: Option<f64>,
    /// Per vCPU, an APF cycle's parts.
    pub vcpus: Vec<CycleReport>,
}

/// One vCPU's APF cycle, in parts (µs).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CycleReport {
    /// Fault message read → "not present" injected (the kick and the exit included).
    pub inject_us: Option<f64>,
    /// Injected → the guest's #PF handler done (interrupts on again).
    pub handler_us: Option<f64>,
    /// Page-ready handed out → the guest done with it (v2: ACK; v1: interrupts on again).
    pub ready_us: Option<f64>,
    /// The sum: what an APF costs this vCPU.
    pub cycle_us: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// A policy whose vCPU 0 has measured an APF cycle of 100 + 200 + 100 µs.
    fn measured(mode: ApfPolicy) -> (Policy, Instant) {
        let mut p = Policy::new(mode, 2);
        let t = Instant::now();
        // Three cycles: the policy trusts a cycle measured TRUSTED_SAMPLES times.
        for i in 0..u64::from(TRUSTED_SAMPLES) {
            let t = t + us(2000 * i);
            let sampled = p.injected(0, t, t + us(100));
            assert!(
                sampled || mode == ApfPolicy::Always,
                "the first injections are sampled"
            );
            p.injectable(0, t + us(300));
            p.ready_out(0, t + us(1000));
            p.acked(0, t + us(1100));
        }
        (p, t)
    }

    #[test]
    fn without_measurements_every_fault_is_an_apf() {
        let mut p = Policy::new(ApfPolicy::Adaptive, 1);
        assert_eq!(p.choose(0, Duration::ZERO), Choice::Apf);
        let (mut p, _) = measured(ApfPolicy::Adaptive);
        // The cycle is known, the fetch time not yet.
        assert_eq!(p.cycle(0), Some(us(400)));
        assert_eq!(p.choose(0, Duration::ZERO), Choice::Apf);
        p.fetched(us(50));
        assert_ne!(p.choose(0, Duration::ZERO), Choice::Apf);
        // vCPU 1 has measured nothing.
        assert_eq!(p.choose(1, Duration::ZERO), Choice::Apf);
    }

    #[test]
    fn a_fetch_shorter_than_a_cycle_waits_a_longer_one_takes_the_apf() {
        let (mut p, _) = measured(ApfPolicy::Adaptive);
        p.fetched(us(30));
        assert_eq!(
            p.choose(0, Duration::ZERO),
            Choice::Wait {
                remaining: us(30),
                cycle: us(400)
            }
        );
        let (mut p, _) = measured(ApfPolicy::Adaptive);
        p.fetched(us(5000));
        assert_eq!(p.choose(0, Duration::ZERO), Choice::Apf);
    }

    #[test]
    fn the_age_of_the_fetch_in_flight_counts() {
        let (mut p, _) = measured(ApfPolicy::Adaptive);
        p.fetched(us(1000));
        assert_eq!(p.choose(0, us(100)), Choice::Apf, "900 µs left > 400");
        assert_eq!(
            p.choose(0, us(700)),
            Choice::Wait {
                remaining: us(300),
                cycle: us(400)
            },
            "300 µs left: nearly there"
        );
        assert!(
            matches!(p.choose(0, us(5000)), Choice::Wait { remaining, .. } if remaining.is_zero())
        );
    }

    #[test]
    fn always_never_waits_and_never_samples() {
        let mut p = Policy::new(ApfPolicy::Always, 1);
        let t = Instant::now();
        p.fetched(us(1));
        assert!(!p.injected(0, t, t + us(5)));
        assert!(!p.ready_out(0, t + us(10)));
        assert_eq!(p.choose(0, Duration::ZERO), Choice::Apf);
    }

    #[test]
    fn after_a_run_of_waits_one_apf_measures_the_cycle_again() {
        let (mut p, _) = measured(ApfPolicy::Adaptive);
        p.fetched(us(30));
        let choices: Vec<Choice> = (0..=EXPLORE_PERIOD)
            .map(|_| p.choose(0, Duration::ZERO))
            .collect();
        assert!(
            choices[..EXPLORE_PERIOD as usize]
                .iter()
                .all(|c| matches!(c, Choice::Wait { .. }))
        );
        assert_eq!(choices[EXPLORE_PERIOD as usize], Choice::Apf);
        // Then twice as many waits before the next probe.
        let next: Vec<Choice> = (0..=2 * EXPLORE_PERIOD)
            .map(|_| p.choose(0, Duration::ZERO))
            .collect();
        assert!(
            next[..2 * EXPLORE_PERIOD as usize]
                .iter()
                .all(|c| matches!(c, Choice::Wait { .. }))
        );
        assert_eq!(next[2 * EXPLORE_PERIOD as usize], Choice::Apf);
        // A slower source: the policy's own APF starts the runs over.
        p.fetched(us(100_000));
        assert_eq!(p.choose(0, Duration::ZERO), Choice::Apf);
        for _ in 0..40 {
            p.fetched(us(30));
        }
        let again: Vec<Choice> = (0..=EXPLORE_PERIOD)
            .map(|_| p.choose(0, Duration::ZERO))
            .collect();
        assert_eq!(again[EXPLORE_PERIOD as usize], Choice::Apf);
    }

    #[test]
    fn one_slow_first_sample_does_not_decide_and_the_first_cycles_are_apfs() {
        let mut p = Policy::new(ApfPolicy::Adaptive, 1);
        let t = Instant::now();
        p.fetched(us(50));
        // A first injection 5 ms late (a loaded host), then two of 100 µs.
        for (i, late) in [5000, 100, 100].into_iter().enumerate() {
            assert_eq!(
                p.choose(0, Duration::ZERO),
                Choice::Apf,
                "cycle {i} not trusted yet"
            );
            let t = t + us(10_000 * i as u64);
            p.injected(0, t, t + us(late));
            p.injectable(0, t + us(late + 200));
            p.ready_out(0, t + us(late + 300));
            p.acked(0, t + us(late + 400));
        }
        // The mean of the three, not the first one: (5000 + 100 + 100) / 3 + 200 + 100.
        assert_eq!(
            p.cycle(0),
            Some(us(1733) + us(300) + Duration::from_nanos(333))
        );
        assert!(matches!(p.choose(0, Duration::ZERO), Choice::Wait { .. }));
    }

    #[test]
    fn averages_follow_a_change_of_the_source() {
        let (mut p, _) = measured(ApfPolicy::Adaptive);
        for _ in 0..4 {
            p.fetched(us(20));
        }
        assert!(matches!(p.choose(0, Duration::ZERO), Choice::Wait { .. }));
        // The source slows down (a remote server, say): after a few slow fetches the policy
        // takes APFs again.
        for _ in 0..20 {
            p.fetched(us(5000));
        }
        assert_eq!(p.choose(0, Duration::ZERO), Choice::Apf);
    }

    #[test]
    fn sampling_is_dense_at_first_then_periodic() {
        let mut p = Policy::new(ApfPolicy::Adaptive, 1);
        let t = Instant::now();
        let sampled: Vec<bool> = (0..48u64)
            .map(|i| {
                let now = t + us(i * 10);
                let probe = p.injected(0, now, now);
                p.injectable(0, now + us(1));
                probe
            })
            .collect();
        assert!(sampled[..8].iter().all(|&s| s));
        assert_eq!(
            sampled[8..].iter().filter(|&&s| s).count(),
            3,
            "the 16th, 32nd, 48th: {sampled:?}"
        );
    }

    #[test]
    fn a_v1_ready_is_timed_to_the_end_of_its_handler() {
        let mut p = Policy::new(ApfPolicy::Adaptive, 1);
        let t = Instant::now();
        p.injected(0, t, t);
        p.injectable(0, t + us(50));
        assert!(p.ready_out(0, t + us(500)));
        p.injectable(0, t + us(560));
        assert_eq!(p.cycle(0), Some(us(50 + 60)));
    }
}
