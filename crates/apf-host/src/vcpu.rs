//! The protocol state of one vCPU.

use std::collections::VecDeque;

use apf_abi::{AsyncPfEn, AsyncPfInt, Token, Version};

/// Per-vCPU state. Tokens themselves live in the engine's VM-wide table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Vcpu {
    /// Last valid value written to `MSR_KVM_ASYNC_PF_EN`; `None` = never written (reads 0).
    pub en: Option<AsyncPfEn>,
    /// Last valid value written to `MSR_KVM_ASYNC_PF_INT`; `None` = never written.
    pub int: Option<AsyncPfInt>,
    /// Id counter of the token scheme.
    pub next_id: u32,
    /// Tokens owned by this vCPU: "not present" injected, "page ready" not yet handed out.
    pub outstanding: usize,
    /// Tokens whose page arrived, in arrival order, waiting for a delivery window.
    pub ready: VecDeque<Token>,
    /// A wake-all (0xffffffff) is queued.
    pub wake_all: bool,
    /// v2: a "page ready" was raised and not ACKed yet (KVM's `pageready_pending`). Kept
    /// across a re-enable, as KVM keeps it: the next delivery waits for the ACK.
    pub awaiting_ack: bool,
    /// v2: the token last written at offset 4, until the slot is seen free or ACKed. Kept out
    /// of allocation so a token the guest may still be reading is never reissued.
    pub in_slot: Option<Token>,
    /// v1: the last window with something to deliver was held, so other v1 vCPUs may take
    /// this vCPU's ready tokens.
    pub blocked: bool,
}

impl Vcpu {
    /// A vCPU after power-on: MSRs 0, nothing queued. Ids start at 1 as Linux's
    /// `alloc_apf_token` does, so vCPU 0's first token is 0x1000.
    pub fn new() -> Vcpu {
        Vcpu {
            next_id: 1,
            ..Vcpu::default()
        }
    }

    /// The protocol this vCPU speaks now, or `None` (disabled or inert).
    pub fn version(&self) -> Option<Version> {
        self.en.and_then(AsyncPfEn::version)
    }

    /// Guest-physical address of the area, when APF is active.
    pub fn area(&self) -> Option<u64> {
        self.version()?;
        self.en.map(AsyncPfEn::area_gpa)
    }

    /// Something is queued for this vCPU's own windows.
    pub fn has_own_pending(&self) -> bool {
        self.wake_all || !self.ready.is_empty()
    }
}
