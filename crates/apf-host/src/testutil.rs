//! Helpers shared by the unit tests.

use apf_abi::PvFeatures;
use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};

use crate::{Action, Delivery, Engine, EngineConfig, RamMap, VcpuState};

/// Guest RAM of the test VMs: 1 MiB at 0.
pub const RAM_END: u64 = 0x10_0000;
/// The page-ready vector the v2 tests use (Linux's is 0xf3).
pub const VECTOR: u8 = 0xf3;
/// A page the tests fault on.
pub const PAGE: u64 = 0x4_2000;

/// vCPU `v`'s area.
pub fn area(v: usize) -> u64 {
    0x7000 + 64 * v as u64
}

pub fn engine(features: PvFeatures, vcpus: usize) -> Engine {
    Engine::new(EngineConfig::new(
        features,
        vcpus,
        RamMap::single(0..RAM_END),
    ))
}

pub fn drain(e: &mut Engine) -> Vec<Action> {
    std::iter::from_fn(|| e.poll_action()).collect()
}

/// A seed-mode VM with APF enabled on every vCPU and the enable's wake-all delivered.
pub fn v1(vcpus: usize) -> Engine {
    let mut e = engine(PvFeatures::SEED, vcpus);
    for v in 0..vcpus {
        e.msr_write(v, MSR_KVM_ASYNC_PF_EN, area(v) | 1).unwrap();
        assert!(matches!(
            e.delivery_window(v, VcpuState::USER).unwrap(),
            Delivery::Delivered { .. }
        ));
    }
    drain(&mut e);
    e
}

/// A modern-mode VM with `_INT` and `_EN` written on every vCPU, the wake-all delivered and
/// ACKed.
pub fn v2(vcpus: usize) -> Engine {
    let mut e = engine(PvFeatures::MODERN, vcpus);
    for v in 0..vcpus {
        e.msr_write(v, MSR_KVM_ASYNC_PF_INT, u64::from(VECTOR))
            .unwrap();
        e.msr_write(v, MSR_KVM_ASYNC_PF_EN, area(v) | 9).unwrap();
        assert!(matches!(
            e.delivery_window(v, VcpuState::USER).unwrap(),
            Delivery::Delivered { .. }
        ));
        e.msr_write(v, MSR_KVM_ASYNC_PF_ACK, 1).unwrap();
    }
    drain(&mut e);
    e
}
