//! A v1 guest receives page-readies back to back, without a timer between them: eight tasks
//! on one vCPU fault on cold memory faster than the guest handles their APFs, so page-readies
//! keep arriving while the guest is inside a handler (interrupts off); v1 delivers one #PF
//! (reason 2) per entry, and each held one goes out at the guest's next interrupt window
//! (the end of the handler), never after the driver's retry delay. Prints exactly `SKIPPED: no /dev/kvm` where KVM is absent.

use testkit::fixture::{
    Guest, assert_every_token_answered, assert_passed, restore_ok, restore_options,
};
use vmm::{ApfMode, ApfPath, ApfPolicy};

#[test]
fn v1_page_readies_go_out_back_to_back_at_interrupt_windows() {
    if !testkit::require_kvm() {
        return;
    }
    let guest = Guest {
        vcpus: 1,
        workload: "scan:8".into(),
        scan_bytes: Some(8 << 20),
        ..Guest::standard(ApfMode::V1)
    };
    let dir = testkit::scratch("v1_back_to_back", "snap");
    let snap = dir.join("snap");
    guest.snapshot(&snap);
    let mut opts = restore_options(&snap, true, ApfPath::Userspace, "1ms");
    opts.apf_policy = ApfPolicy::Always;
    let r = restore_ok(&opts);
    assert_passed(&r);
    assert_every_token_answered(&r);
    let d = &r.apf.driver;
    let c = &r.cpus[0];
    assert!(c.not_present > 0 && c.page_ready == c.not_present, "{c:?}");
    assert!(
        d.window_deliveries > 0,
        "no page-ready went out at an interrupt window: the test shows nothing: {d:?}"
    );
    assert_eq!(
        d.retry_waits, 0,
        "a delivery waited for the retry timer instead of the next window: {d:?}"
    );
    println!(
        "{} not-present, {} page-readies at interrupt windows, {} window waits",
        c.not_present, d.window_deliveries, d.window_waits
    );
    let _ = std::fs::remove_dir_all(&dir);
}
