//! The progress bar of the demo and the bench, on stderr: one step per restore, the point
//! being measured as its message.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::bench::Progress;
use crate::bench::table::latency_label;

/// A progress bar over a number of restores, or nothing.
#[derive(Debug)]
pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// Runs `f` with a bar over `total` restores (none unless `enabled`), cleared at the end.
    pub fn run<T>(enabled: bool, total: usize, f: impl FnOnce(&Bar) -> T) -> T {
        let bar = Bar(enabled.then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} restores  {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        }));
        let out = f(&bar);
        if let Some(b) = &bar.0 {
            b.finish_and_clear();
        }
        out
    }

    /// Shows what [`crate::bench::execute`](mod@crate::bench::execute) reports.
    pub fn update(&self, p: Progress<'_>) {
        let Some(bar) = &self.0 else {
            return;
        };
        match p {
            Progress::Starting(point, memory) => bar.set_message(format!(
                "{} · {} · {} vCPU · {} tasks/vCPU · {}",
                point.mode,
                latency_label(point.fetch_latency),
                point.setup.vcpus,
                point.setup.tasks_per_vcpu,
                memory.label()
            )),
            Progress::Measured(..) => bar.inc(1),
        }
    }
}
