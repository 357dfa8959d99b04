//! Watching a run from outside the guest while it runs (a benchmark's measurement window):
//! the run calls its observer from its main thread, never from a vCPU thread.

use std::time::Duration;

use crate::error::Result;
use crate::memory::GuestRam;

/// Called by [`super::run`] from the thread that waits for the vCPUs.
pub trait RunObserver {
    /// Before the first vCPU runs (guest memory is in place; it may be written).
    fn start(&mut self, ram: &GuestRam) -> Result<()> {
        let _ = ram;
        Ok(())
    }

    /// While the guest runs, `elapsed` after its start: returns when to be called again
    /// (`None`: not any more).
    fn poll(&mut self, ram: &GuestRam, elapsed: Duration) -> Option<Duration> {
        let _ = (ram, elapsed);
        None
    }

    /// After every vCPU stopped, `elapsed` after the start (a last look at guest memory).
    fn finish(&mut self, ram: &GuestRam, elapsed: Duration) {
        let _ = (ram, elapsed);
    }
}

/// Observes nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl RunObserver for NoObserver {}
