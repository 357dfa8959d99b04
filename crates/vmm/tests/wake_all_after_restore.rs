//! Issue 15 on KVM: after a lazy restore, the guest's tasks fault at once while the restore's
//! wake-all (token 0xffffffff) is still to be delivered. A wake-all covers every token whose
//! "not present" was injected before it and no individual page-ready follows for those; the
//! guest counts readies for tokens it had already woken by a wake-all
//! (`CpuCounters::ready_after_wake_all`), which must stay 0, and every token is answered
//! exactly once. Prints exactly `SKIPPED: no /dev/kvm` where KVM is absent.

use testkit::fixture::{
    assert_every_token_answered, assert_passed, restore_ok, restore_options, standard_snapshot,
};
use vmm::{ApfMode, ApfPath};

fn restores_answer_every_token_once(apf: ApfMode) {
    let snap = standard_snapshot(apf);
    let mut covered = 0;
    for round in 0..6 {
        let r = restore_ok(&restore_options(snap, true, ApfPath::Userspace, "20ms"));
        assert_passed(&r);
        assert_every_token_answered(&r);
        let e = &r.apf.engine;
        assert!(e.injected > 0, "{apf:?} round {round}: no APF: {e:?}");
        assert_eq!(
            e.wake_all_delivered, e.wake_all_queued,
            "{apf:?} round {round}: {e:?}"
        );
        for c in &r.cpus {
            assert_eq!(
                c.ready_after_wake_all, 0,
                "{apf:?} round {round}: vCPU {} got a page-ready for a token a wake-all had covered",
                c.index
            );
        }
        covered += e.dropped.wake_all;
    }
    println!("{apf:?}: {covered} tokens covered by a wake-all over 6 restores");
}

#[test]
fn v1_restores_never_send_a_ready_for_a_covered_token() {
    if !testkit::require_kvm() {
        return;
    }
    restores_answer_every_token_once(ApfMode::V1);
}

#[test]
fn v2_restores_never_send_a_ready_for_a_covered_token() {
    if !testkit::require_kvm() {
        return;
    }
    restores_answer_every_token_once(ApfMode::V2);
}
