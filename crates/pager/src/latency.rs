//! Artificial fetch latency, standing in for slow storage or remote memory.
//!
//! The delay is added to a page's own fetch time: a fetched unit is held in the pager's
//! deadline queue until `fetch done + delay`, then mapped. It delays that page only: the
//! pager thread keeps reading faults and mapping other pages meanwhile, and no vCPU thread
//! ever sleeps for it. Samples come from a seeded generator, so a run is reproducible.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How long each fetch takes on top of the source's own time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FetchLatency {
    /// No added delay.
    #[default]
    None,
    /// The same delay for every fetch.
    Fixed(Duration),
    /// Uniformly distributed in `[min, max]`.
    Uniform {
        /// Lower bound.
        min: Duration,
        /// Upper bound.
        max: Duration,
    },
    /// Exponentially distributed with this mean (long tail, like a busy server).
    Exponential {
        /// Mean delay.
        mean: Duration,
    },
}

impl fmt::Display for FetchLatency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchLatency::None => write!(f, "none"),
            FetchLatency::Fixed(d) => write!(f, "{d:?}"),
            FetchLatency::Uniform { min, max } => write!(f, "uniform:{min:?}..{max:?}"),
            FetchLatency::Exponential { mean } => write!(f, "exp:{mean:?}"),
        }
    }
}

/// A `--fetch-latency` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad fetch latency {0:?}: expected none, DUR (e.g. 5ms, 250us, 2s), \
     uniform:DUR..DUR, or exp:DUR (mean)"
)]
pub struct ParseLatencyError(String);

/// Parses a duration as `humantime` does (`5ms`, `250us`, `2s`, `1m 30s`); a bare `0` means
/// zero.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    humantime::parse_duration(s).ok()
}

impl FromStr for FetchLatency {
    type Err = ParseLatencyError;

    /// `none` | `DUR` | `fixed:DUR` | `uniform:DUR..DUR` (or `DUR-DUR`) | `exp:DUR`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLatencyError(s.to_string());
        let t = s.trim();
        if t.is_empty() || t == "none" || t == "off" {
            return Ok(FetchLatency::None);
        }
        let (kind, rest) = t.split_once(':').unwrap_or(("fixed", t));
        let latency = match kind {
            "fixed" => FetchLatency::Fixed(parse_duration(rest).ok_or_else(err)?),
            "uniform" | "unif" => {
                let (a, b) = rest
                    .split_once("..")
                    .or_else(|| rest.split_once('-'))
                    .ok_or_else(err)?;
                let (min, max) = (
                    parse_duration(a).ok_or_else(err)?,
                    parse_duration(b).ok_or_else(err)?,
                );
                if min > max {
                    return Err(err());
                }
                FetchLatency::Uniform { min, max }
            }
            "exp" | "exponential" => FetchLatency::Exponential {
                mean: parse_duration(rest).ok_or_else(err)?,
            },
            _ => return Err(err()),
        };
        Ok(match latency {
            FetchLatency::Fixed(d) if d.is_zero() => FetchLatency::None,
            l => l,
        })
    }
}

/// Draws delays from a [`FetchLatency`] with a seeded generator (deterministic: the n-th
/// fetch started gets the n-th sample).
#[derive(Debug, Clone)]
pub struct LatencySampler {
    latency: FetchLatency,
    rng: fastrand::Rng,
}

impl LatencySampler {
    /// A sampler for `latency` seeded with `seed`.
    pub fn new(latency: FetchLatency, seed: u64) -> Self {
        Self {
            latency,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Uniform in `[0, 1)`.
    fn next_unit(&mut self) -> f64 {
        self.rng.f64()
    }

    /// The delay for the next fetch.
    pub fn sample(&mut self) -> Duration {
        match self.latency {
            FetchLatency::None => Duration::ZERO,
            FetchLatency::Fixed(d) => d,
            FetchLatency::Uniform { min, max } => {
                let u = self.next_unit();
                min + max.saturating_sub(min).mul_f64(u)
            }
            FetchLatency::Exponential { mean } => {
                let u = self.next_unit();
                // Inverse CDF; cap at 50× the mean so one sample cannot stall a run.
                mean.mul_f64((-(1.0 - u).ln()).min(50.0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cli_forms() {
        let ms = Duration::from_millis;
        assert_eq!("none".parse(), Ok(FetchLatency::None));
        assert_eq!("0".parse(), Ok(FetchLatency::None));
        assert_eq!("5ms".parse(), Ok(FetchLatency::Fixed(ms(5))));
        assert_eq!(
            "fixed:250us".parse(),
            Ok(FetchLatency::Fixed(Duration::from_micros(250)))
        );
        assert_eq!(
            "1500us".parse(),
            Ok(FetchLatency::Fixed(Duration::from_micros(1500)))
        );
        assert_eq!(
            "uniform:1ms..20ms".parse(),
            Ok(FetchLatency::Uniform {
                min: ms(1),
                max: ms(20)
            })
        );
        assert_eq!(
            "uniform:1ms-2ms".parse(),
            Ok(FetchLatency::Uniform {
                min: ms(1),
                max: ms(2)
            })
        );
        assert_eq!(
            "exp:5ms".parse(),
            Ok(FetchLatency::Exponential { mean: ms(5) })
        );
        for bad in [
            "5",
            "5 parsecs",
            "uniform:5ms",
            "uniform:9ms..1ms",
            "gauss:1ms",
        ] {
            assert!(bad.parse::<FetchLatency>().is_err(), "{bad}");
        }
    }

    #[test]
    fn samples_are_seeded_and_in_range() {
        let ms = Duration::from_millis;
        let u = FetchLatency::Uniform {
            min: ms(1),
            max: ms(3),
        };
        let mut a = LatencySampler::new(u, 7);
        let mut b = LatencySampler::new(u, 7);
        let mut sum = Duration::ZERO;
        for _ in 0..1000 {
            let x = a.sample();
            assert_eq!(x, b.sample());
            assert!(x >= ms(1) && x <= ms(3));
            sum += x;
        }
        let mean = sum / 1000;
        assert!(
            mean > ms(1) + Duration::from_micros(800) && mean < ms(2) + Duration::from_micros(200)
        );

        let mut e = LatencySampler::new(FetchLatency::Exponential { mean: ms(2) }, 1);
        let total: Duration = (0..20_000).map(|_| e.sample()).sum();
        let mean = total / 20_000;
        assert!(
            mean > Duration::from_micros(1800) && mean < Duration::from_micros(2200),
            "{mean:?}"
        );
    }
}
