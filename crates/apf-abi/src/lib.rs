//! The wire contract of KVM's paravirtual asynchronous page fault (APF) protocol.
//!
//! Everything a host and a guest must agree on, and nothing else: MSR numbers and their bit
//! fields ([`msr`]), the CPUID discovery bits ([`cpuid`]), the 64-byte shared area ([`area`]),
//! [`Token`] and [`Reason`]. MSR values are parsed into typed values against what the host
//! advertises; every invalid value gets a precise [`MsrError`], which a host answers with #GP.
//!
//! `no_std`, no allocation: the same crate serves the VMM and the guest kernel.
//! Rules are quoted from `docs/protocol.md` (§2 = v1, the seed patch; §3 = v2).
#![no_std]

pub mod area;
pub mod cpuid;
pub mod msr;
mod token;

pub use area::Reason;
pub use cpuid::{HostMode, PvFeatures};
pub use msr::{AsyncPfAck, AsyncPfEn, AsyncPfInt, MsrError, Version};
pub use token::Token;
