//! The driver's inputs and outputs: its configuration, a fault waiting for its vCPU, what an
//! entry must do, how a page-ready reaches its vCPU.

use std::ops::Range;
use std::time::Instant;

use apf_host::{Action, EngineConfig};

use super::super::policy::ApfPolicy;

/// How the driver is set up.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The engine: features offered, vCPUs, RAM map, outstanding limit.
    pub engine: EngineConfig,
    /// Turn missing-page faults of vCPU threads into APFs (lazy restore with `--apf on`).
    /// Off: no vCPU is kicked for a fault; each one waits for its page in KVM.
    pub faults_to_apf: bool,
    /// The guest-physical ranges served lazily (a page there is in RAM once it arrived;
    /// everywhere else it is in RAM from the start).
    pub lazy: Vec<Range<u64>>,
    /// When a fault becomes an APF (`--apf-policy`).
    pub policy: ApfPolicy,
}

/// A fault reported by the pager, waiting for its vCPU's thread to take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingFault {
    /// The faulting frame.
    pub page: u64,
    /// When the pager read the message.
    pub at: Instant,
}

/// What a vCPU thread must do after [`Driver::entry`]: the engine's actions for this vCPU, in
/// order, and when it must come back.
///
/// [`Driver::entry`]: super::Driver::entry
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Area writes, the #PF to inject (at most one), the interrupt to raise.
    pub actions: Vec<Action>,
    /// Whether work is left for a later entry.
    pub again: Again,
}

/// How a vCPU gets a page-ready that just became due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Kick it: it takes the page-ready at its next entry.
    Kick(usize),
    /// Deliver it from the reporting thread ([`Driver::deliver_now`]) after reading the token
    /// slot of the area at `area` (resident: reading it cannot fault).
    ///
    /// [`Driver::deliver_now`]: super::Driver::deliver_now
    Deliver {
        /// The vCPU.
        vcpu: usize,
        /// Its area.
        area: u64,
    },
}

/// Work left after an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Again {
    /// Nothing.
    No,
    /// An exception must wait for the instruction that exited to complete: re-enter with
    /// `immediate_exit` set (KVM completes it and returns at once), then come back.
    AfterCompletion,
    /// A delivery is held by the guest's interrupt state (IF = 0, an interrupt shadow, an
    /// event being injected) or waits behind the exception injected now: come back at the
    /// first moment the guest can take an injection (an interrupt window).
    WhenInjectable,
    /// A delivery is held by the guest's area (a reason not consumed, the v2 token slot not
    /// freed): nothing the vCPU's state says when that changes; look again a little later.
    Later,
}
