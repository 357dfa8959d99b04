//! The userspace APF driver: turns missing-page faults of vCPU threads into "page not
//! present" APFs and arriving pages into "page ready", on top of the apf-host engine.
//!
//! ```text
//! pager thread: uffd message (gpa, thread id) ─► ApfService::fault_reported ─► Driver: kick vCPU v?
//!                                                                            └► Kicker::kick (signal)
//! vCPU v: KVM_RUN → EINTR ─► ApfService::entry: CPU state + area words (no lock held)
//!            └► Driver::entry: the pending fault → Engine::fault → inject #PF CR2 = T, or wait
//! pager thread: UFFDIO_COPY done ─► ApfService::page_mapped ─► Engine::page_arrived
//!     v2 owner, area in RAM: token into its slot + MSI from the pager thread (no exit)
//!     otherwise: kick; at its entry Engine::delivery_window: v1 #PF reason 2 | v2 token + MSI
//! v1: several deliveries wait for an interrupt window, which opens as the guest's handler returns
//! ```
//!
//! - [`core`]: the decisions, pure (events in, decisions out), unit-tested with fabricated
//!   sequences.
//! - [`service`]: the driver behind one mutex, and the thin executor on KVM.
//! - [`policy`]: when a fault becomes an APF (`--apf-policy`), from measured fetch and APF
//!   cycle times.
//! - [`metrics`]: what it counts and times, serialized as is into the report.

pub mod core;
pub mod metrics;
pub mod policy;
pub mod service;

pub use self::core::{Again, Driver, DriverConfig, Entry, PendingFault, Wake};
pub use metrics::{ActiveApf, ApfReport, DriverCounters, DriverLatency, EnableRecord};
pub use policy::{ApfPolicy, PolicyReport};
pub use service::ApfService;
