//! Why `EngineConfig::v1_ready_on_other_vcpus` is off by default: the interleaving below
//! (found while building the model checker) loses a wakeup when a v1 "page ready" is taken
//! by another vCPU, and loses none when it stays on the faulting vCPU.
//!
//! vCPU 0's task faults (token T injected, #PF not taken yet); the page arrives; vCPU 0's
//! window is held (its #PF is pending); vCPU 1 takes T's ready → the guest records a dummy
//! for T; vCPU 1 disables and re-enables APF → its wake-all clears every dummy; vCPU 0 takes
//! its #PF and sleeps on T — and no ready for T will ever come.

mod common;

use apf_abi::Version;
use common::Event::{Arrive, Disable, Enable, Enter, Touch, Window};
use common::{Flavor, World};

fn run(cross: bool) -> Result<(), String> {
    let tasks = [(0, vec![0]), (0, vec![1]), (1, vec![0])];
    let mut w = World::with_cross_vcpu(Version::V1, 2, 2, &tasks, cross);
    w.enable(0, false)?;
    w.enable(1, false)?;
    for ev in [
        Window(0, Flavor::User),
        Enter(0),
        Window(1, Flavor::User),
        Enter(1),
        Touch(0, Flavor::User),
        Arrive(0),
        Window(0, Flavor::Cli),
        Window(1, Flavor::User),
        Enter(1),
        Disable(1),
        Enable(1, false),
        Window(1, Flavor::User),
        Enter(1),
        Enter(0),
    ] {
        w.apply(ev)?;
    }
    w.complete()
}

#[test]
fn same_vcpu_delivery_loses_no_wakeup() {
    run(false).unwrap();
}

#[test]
fn cross_vcpu_delivery_with_a_dummy_clearing_wake_all_loses_a_wakeup() {
    let err = run(true).unwrap_err();
    assert!(err.contains("lost wakeup"), "{err}");
}
