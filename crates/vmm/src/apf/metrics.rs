//! What the APF driver counts and times, serialized as it is into the run's report.

use apf_abi::{AsyncPfEn, Version};
use pager::Latency;

use super::policy::PolicyReport;

/// Every decision of the driver (the engine counts its own: `apf_host::Counters`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DriverCounters {
    /// APF MSR exits (reads and writes, valid or not).
    pub msr_exits: u64,
    /// Fault messages naming a vCPU thread.
    pub vcpu_faults: u64,
    /// Of those, for a page whose fetch was already in flight.
    pub duplicate_faults: u64,
    /// Fault messages from other threads (the VMM reading memory, KVM's workers).
    pub other_thread_faults: u64,
    /// Fault messages read after their page was mapped (the access was retried already).
    pub faults_after_arrival: u64,
    /// vCPU faults left to wait for their page because faults are not turned into APFs.
    pub apf_off_faults: u64,
    /// Kicks sent so that a vCPU takes its fault.
    pub fault_kicks: u64,
    /// Messages for the fault a vCPU was already kicked for (no second kick).
    pub coalesced_faults: u64,
    /// Faults replaced by a later one of the same vCPU before it took them.
    pub superseded_faults: u64,
    /// Faults not kicked because their vCPU holds a token for that page.
    pub same_page_sync: u64,
    /// Messages not kicked because their vCPU waits for that page synchronously.
    pub sync_waits: u64,
    /// Faults a vCPU handed to the engine (then injected, synchronous by reason, or stale).
    pub faults_to_engine: u64,
    /// Of those, whose page arrived before the vCPU took them (the access simply retries).
    pub stale_faults: u64,
    /// Faults left for the next fault message because an exception or a wake-all went out
    /// first at that entry.
    pub deferred_faults: u64,
    /// Pages the pager reported mapped.
    pub pages_mapped: u64,
    /// Kicks sent so that a vCPU takes a page-ready.
    pub ready_kicks: u64,
    /// v2 page-readies handed out by the thread that mapped the page (the token written
    /// into the slot, the interrupt raised), the vCPU never leaving the guest.
    pub direct_readies: u64,
    /// Entries at which the driver had work (a fault or a delivery).
    pub entries: u64,
    /// Entries that left a delivery (or a sample) for the guest's next interrupt window:
    /// the vCPU comes back the moment the guest can take an injection.
    pub window_waits: u64,
    /// Entries whose delivery the guest's area held (reason not consumed, token slot busy):
    /// the vCPU is kicked again after a short delay, the only timer left on the path.
    pub retry_waits: u64,
    /// Entries that handed out a page-ready at the interrupt window the previous entry
    /// asked for: deliveries back to back behind the guest's previous handler, with no
    /// timer between them.
    pub window_deliveries: u64,
}

/// The latencies of the userspace APF path.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DriverLatency {
    /// Fault message read → "page not present" injected.
    pub fault_to_apf: Latency,
    /// First fault message on a page → page mapped (fetch, added latency, copy).
    pub fetch: Latency,
    /// Page mapped → its page-ready handed out.
    pub ready_delivery: Latency,
}

/// A valid write to `MSR_KVM_ASYNC_PF_EN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EnableRecord {
    /// The vCPU.
    pub vcpu: usize,
    /// The value written.
    pub raw: u64,
    /// Area address (bits 63..6).
    pub area_gpa: u64,
    /// The protocol turned on, 1 or 2 (`None`: disabled, or inert).
    pub version: Option<u8>,
}

impl EnableRecord {
    /// The record of a write of `raw`, parsed as `en`.
    pub fn new(vcpu: usize, raw: u64, en: &AsyncPfEn) -> EnableRecord {
        EnableRecord {
            vcpu,
            raw,
            area_gpa: en.area_gpa(),
            version: en.version().map(version_number),
        }
    }
}

/// APF active on a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ActiveApf {
    /// 1 or 2.
    pub version: u8,
    /// Area address.
    pub area_gpa: u64,
}

/// The APF section of a run's report: the engine's counters and the driver's, as they are.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApfReport {
    /// Every protocol decision (apf-host).
    pub engine: apf_host::Counters,
    /// Every decision of the driver around it.
    pub driver: DriverCounters,
    /// The path's latencies.
    pub latency: DriverLatency,
    /// Tokens outstanding at the end (not-present injected, page-ready not handed out).
    pub outstanding_at_end: u64,
    /// Per vCPU at the end: the protocol and area while APF is active.
    pub active: Vec<Option<ActiveApf>>,
    /// Every valid `_EN` write, in order (at most the first 256).
    pub enables: Vec<EnableRecord>,
    /// What the APF policy measured: fetch time, each vCPU's APF cycle in parts.
    pub policy: PolicyReport,
}

/// `Version` as the number the protocol's documents use.
pub fn version_number(v: Version) -> u8 {
    match v {
        Version::V1 => 1,
        Version::V2 => 2,
    }
}
