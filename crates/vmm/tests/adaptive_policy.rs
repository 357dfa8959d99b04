//! The adaptive APF policy (`--apf-policy adaptive`, the default) on KVM: with pages that
//! come at once, nearly every fault waits for its page (`short_wait`) instead of costing
//! an APF cycle; with pages that take long, every fault is an APF. Both restores are correct
//! either way. Prints exactly `SKIPPED: no /dev/kvm` where KVM is absent.

use apf_host::FallbackReason;
use testkit::fixture::{
    Guest, assert_every_token_answered, assert_passed, restore_ok, restore_options,
};
use vmm::{ApfMode, ApfPath, ApfPolicy, RunReport};

fn restore(snap: &std::path::Path, latency: &str) -> RunReport {
    let mut opts = restore_options(snap, true, ApfPath::Userspace, latency);
    opts.apf_policy = ApfPolicy::Adaptive;
    let r = restore_ok(&opts);
    assert_passed(&r);
    assert_every_token_answered(&r);
    r
}

#[test]
fn quick_pages_are_waited_for_and_slow_ones_get_apfs() {
    if !testkit::require_kvm() {
        return;
    }
    let guest = Guest {
        vcpus: 1,
        workload: "scan:4".into(),
        scan_bytes: Some(8 << 20),
        ..Guest::standard(ApfMode::V2)
    };
    let dir = testkit::scratch("adaptive_policy", "snap");
    let snap = dir.join("snap");
    guest.snapshot(&snap);

    let quick = restore(&snap, "0");
    let waited = quick.apf.engine.fallback.get(FallbackReason::ShortWait);
    let faults = quick.apf.driver.vcpu_faults;
    println!(
        "0 latency: {faults} vCPU faults, {waited} waited, {} APFs; policy {:?}",
        quick.apf.engine.injected, quick.apf.policy
    );
    assert!(
        quick.apf.policy.vcpus[0].cycle_us.is_some(),
        "the APF cycle was measured: {:?}",
        quick.apf.policy
    );
    assert!(
        waited * 2 > faults,
        "most faults should wait for pages that come at once: {waited} of {faults}"
    );

    let slow = restore(&snap, "20ms");
    let waited = slow.apf.engine.fallback.get(FallbackReason::ShortWait);
    println!(
        "20 ms: {} vCPU faults, {waited} waited, {} APFs",
        slow.apf.driver.vcpu_faults, slow.apf.engine.injected
    );
    assert_eq!(waited, 0, "a 20 ms page is never worth waiting for");
    assert!(slow.apf.engine.injected > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
