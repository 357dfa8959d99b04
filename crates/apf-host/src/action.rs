//! What the engine asks the VMM to do, and what it answers directly.

use core::fmt;

use apf_abi::Token;

/// Vector of the page-fault exception, on which every v1 APF and every "not present" arrives.
pub const PF_VECTOR: u8 = 14;

/// The #PF error code the engine gives an APF (KVM injects error code 0 for both types).
pub const APF_ERROR_CODE: u32 = 0;

/// One thing the VMM must do to the guest, drained with [`Engine::poll_action`].
///
/// Actions come in the order the VMM must perform them: an area write always precedes the
/// #PF or interrupt that tells the guest to read it. The VMM performs every drained action
/// before the vCPU named in it next enters the guest.
///
/// [`Engine::poll_action`]: crate::Engine::poll_action
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Write the little-endian u32 `value` at guest-physical `gpa` (inside `vcpu`'s area; the
    /// engine checked at enable time that the area lies wholly in guest RAM).
    WriteArea {
        /// The vCPU whose area this is.
        vcpu: usize,
        /// Guest-physical address of the u32 (area + 0 or area + 4).
        gpa: u64,
        /// The value.
        value: u32,
    },
    /// Inject #PF (vector 14) into `vcpu` with CR2 = `cr2` (a token, zero-extended) and the
    /// given error code.
    InjectPf {
        /// The vCPU.
        vcpu: usize,
        /// What CR2 must hold: the token.
        cr2: u64,
        /// The #PF error code ([`APF_ERROR_CODE`]).
        error_code: u32,
    },
    /// Raise interrupt `vector` on `vcpu` (v2 "page ready"); the interrupt controller holds
    /// it until the guest can take it.
    RaiseInterrupt {
        /// The vCPU.
        vcpu: usize,
        /// The vector last written to `MSR_KVM_ASYNC_PF_INT` (never below 32).
        vector: u8,
    },
}

impl Action {
    /// The vCPU the action is for.
    pub const fn vcpu(&self) -> usize {
        match *self {
            Action::WriteArea { vcpu, .. }
            | Action::InjectPf { vcpu, .. }
            | Action::RaiseInterrupt { vcpu, .. } => vcpu,
        }
    }
}

/// Why a fault is handled synchronously (the vCPU waits for the page, as without APF).
///
/// One variant per rule that forbids injecting "page not present"; each is counted. With the
/// `serde` feature it serializes as its [`name`](FallbackReason::name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum FallbackReason {
    /// APF is not enabled on this vCPU (bit 0 of `_EN` clear, or never written).
    NotEnabled,
    /// Modern mode, ENABLED without DELIVERY_AS_INT: accepted but inert ("current KVM hosts
    /// deliver nothing unless bit 3 is set", §3).
    Inert,
    /// "paging on" is a condition for injecting (§4).
    PagingOff,
    /// "(SEND_ALWAYS or CPL 3)" (§4).
    NotUserMode,
    /// "the host must never inject while IF = 0" (§2).
    InterruptsDisabled,
    /// "interrupts allowed (IF = 1, no interrupt shadow)" (§4).
    InterruptShadow,
    /// "no exception/event pending re-injection" (§4).
    EventPending,
    /// "never overwrite a reason the guest has not consumed" (§2): area offset 0 is not 0.
    ReasonNotConsumed,
    /// v2: the token slot holds a wake-all the guest has not taken yet (0xffffffff at area
    /// offset 4 as the VMM read it, or its write handed out and not drained). A token
    /// injected now would not be covered by that wake-all, yet its task would sleep before
    /// the interrupt is taken and be woken by it, and then get its own "page ready" too. Not
    /// a KVM rule: apfvm's, so that a wake-all covers exactly the tokens injected before its
    /// delivery (docs/kvm-differences.md).
    WakeAllInFlight,
    /// "At most 64 outstanding APFs per vCPU; past that the fault is handled synchronously"
    /// (§4), with the configured limit.
    OutstandingLimit,
    /// No token is free (only possible with thousands of vCPUs sharing token space).
    TokensExhausted,
    /// The VMM's policy: the page is expected sooner than an APF cycle costs this vCPU, so
    /// waiting for it is cheaper ([`crate::Engine::decline`]).
    ShortWait,
}

impl FallbackReason {
    /// Every reason, in the order the engine checks them.
    pub const ALL: [FallbackReason; 12] = [
        FallbackReason::NotEnabled,
        FallbackReason::Inert,
        FallbackReason::PagingOff,
        FallbackReason::NotUserMode,
        FallbackReason::InterruptsDisabled,
        FallbackReason::InterruptShadow,
        FallbackReason::EventPending,
        FallbackReason::ReasonNotConsumed,
        FallbackReason::WakeAllInFlight,
        FallbackReason::OutstandingLimit,
        FallbackReason::TokensExhausted,
        FallbackReason::ShortWait,
    ];

    /// Position in [`FallbackReason::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A stable snake_case name, the key under which reports and serialized counters carry
    /// this reason.
    pub const fn name(self) -> &'static str {
        match self {
            FallbackReason::NotEnabled => "not_enabled",
            FallbackReason::Inert => "inert",
            FallbackReason::PagingOff => "paging_off",
            FallbackReason::NotUserMode => "not_user_mode",
            FallbackReason::InterruptsDisabled => "interrupts_disabled",
            FallbackReason::InterruptShadow => "interrupt_shadow",
            FallbackReason::EventPending => "event_pending",
            FallbackReason::ReasonNotConsumed => "reason_not_consumed",
            FallbackReason::WakeAllInFlight => "wake_all_in_flight",
            FallbackReason::OutstandingLimit => "outstanding_limit",
            FallbackReason::TokensExhausted => "tokens_exhausted",
            FallbackReason::ShortWait => "short_wait",
        }
    }
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            FallbackReason::NotEnabled => "APF not enabled",
            FallbackReason::Inert => "APF enabled without DELIVERY_AS_INT (inert)",
            FallbackReason::PagingOff => "paging off",
            FallbackReason::NotUserMode => "CPL != 3 without SEND_ALWAYS",
            FallbackReason::InterruptsDisabled => "IF = 0",
            FallbackReason::InterruptShadow => "interrupt shadow",
            FallbackReason::EventPending => "event pending",
            FallbackReason::ReasonNotConsumed => "previous reason not consumed",
            FallbackReason::WakeAllInFlight => "wake-all in the token slot, not taken yet",
            FallbackReason::OutstandingLimit => "outstanding limit reached",
            FallbackReason::TokensExhausted => "no free token",
            FallbackReason::ShortWait => "page due sooner than an APF costs",
        };
        f.write_str(s)
    }
}

/// The engine's answer to "vCPU v faulted on page P". With the `serde` feature it
/// serializes (only) with the token as its u32 value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum FaultOutcome {
    /// "Page not present" injected with this token: drain the actions (area write, then #PF)
    /// and let the vCPU run; the VMM still fetches the page and reports
    /// [`Engine::page_arrived`](crate::Engine::page_arrived).
    Injected(#[cfg_attr(feature = "serde", serde(serialize_with = "token_raw"))] Token),
    /// Handle the fault synchronously: the vCPU waits for the page.
    Sync(FallbackReason),
    /// The page has already arrived ([`Engine::page_arrived`](crate::Engine::page_arrived)
    /// was reported for it before this fault reached the engine): no token, no action; let
    /// the vCPU re-enter, its access now succeeds.
    AlreadyPresent,
}

/// Serializes a token as its u32 value (apf-abi has no serde).
#[cfg(feature = "serde")]
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `serialize_with` passes a reference
fn token_raw<S: serde::Serializer>(token: &Token, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(token.get())
}

/// Why a pending "page ready" (or wake-all) was not delivered at a delivery window. With the
/// `serde` feature it serializes as its [`name`](HoldReason::name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum HoldReason {
    /// v1: IF = 0 (a v1 page ready is a #PF, which must not arrive with IF = 0).
    InterruptsDisabled,
    /// v1: interrupt shadow.
    InterruptShadow,
    /// v1: an exception/event is pending, or an injection the engine asked for has not been
    /// drained yet.
    EventPending,
    /// v1: the reason at area offset 0 has not been consumed.
    ReasonNotConsumed,
    /// v2: the token slot at area offset 4 is not free yet, or an interrupt the engine asked
    /// for has not been drained yet.
    TokenSlotBusy,
    /// v2: `MSR_KVM_ASYNC_PF_INT` was never written; the engine does not raise vector 0
    /// ("The guest writes `_INT` before `_EN`, or interrupt 0 could be injected", §3).
    NoVector,
}

impl HoldReason {
    /// Every reason.
    pub const ALL: [HoldReason; 6] = [
        HoldReason::InterruptsDisabled,
        HoldReason::InterruptShadow,
        HoldReason::EventPending,
        HoldReason::ReasonNotConsumed,
        HoldReason::TokenSlotBusy,
        HoldReason::NoVector,
    ];

    /// Position in [`HoldReason::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A stable snake_case name, the key under which reports and serialized counters carry
    /// this reason.
    pub const fn name(self) -> &'static str {
        match self {
            HoldReason::InterruptsDisabled => "interrupts_disabled",
            HoldReason::InterruptShadow => "interrupt_shadow",
            HoldReason::EventPending => "event_pending",
            HoldReason::ReasonNotConsumed => "reason_not_consumed",
            HoldReason::TokenSlotBusy => "token_slot_busy",
            HoldReason::NoVector => "no_vector",
        }
    }
}

/// What happened at a delivery window. With the `serde` feature it serializes (only) with
/// the token as its u32 value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum Delivery {
    /// Nothing is waiting for this vCPU.
    Nothing,
    /// A "page ready" for this token (or [`Token::WAKE_ALL`]) was handed out: drain the
    /// actions. `from_vcpu` is the vCPU whose fault it answers (differs from the window's
    /// vCPU only for a v1 ready taken over from a blocked vCPU).
    Delivered {
        /// The token delivered.
        #[cfg_attr(feature = "serde", serde(serialize_with = "token_raw"))]
        token: Token,
        /// The vCPU that took the "not present" (the window's own vCPU for a wake-all).
        from_vcpu: usize,
    },
    /// Something is waiting but cannot be delivered now.
    Held(HoldReason),
}
