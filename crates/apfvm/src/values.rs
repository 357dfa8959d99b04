//! How the command line's values are read: each parser's error is the reason only; clap
//! names the argument (`invalid value '17M' for '--mem <MEM>': ...`) and apfvm exits 125.

use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use harness::bench::{Mode, PREFETCH_NAMES, Source};
use pager::{FetchLatency, NbdUrl, Prefetch};

/// The longest added fetch latency: the pager's latency histograms stop at an hour, and a
/// fetch held longer would be a hang, not a measurement.
pub const MAX_FETCH_LATENCY: Duration = Duration::from_hours(1);

/// The longest measured window of a demo or a bench (each restore may take 2 minutes).
pub const MAX_WINDOW: Duration = Duration::from_mins(1);

/// The largest `--compute-ms`: the guest counts it in TSC ticks (ms × TSC kHz, added to the
/// TSC), which must fit 64 bits at any plausible TSC rate (10⁷ ms × 10 GHz = 10¹⁷ ticks).
pub const MAX_COMPUTE_MS: u64 = 10_000_000;

/// A duration: `0`, or as people write them (`250ms`, `1500us`, `2s`, `10m`, `1h 30m`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{e} (expected e.g. 0, 250us, 200ms, 2s, 10m, 1h)"))
}

/// A time limit: whole seconds (`30`; `0` = none), or a duration (`2m`, `1h`). A limit too
/// far away to represent is no limit.
pub fn timeout(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => duration(s).map_err(|e| format!("{e}, or whole seconds")),
    }
}

/// A measured window: a duration of at most [`MAX_WINDOW`], not zero.
pub fn window(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() || d > MAX_WINDOW => {
            Err(format!("{d:?}: more than 0 and at most {MAX_WINDOW:?}"))
        }
        d => Ok(d),
    }
}

/// A fixed fetch latency (the demo's and the bench's), at most [`MAX_FETCH_LATENCY`].
pub fn fixed_latency(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d > MAX_FETCH_LATENCY {
        return Err(format!("{d:?}: at most {MAX_FETCH_LATENCY:?}"));
    }
    Ok(d)
}

/// `--fetch-latency`: `0` | `DUR` | `uniform:DUR..DUR` | `exp:DUR` (mean), every bound at
/// most [`MAX_FETCH_LATENCY`].
pub fn fetch_latency(s: &str) -> Result<FetchLatency, String> {
    let l: FetchLatency = s
        .parse()
        .map_err(|e: pager::ParseLatencyError| e.to_string())?;
    let largest = match l {
        FetchLatency::None => Duration::ZERO,
        FetchLatency::Fixed(d) => d,
        FetchLatency::Uniform { max, .. } => max,
        FetchLatency::Exponential { mean } => mean,
    };
    if largest > MAX_FETCH_LATENCY {
        return Err(format!("{l}: at most {MAX_FETCH_LATENCY:?} per fetch"));
    }
    Ok(l)
}

/// The reason in a library's refusal, without its "invalid configuration" prefix.
fn reason(e: vmm::VmmError) -> String {
    match e {
        vmm::VmmError::Config(why) => why,
        e => e.to_string(),
    }
}

/// A size with an optional K/M/G unit (binary).
pub fn size(s: &str) -> Result<u64, String> {
    vmm::layout::parse_size(s).map_err(reason)
}

/// Guest RAM: a size that the layout accepts (a multiple of 2 MiB, within its bounds).
pub fn mem(s: &str) -> Result<u64, String> {
    let n = size(s)?;
    vmm::layout::check_ram_size(n).map_err(reason)?;
    Ok(n)
}

/// A `--workload` spec whose syntax is right (its fit in memory is checked with the rest).
pub fn workload(s: &str) -> Result<String, String> {
    let checked = match s.trim().strip_prefix("hostile:") {
        Some(case) => vmm::hostile::case_index(case.trim()).map(|_| ()),
        None => vmm::workload::parse_kinds(s).map(|_| ()),
    };
    checked.map(|()| s.to_string()).map_err(reason)
}

/// An NBD URL (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
pub fn nbd_url(s: &str) -> Result<NbdUrl, String> {
    s.parse()
        .map_err(|e: pager::nbd::ParseNbdUrlError| e.to_string())
}

/// A restore mode of the demo and the bench.
pub fn mode() -> impl TypedValueParser<Value = Mode> {
    PossibleValuesParser::new(Mode::NAMES).try_map(|s| s.parse::<Mode>())
}

/// A memory source of the bench's memory rows.
pub fn source() -> impl TypedValueParser<Value = Source> {
    PossibleValuesParser::new(Source::NAMES).try_map(|s| s.parse::<Source>())
}

/// A prefetch policy.
pub fn prefetch() -> impl TypedValueParser<Value = Prefetch> {
    PossibleValuesParser::new(PREFETCH_NAMES).try_map(|s| s.parse::<Prefetch>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_a_bare_zero() {
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("30m"), Ok(Duration::from_mins(30)));
        assert_eq!(duration("1h 30m"), Ok(Duration::from_mins(90)));
        assert!(duration("10").is_err() && duration("ten").is_err() && duration("-1s").is_err());
        assert_eq!(timeout("30"), Ok(Duration::from_secs(30)));
        assert_eq!(timeout("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(
            timeout("18446744073709551615"),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert!(timeout("-1").is_err());
        assert!(window("0").is_err() && window("2m").is_err() && window("250ms").is_ok());
    }

    #[test]
    fn fetch_latencies_are_bounded() {
        assert_eq!(fetch_latency("0"), Ok(FetchLatency::None));
        assert_eq!(
            fetch_latency("1500us"),
            Ok(FetchLatency::Fixed(Duration::from_micros(1500)))
        );
        assert!(fetch_latency("uniform:1ms..2h").is_err());
        assert!(fetch_latency("exp:100000000years").is_err());
        assert!(fixed_latency("2h").is_err() && fixed_latency("5ms").is_ok());
    }

    #[test]
    fn sizes_workloads_and_urls_say_what_is_wrong() {
        assert_eq!(mem("64M"), Ok(64 << 20));
        assert!(mem("17M").unwrap_err().contains("not a multiple of 2 MiB"));
        assert!(
            workload("dance:2")
                .unwrap_err()
                .contains("unknown task kind")
        );
        assert!(workload("hostile:nope").unwrap_err().contains("flood"));
        assert!(workload("hostile:flood").is_ok() && workload("compute:3,scan:1").is_ok());
        assert!(nbd_url("http://x").is_err());
    }
}
