//! What a restore of clones produced: one entry per clone, the totals, a text summary.

use std::fmt::Write as _;

use pager::{PagerStats, Prefetch};

use crate::config::ApfPath;
use crate::host_memory::MappingUsage;
use crate::report::{RunReport, TaskReport, exit_status_name};

/// One clone's run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CloneEntry {
    /// Its index (0-based).
    pub index: usize,
    /// The guest's exit status (`None`: the run ended in an error).
    pub exit_status: Option<u32>,
    /// The error that ended its run.
    pub error: Option<String>,
    /// From the start of the restore to this clone's end, µs (time to done).
    pub done_us: u64,
    /// Its run, first instruction to end, µs (`None`: ended in an error).
    pub run_us: Option<u64>,
    /// Missing-page faults reported for its threads (its vCPUs, or KVM's workers).
    pub faults: u64,
    /// Not-present APFs injected into it.
    pub apfs: u64,
    /// Its guest RAM mapping at the end: PSS, RSS, and the pages it wrote (anonymous).
    pub memory: MappingUsage,
    /// Its tasks, as its guest reported them (scan checksums checked on the host).
    pub tasks: Vec<TaskReport>,
    /// The whole report of its run (not serialized: the summary prints from it).
    #[serde(skip)]
    pub report: Option<Box<RunReport>>,
}

impl CloneEntry {
    /// The entry of clone `index` that ended at `done_us` with `result`, its RAM using
    /// `memory`.
    pub fn new(
        index: usize,
        result: Result<RunReport, String>,
        done_us: u64,
        memory: MappingUsage,
    ) -> CloneEntry {
        match result {
            Ok(r) => CloneEntry {
                index,
                exit_status: Some(r.exit_status),
                error: None,
                done_us,
                run_us: Some(r.elapsed_us),
                faults: r.apf.driver.vcpu_faults + r.apf.driver.other_thread_faults,
                apfs: r.apf.engine.injected,
                memory,
                tasks: r.tasks.clone(),
                report: Some(Box::new(r)),
            },
            Err(e) => CloneEntry {
                index,
                exit_status: None,
                error: Some(e),
                done_us,
                run_us: None,
                faults: 0,
                apfs: 0,
                memory,
                tasks: Vec::new(),
                report: None,
            },
        }
    }
}

/// Host memory held for the clones' guest RAM.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct GuestMemoryUse {
    /// The sum of the PSS of the clones' RAM mappings: every page a clone maps counted once
    /// over all of them, the pages the clones wrote in full.
    pub pss_bytes: u64,
    /// The sum of their RSS (shared pages counted once per clone that maps them).
    pub rss_bytes: u64,
    /// Pages the clones wrote (their private copies), summed.
    pub private_bytes: u64,
    /// The shared page cache: every page fetched or loaded, mapped by a clone or not.
    pub cache_bytes: u64,
    /// All of it: `cache_bytes + private_bytes`.
    pub host_bytes: u64,
}

/// The totals over the clones.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CloneTotals {
    /// Clones run.
    pub clones: usize,
    /// Clones whose guest exited 0.
    pub exited_ok: usize,
    /// Clones whose run ended in an error.
    pub failed: usize,
    /// Bytes read from the memory source (file or NBD), eager part included.
    pub source_bytes_fetched: u64,
    /// Host memory of their guest RAM, measured when the last one ended.
    pub guest_memory: GuestMemoryUse,
    /// From the start of the restore (snapshot opened) to the last clone's end, µs.
    pub wall_us: u64,
    /// The shared pager's counters, as they are.
    pub pager: PagerStats,
}

/// Everything about a restore of clones.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClonesReport {
    /// The snapshot.
    pub dir: String,
    /// Where guest memory came from.
    pub source: String,
    /// Who turned missing pages into APFs.
    pub apf_path: ApfPath,
    /// The added fetch latency, as given.
    pub fetch_latency: String,
    /// The prefetch policy.
    pub prefetch: Prefetch,
    /// Guest RAM bytes (each clone's).
    pub mem_size: u64,
    /// Time to open the snapshot, load the eager part into the cache and create every
    /// clone's VM, µs.
    pub setup_us: u64,
    /// Per clone.
    pub clones: Vec<CloneEntry>,
    /// Totals.
    pub totals: CloneTotals,
}

fn ms(us: u64) -> f64 {
    std::time::Duration::from_micros(us).as_secs_f64() * 1000.0
}

fn mib(b: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // a figure for people
    let b = b as f64;
    b / f64::from(1 << 20)
}

impl ClonesReport {
    /// The summary: one line per clone, then the source, memory and time totals.
    pub fn summary(&self) -> String {
        let t = &self.totals;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== apfvm: {} clones of {}: {} exited 0, {} failed; all done after {:.1} ms (set-up {:.1} ms)",
            t.clones,
            self.dir,
            t.exited_ok,
            t.failed,
            ms(t.wall_us),
            ms(self.setup_us)
        );
        let _ = writeln!(
            s,
            "   {:>5} {:>6} {:<22} {:>9} {:>8} {:>7} {:>11}",
            "clone", "status", "", "done ms", "faults", "APFs", "wrote MiB"
        );
        for c in &self.clones {
            let status = c
                .exit_status
                .map_or_else(|| "error".into(), |x| x.to_string());
            let name = c.exit_status.map_or("", exit_status_name);
            let _ = writeln!(
                s,
                "   {:>5} {:>6} {:<22} {:>9.1} {:>8} {:>7} {:>11.2}",
                c.index,
                status,
                name,
                ms(c.done_us),
                c.faults,
                c.apfs,
                mib(c.memory.anonymous_bytes)
            );
            if let Some(e) = &c.error {
                let _ = writeln!(s, "         error: {e}");
            }
        }
        let m = &t.guest_memory;
        let _ = writeln!(
            s,
            "   source: {} ({} APF path, fetch latency {}, prefetch {}): {:.1} MiB read for {} clones of a {:.0} MiB guest ({:.2}× its RAM)",
            self.source,
            self.apf_path,
            self.fetch_latency,
            self.prefetch,
            mib(t.source_bytes_fetched),
            t.clones,
            mib(self.mem_size),
            mib(t.source_bytes_fetched) / mib(self.mem_size).max(f64::MIN_POSITIVE)
        );
        let _ = writeln!(
            s,
            "   host memory of the guests: {:.1} MiB = shared page cache {:.1} MiB + pages the clones wrote {:.1} MiB; PSS of their RAM {:.1} MiB (RSS {:.1} MiB)",
            mib(m.host_bytes),
            mib(m.cache_bytes),
            mib(m.private_bytes),
            mib(m.pss_bytes),
            mib(m.rss_bytes)
        );
        let p = &t.pager;
        let _ = writeln!(
            s,
            "   pager: {} fault messages from the clones, {} fetches (a chunk in flight is joined, never fetched again), {} found the chunk in the cache already, {} errors",
            p.fault_messages, p.fetches, p.stale_faults, p.fetch_errors
        );
        s
    }
}
