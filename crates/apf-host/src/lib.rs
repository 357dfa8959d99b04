//! The host side of KVM's paravirtual asynchronous page fault (APF) protocol, as a sans-I/O
//! engine.
//!
//! One [`Engine`] per VM holds the protocol state of every vCPU: the APF MSRs, the
//! outstanding tokens, the "page ready" queues. Like quinn-proto's `Endpoint` it performs no
//! I/O whatsoever: the VMM feeds it events and performs the [`Action`]s it yields. It knows
//! nothing of KVM, threads, userfaultfd or clocks, so every rule of `docs/protocol.md`
//! §2–4 is a unit test, and the whole engine can be model-checked (it is `Clone + Eq + Hash`).
//!
//! # Use from a VMM
//! ```
//! use apf_abi::msr::{MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
//! use apf_abi::PvFeatures;
//! use apf_host::{Action, Engine, EngineConfig, FaultOutcome, RamMap, VcpuState};
//!
//! let mut engine = Engine::new(EngineConfig::new(PvFeatures::MODERN, 1, RamMap::single(0..1 << 20)));
//! // WRMSR exits: the guest writes `_INT` then `_EN` (area at 0x7000, ENABLED | DELIVERY_AS_INT).
//! engine.msr_write(0, MSR_KVM_ASYNC_PF_INT, 0xf3).unwrap();
//! engine.msr_write(0, MSR_KVM_ASYNC_PF_EN, 0x7000 | 9).unwrap();
//! // A fault at CPL 3 on a missing page: the engine injects "page not present".
//! let FaultOutcome::Injected(token) = engine.fault(0, 0x4_2000, VcpuState::USER).unwrap() else {
//!     unreachable!()
//! };
//! while let Some(action) = engine.poll_action() {
//!     // WriteArea { gpa: 0x7000, value: 1 }, then InjectPf { cr2: token }.
//! #   let _ = action;
//! }
//! // The page arrives; at the vCPU's next entry the "page ready" goes out
//! // (first the wake-all queued by the enable, then the token).
//! engine.page_arrived(0x4_2000);
//! assert!(engine.pending_delivery(0));
//! engine.delivery_window(0, VcpuState::USER).unwrap();
//! assert_eq!(
//!     engine.poll_action(),
//!     Some(Action::WriteArea { vcpu: 0, gpa: 0x7004, value: 0xffff_ffff })
//! );
//! # let _ = token;
//! ```
//!
//! # Inputs and outputs
//! - [`Engine::msr_write`] / [`Engine::msr_read`]: WRMSR/RDMSR of the three APF MSRs;
//!   [`Error::Gp`] means "answer #GP", nothing changed (the MSR keeps its value).
//! - [`Engine::fault`]: "vCPU v faulted on page P in state S" → [`FaultOutcome::Injected`]
//!   (actions queued), [`FaultOutcome::Sync`] (wait for the page synchronously, counted by
//!   [`FallbackReason`]) or [`FaultOutcome::AlreadyPresent`] (P has arrived already: just
//!   re-enter).
//! - [`Engine::page_arrived`]: every token on the page becomes ready; the arrival is
//!   remembered (a repeated report is a counted no-op). [`Engine::page_evicted`] forgets it.
//! - [`Engine::delivery_window`]: "vCPU v may take a delivery now (state S)". A wake-all
//!   covers, when it is handed out here, every token of v injected before it: those get no
//!   "page ready" of their own.
//! - [`Engine::reset`], [`Engine::save`], [`Engine::restore`].
//! - [`Engine::poll_action`]: [`Action::WriteArea`], [`Action::InjectPf`],
//!   [`Action::RaiseInterrupt`], in the order to perform them.
//! - [`Engine::pending_delivery`]: whether to kick a vCPU so that it opens a window.
//!
//! Questions about tokens and pages, so that nobody decodes a token's bits outside the
//! engine: [`Engine::token_owner`] (the vCPU that took a token's "not present"),
//! [`Engine::waits_on`] (does vCPU v hold a token still waiting for page P),
//! [`Engine::tokens_on_page`], [`Engine::is_outstanding`], [`Engine::is_arrived`],
//! [`Engine::wake_all_pending`] (open a window before reporting v's fault), and
//! [`Engine::counters`] ([`Counters`]; `Serialize` with the `serde` feature, reasons keyed
//! by [`FallbackReason::name`] / [`HoldReason::name`]).
//!
//! Where the engine differs from KVM on purpose: `docs/kvm-differences.md`.
//!
//! [`VcpuState`] carries the two u32 words of the vCPU's area, which the caller reads from
//! guest memory just before each call: the engine never reads memory.

mod action;
mod arrival;
mod config;
mod counters;
mod delivery;
mod engine;
mod error;
mod msr;
mod page;
mod snapshot;
mod state;
pub mod token;
mod vcpu;

#[cfg(test)]
mod testutil;

pub use action::{
    APF_ERROR_CODE, Action, Delivery, FallbackReason, FaultOutcome, HoldReason, PF_VECTOR,
};
pub use config::{DEFAULT_MAX_OUTSTANDING_PER_VCPU, EngineConfig, RamMap};
pub use counters::{Counters, DropCounts, FallbackCounts, GpCounts, HoldCounts};
pub use engine::Engine;
pub use error::Error;
pub use page::{PAGE_SIZE, page_of};
pub use snapshot::{SavedState, SavedVcpu};
pub use state::VcpuState;
