//! The snapshots of a measurement: one per (guest shape, booted protocol), taken on first
//! use into a temporary directory that is removed when they are dropped (on success, on
//! error, and after Ctrl-C), with the `qemu-nbd` servers that serve them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pager::NbdUrl;
use vmm::{ApfMode, RestoreOptions, RunOptions, SnapshotPlan};

use super::mode::Mode;
use super::setup::Setup;
use crate::error::{Error, Result};
use crate::interrupt;
use crate::qemu_nbd;

/// Longest a guest may take to boot and ask for its snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_mins(1);

/// Snapshots in a temporary directory, removed when this is dropped.
#[derive(Debug)]
pub struct Snapshots {
    // Declared first: dropped (qemu-nbd killed) before the directory is removed.
    servers: HashMap<PathBuf, qemu_nbd::Server>,
    dir: tempfile::TempDir,
    made: HashMap<(Setup, ApfMode), PathBuf>,
    /// Snapshots with a recorded working set (for the `+ws` modes), taken apart from the
    /// others: a lazy restore of those must not replay one.
    with_ws: HashMap<(Setup, ApfMode), PathBuf>,
}

impl Snapshots {
    /// An empty set in a new temporary directory (under `TMPDIR`).
    pub fn new() -> Result<Snapshots> {
        let dir = tempfile::Builder::new()
            .prefix("apfvm-bench-")
            .tempdir()
            .map_err(Error::io("creating a temporary directory"))?;
        Ok(Snapshots {
            servers: HashMap::new(),
            dir,
            made: HashMap::new(),
            with_ws: HashMap::new(),
        })
    }

    /// Where they are.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The snapshot of `setup` booted with `apf`, taken now if needed.
    pub fn get(&mut self, setup: Setup, apf: ApfMode) -> Result<PathBuf> {
        if let Some(p) = self.made.get(&(setup, apf)) {
            return Ok(p.clone());
        }
        let out = self.take(setup, apf, "")?;
        self.made.insert((setup, apf), out.clone());
        Ok(out)
    }

    /// The snapshot `mode` restores for `setup`: for a `+ws` mode, one with a working set
    /// recorded by a lazy restore of it (memory file, no added latency), made on first use.
    pub fn for_mode(&mut self, setup: Setup, mode: Mode) -> Result<PathBuf> {
        let apf = mode.booted();
        if !mode.working_set() {
            return self.get(setup, apf);
        }
        if let Some(p) = self.with_ws.get(&(setup, apf)) {
            return Ok(p.clone());
        }
        let out = self.take(setup, apf, "-ws")?;
        let mut opts = RestoreOptions::new(&out);
        opts.lazy = true;
        opts.working_set = vmm::working_set::WorkingSetMode::Record;
        opts.timeout = Some(SNAPSHOT_TIMEOUT);
        opts.interrupt = Some(Arc::clone(interrupt::flag()));
        vmm::restore(&opts, &mut vmm::NoObserver)?;
        self.with_ws.insert((setup, apf), out.clone());
        Ok(out)
    }

    fn take(&mut self, setup: Setup, apf: ApfMode, suffix: &str) -> Result<PathBuf> {
        interrupt::check()?;
        let out = self.dir.path().join(format!(
            "snap-{}-{}vcpu-{}tpv-{}k-{apf:?}{suffix}",
            setup.shape.name(),
            setup.vcpus,
            setup.tasks_per_vcpu,
            setup.scan_per_task >> 10
        ));
        let opts = RunOptions {
            timeout: Some(SNAPSHOT_TIMEOUT),
            snapshot: Some(SnapshotPlan {
                out: out.clone(),
                on_guest_request: true,
                at: None,
                on_flag: None,
            }),
            ..RunOptions::default()
        };
        vmm::boot_and_run(&setup.config(apf)?, &opts)?;
        Ok(out)
    }

    /// An NBD export of `snapshot`'s memory file: `qemu-nbd` on a unix socket in the
    /// temporary directory, started now if needed, killed when this is dropped.
    pub fn nbd_url(&mut self, snapshot: &Path) -> Result<NbdUrl> {
        if let Some(s) = self.servers.get(snapshot) {
            return Ok(s.url().clone());
        }
        let socket = self
            .dir
            .path()
            .join(format!("nbd-{}.sock", self.servers.len()));
        let server =
            qemu_nbd::Server::start(&snapshot.join(vmm::snapshot::format::MEMORY), &socket)?;
        let url = server.url().clone();
        self.servers.insert(snapshot.to_path_buf(), server);
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_removed_when_dropped() {
        let s = Snapshots::new().unwrap();
        let p = s.path().to_path_buf();
        assert!(p.is_dir());
        drop(s);
        assert!(!p.exists());
    }
}
