//! Running a plan: snapshots first (and the NBD servers the variants need), then every
//! repeat of every (setup, latency) with its modes back to back, so that machine drift hits
//! every mode alike; then the rows, with their ratios.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use pager::NbdUrl;

use super::mode::{Memory, Mode};
use super::plan::{Plan, Variants};
use super::point::{Point, Sample, run_point};
use super::row::{Row, set_ratios};
use super::setup::Setup;
use super::snapshots::Snapshots;
use crate::error::{Error, Result};
use crate::interrupt;

/// What [`execute`] tells its caller as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    /// A restore starts.
    Starting(&'a Point, Memory),
    /// It measured this.
    Measured(&'a Point, Memory, &'a Sample),
}

/// The samples gathered so far, by point and memory, in the order first measured.
#[derive(Debug, Default)]
struct Samples(Vec<(Point, Memory, Vec<Sample>)>);

impl Samples {
    fn push(&mut self, point: Point, memory: Memory, s: Sample) {
        match self
            .0
            .iter_mut()
            .find(|(p, m, _)| *p == point && *m == memory)
        {
            Some((_, _, v)) => v.push(s),
            None => self.0.push((point, memory, vec![s])),
        }
    }

    fn take(&mut self, point: &Point, memory: Memory) -> Option<Vec<Sample>> {
        let i = self
            .0
            .iter()
            .position(|(p, m, _)| p == point && *m == memory)?;
        Some(self.0.swap_remove(i).2)
    }
}

/// Runs `plan` and the rows of `variants` (other sources and prefetch policies, each
/// measured right after the plain row of its point). NBD rows read each snapshot through
/// `qemu-nbd` ([`Snapshots::nbd_url`], started before the first restore). Rows come per
/// (setup, latency): the plain rows in mode order, then each other memory's.
pub fn execute(
    plan: &Plan,
    variants: &Variants,
    snapshots: &mut Snapshots,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Vec<Row>> {
    let urls = take_snapshots(plan, variants, snapshots)?;
    let mut samples = Samples::default();
    for _ in 0..plan.repeats {
        for setup in &plan.setups {
            for &fetch_latency in &plan.latencies {
                for &mode in &plan.modes {
                    let point = Point {
                        setup: *setup,
                        mode,
                        fetch_latency,
                    };
                    let snap = snapshots.for_mode(*setup, mode)?;
                    for memory in variants.memories_for(fetch_latency, mode) {
                        progress(Progress::Starting(&point, memory));
                        let s = run_point(&snap, &point, memory, urls.get(&snap), plan.window)
                            .map_err(|e| match e {
                                Error::Interrupted => e,
                                e => Error::Point {
                                    point: point.describe(memory),
                                    cause: Box::new(e),
                                },
                            })?;
                        progress(Progress::Measured(&point, memory, &s));
                        samples.push(point, memory, s);
                    }
                }
            }
        }
    }
    let mut rows = Vec::new();
    for setup in &plan.setups {
        for latency in &plan.latencies {
            rows.extend(group(plan, variants, *setup, *latency, &mut samples));
        }
    }
    Ok(rows)
}

/// Takes the snapshots of `plan` and starts the NBD servers its variants need; returns
/// their URLs by snapshot.
fn take_snapshots(
    plan: &Plan,
    variants: &Variants,
    snapshots: &mut Snapshots,
) -> Result<HashMap<PathBuf, NbdUrl>> {
    let mut urls = HashMap::new();
    for setup in &plan.setups {
        for &mode in &plan.modes {
            let snap = snapshots.for_mode(*setup, mode)?;
            if variants.nbd_for(plan, mode) && !urls.contains_key(&snap) {
                interrupt::check()?;
                let url = snapshots.nbd_url(&snap)?;
                urls.insert(snap, url);
            }
        }
    }
    Ok(urls)
}

/// The rows of one (setup, latency): the plain rows in mode order, then each other
/// memory's; with their ratios to eager (memory file) and to off (same memory).
fn group(
    plan: &Plan,
    variants: &Variants,
    setup: Setup,
    latency: Duration,
    samples: &mut Samples,
) -> Vec<Row> {
    let mut row = |mode: Mode, memory: Memory| {
        let point = Point {
            setup,
            mode,
            fetch_latency: latency,
        };
        samples
            .take(&point, memory)
            .map(|v| Row::new(&point, memory, v))
    };
    let mut group: Vec<Row> = plan
        .modes
        .iter()
        .filter_map(|m| row(*m, Memory::FILE))
        .collect();
    for memory in &variants.memories {
        for mode in &plan.modes {
            group.extend(row(*mode, *memory));
        }
    }
    set_ratios(&mut group);
    group
}
