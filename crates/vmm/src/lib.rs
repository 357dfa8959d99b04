//! `apfvm`: a KVM virtual machine monitor that serves KVM's paravirtual asynchronous page
//! fault (APF) protocol from userspace, to the project's own guest kernel.
//!
//! Module map:
//! - [`config`], [`workload`]: what to run.
//! - [`memory`] (the one module with host pointers to guest RAM), [`layout`] (page tables,
//!   GDT, size rules), [`loader`] (the guest ELF), [`guest_image`] (the bundled guest).
//! - [`kvm`]: VM creation (capabilities, [`kvm::msr_filter`], irqchip) and [`kvm::vcpu`].
//! - [`cpuid`]: the CPUID table per `--apf`.
//! - [`exit`]: exit handling as a free function over an owned [`exit::Exit`].
//! - [`apf`]: the apf-host engine and the carrying out of its actions.
//! - [`kick`]: kicking vCPUs out of `KVM_RUN` (now or after a delay).
//! - [`vcpu_loop`], [`run`](mod@run)(mod@run): the vCPU threads and one whole run; [`console`]: port 0xe9;
//!   [`report`]: the results (text and JSON).
//! - [`snapshot`] (format, taking one), [`restore`] (eager and lazy), [`lazy`] (the pager
//!   behind lazily restored memory); the userspace APF path is in [`apf`].
//! - [`bench`] (shared orchestration: snapshots, one restore per mode, medians, plot) and
//!   [`demo`] (the `apfvm demo` and `apfvm bench` commands); [`soak`] (`apfvm soak`: random
//!   restores over and over, every run checked).
//! - [`cli`]: the `apfvm` command line (the binary is `src/main.rs`).

pub mod apf;
pub mod bench;
pub mod cli;
pub mod config;
pub mod console;
pub mod cpuid;
pub mod demo;
pub mod error;
pub mod exit;
pub mod guest_image;
pub mod hostile;
pub mod kick;
pub mod kvm;
pub mod layout;
pub mod lazy;
pub mod loader;
pub mod memory;
pub mod report;
pub mod restore;
pub mod run;
pub mod snapshot;
pub mod soak;
pub mod vcpu_loop;
pub mod workload;

pub use config::{ApfMode, HaltMode, VmConfig};
pub use error::{Result, VmmError};
pub use report::RunReport;
pub use run::{RunOptions, SnapshotPlan, run, run_with};

/// True when `/dev/kvm` exists (tests skip without it).
pub fn kvm_available() -> bool {
    std::path::Path::new(kvm::vm::KVM_PATH).exists()
}
