//! Restore, re-enable and bad MSR writes, the report's records and latencies, and a storm
//! of faults in which every token must be answered once.

use super::*;

#[test]
fn a_restored_v1_guest_takes_the_wake_all_before_its_first_fault() {
    let mut d = driver(PvFeatures::SEED, 1, |_| {});
    let saved = apf_host::SavedState {
        vcpus: vec![apf_host::SavedVcpu {
            async_pf_en: area(0) | 1,
            ..Default::default()
        }],
    };
    assert_eq!(
        d.restore(&saved).unwrap(),
        [0],
        "the enable path queued a wake-all"
    );
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(1));
    assert_eq!((reason(&e), injected(&e)), (Some(2), Some(0xffff_ffff)));
    assert_eq!(
        d.counters().deferred_faults,
        1,
        "the fault comes back after the wake-all"
    );
    assert_eq!(d.fault_reported(tid(0), PAGE, t(2), true), Some(0));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(reason(&e), Some(1));
}

#[test]
fn a_v2_wake_all_in_flight_defers_the_fault_until_its_ack() {
    let mut d = driver(PvFeatures::MODERN, 1, |_| {});
    d.msr_write(0, MSR_KVM_ASYNC_PF_INT, u64::from(VECTOR), t(0))
        .unwrap();
    d.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 9, t(0))
        .unwrap();
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(1));
    assert_eq!(raised(&e), Some(0xffff_ffff));
    assert!(
        injected(&e).is_none(),
        "no not-present while the wake-all is in flight"
    );
    assert_eq!(d.counters().deferred_faults, 1);
    assert_eq!(
        d.engine().counters().fallback.total(),
        0,
        "deferred, not synchronous"
    );
    d.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1, t(0)).unwrap();
    assert_eq!(d.fault_reported(tid(0), PAGE, t(2), true), Some(0));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(reason(&e), Some(1));
}

#[test]
fn invalid_msr_writes_are_refused_and_counted() {
    let mut d = driver(PvFeatures::SEED, 1, |_| {});
    assert!(
        d.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1 | 1 << 4, t(0))
            .is_err()
    );
    assert!(d.msr_write(0, MSR_KVM_ASYNC_PF_EN, RAM | 1, t(0)).is_err());
    assert_eq!(d.counters().msr_exits, 2);
    assert_eq!(d.engine().counters().gp.total(), 2);
    assert!(d.enables().is_empty());
    assert!(!d.has_work(0));
}

#[test]
fn enables_are_recorded_with_their_protocol() {
    let d = v2(2);
    let versions: Vec<_> = d
        .enables()
        .iter()
        .map(|e| (e.vcpu, e.area_gpa, e.version))
        .collect();
    assert_eq!(versions, [(0, area(0), Some(2)), (1, area(1), Some(2))]);
    let r = d.report();
    assert_eq!(r.active.iter().flatten().count(), 2);
}

#[test]
fn fetch_latency_runs_from_the_first_fault_to_the_mapping() {
    let mut d = v1(1);
    d.fault_reported(7, PAGE, t(0), false);
    d.fault_reported(tid(0), PAGE, t(400), true);
    d.page_mapped(PAGE, t(1000));
    let f = d.latency().fetch.summary();
    assert_eq!(f.count, 1);
    assert!((990_000..=1_010_000).contains(&f.p50_ns), "{f:?}");
}

#[test]
fn every_token_is_answered_once_in_a_fault_storm() {
    // Many faults over several vCPUs and pages, pages arriving in another order: every
    // injected token gets exactly one page-ready.
    let mut d = v1(2);
    let mut tokens = Vec::new();
    for i in 0..8u64 {
        let v = usize::try_from(i % 2).unwrap();
        tokens.push(not_present(&mut d, v, PAGE + (i << 12), t(i)));
    }
    let mut delivered = Vec::new();
    for i in (0..8u64).rev() {
        for v in kicks(d.page_mapped(PAGE + (i << 12), t(100 + i))) {
            loop {
                let e = d.entry(v, with_area(&d, v, VcpuState::USER, 0, 0), true, t(200));
                delivered.extend(injected(&e));
                if e.again == Again::No {
                    break;
                }
            }
        }
    }
    delivered.sort_unstable();
    tokens.sort_unstable();
    assert_eq!(delivered, tokens);
    assert_eq!(d.report().outstanding_at_end, 0);
}
