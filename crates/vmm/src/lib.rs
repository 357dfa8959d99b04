//! The `apfvm` VMM as a library: a KVM virtual machine monitor that serves KVM's
//! paravirtual asynchronous page fault (APF) protocol from userspace, to the project's own
//! guest kernel. The command line and the experiments live in the `apfvm` and `harness`
//! crates.
//!
//! Module map, from the bottom up:
//! - [`config`], [`workload`] (with [`hostile`]): what to run.
//! - [`memory`] (the one module with host pointers to guest RAM), [`layout`] (page tables,
//!   GDT, size rules), [`loader`] (the guest ELF), [`guest_image`] (the bundled guest).
//! - [`kvm`]: the VM (capabilities, MSR filter, irqchip), the vCPUs, CPUID.
//! - [`exit`]: exit handling as a free function over an owned [`exit::Exit`].
//! - [`kick`]: kicking a vCPU thread out of `KVM_RUN`.
//! - [`apf`]: the userspace APF driver (a pure core and its KVM executor) on the apf-host
//!   engine.
//! - [`snapshot`]: the on-disk format, taking one; [`source`] (a snapshot's memory from its
//!   file or NBD) and [`lazy`] (memory served on demand by the pager).
//! - [`machine`] (a VM booted or restored, not running), [`run`](mod@run) (running it: vCPU
//!   threads, APF driver, memory backend, observer), [`restore`](mod@restore) (snapshot → machine →
//!   memory → run), [`report`] (what a run produced).
//! - [`clones`]: many guests from one snapshot sharing one page cache (each chunk fetched
//!   once, mapped copy-on-write into every clone); [`host_memory`]: what guest memory
//!   costs the host (smaps, MemAvailable).

pub mod apf;
pub mod clones;
pub mod config;
pub mod console;
pub mod error;
pub mod exit;
pub mod guest_image;
pub mod host_memory;
pub mod hostile;
pub mod kick;
pub mod kvm;
pub mod layout;
pub mod lazy;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod report;
pub mod restore;
pub mod run;
pub mod snapshot;
pub mod source;
pub mod working_set;
pub mod workload;

pub use apf::ApfPolicy;
pub use config::{ApfMode, ApfPath, HaltMode, VmConfig};
pub use error::{Result, VmmError};
pub use machine::Machine;
pub use report::RunReport;
pub use restore::{RestoreOptions, restore};
pub use run::observer::{NoObserver, RunObserver};
pub use run::{ApfOptions, Memory, RunOptions, SnapshotPlan, run};

/// Boots `cfg` and runs it to its end.
pub fn boot_and_run(cfg: &VmConfig, opts: &RunOptions) -> Result<RunReport> {
    run(Machine::boot(cfg)?, Memory::Resident, opts, &mut NoObserver)
}

/// True when `/dev/kvm` exists.
pub fn kvm_available() -> bool {
    std::path::Path::new(kvm::vm::KVM_PATH).exists()
}
