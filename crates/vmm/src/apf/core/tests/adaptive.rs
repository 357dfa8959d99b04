//! The adaptive policy inside the driver: APF or a synchronous wait, from fetch and APF
//! cycle times measured on fabricated event sequences.

use super::*;

/// A v2 vCPU 0 that has gone through three full, sampled APF cycles (the policy trusts a
/// cycle measured three times), each: fault message at T, injected at T + 100 µs (inject
/// 100), handler done at T + 300 (200), page mapped at T + 500 (fetch 500) and its
/// page-ready delivered from the pager thread, ACKed at T + 600 (ready 100).
fn measured_v2() -> Driver {
    let mut d = v2_with(ApfPolicy::Adaptive, 1);
    for (i, page) in [PAGE, PAGE + 0x1000, PAGE + 0x2000].into_iter().enumerate() {
        let base = 1000 + 1000 * i as u64;
        let at = |us: u64| t(base + us);
        assert_eq!(
            d.fault_reported(tid(0), page, at(0), false),
            Some(0),
            "cycle {i}"
        );
        let e = d.entry(0, VcpuState::USER, true, at(100));
        assert!(injected(&e).is_some(), "{e:?}");
        assert_eq!(
            e.again,
            Again::WhenInjectable,
            "a sampled injection asks for the end of its handler"
        );
        let handler = VcpuState {
            interrupts_enabled: false,
            cpl: 0,
            ..VcpuState::USER
        };
        // An exit inside the handler (interrupts off) does not end the sample.
        d.entry(0, handler, true, at(200));
        d.entry(0, VcpuState::USER, true, at(300));
        let wakes = d.page_mapped(page, at(500));
        assert_eq!(
            wakes,
            vec![Wake::Deliver {
                vcpu: 0,
                area: area(0)
            }]
        );
        assert!(d.deliver_now(0, 0, at(500)).is_some());
        d.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1, at(600)).unwrap();
    }
    let p = d.report().policy;
    assert_eq!(p.vcpus[0].cycle_us, Some(400.0), "{p:?}");
    assert_eq!(p.fetch_us, Some(500.0));
    d
}

/// A fetch of `us` µs seen by the driver (the VMM's own thread faulted, the page arrived).
fn fetch(d: &mut Driver, page: u64, start: u64, us: u64) {
    assert_eq!(d.fault_reported(1, page, t(start), false), None);
    assert!(d.page_mapped(page, t(start + us)).is_empty());
}

#[test]
fn a_fetch_slower_than_an_apf_cycle_takes_the_apf() {
    let mut d = measured_v2();
    // 500 µs expected > 400 µs cycle.
    assert_eq!(d.fault_reported(tid(0), OTHER, t(2000), false), Some(0));
    assert_eq!(
        d.engine()
            .counters()
            .fallback
            .get(FallbackReason::ShortWait),
        0
    );
}

#[test]
fn a_fetch_faster_than_an_apf_cycle_waits_and_is_counted_as_short_wait() {
    let mut d = measured_v2();
    for i in 0..32 {
        fetch(&mut d, OTHER + 0x10_0000 + i * 0x1000, 3000 + i * 100, 20);
    }
    assert_eq!(
        d.fault_reported(tid(0), OTHER, t(10_000), false),
        None,
        "no kick: the vCPU waits in KVM"
    );
    assert_eq!(
        d.engine()
            .counters()
            .fallback
            .get(FallbackReason::ShortWait),
        1
    );
    assert!(!d.has_work(0));
    // KVM retries the access while the page is on its way: still no kick.
    assert_eq!(d.fault_reported(tid(0), OTHER, t(10_010), true), None);
    assert_eq!(d.counters().sync_waits, 1);
    assert!(
        d.page_mapped(OTHER, t(10_030)).is_empty(),
        "no token, nothing to deliver"
    );
    assert_eq!(d.engine().outstanding(0), 0);
}

#[test]
fn the_age_of_the_fetch_in_flight_counts() {
    // Fetches of 1000 µs, a 400 µs cycle; another thread started OTHER's fetch at 100 ms.
    let faulted_at = |us: u64| {
        let mut d = measured_v2();
        for i in 0..32 {
            fetch(
                &mut d,
                OTHER + 0x10_0000 + i * 0x1000,
                3000 + i * 2000,
                1000,
            );
        }
        assert_eq!(d.fault_reported(1, OTHER, t(100_000), false), None);
        d.fault_reported(tid(0), OTHER, t(100_000 + us), true)
    };
    assert_eq!(faulted_at(100), Some(0), "900 µs left: APF");
    assert_eq!(faulted_at(700), None, "300 µs left: wait");
}

#[test]
fn waiting_replaces_a_fault_whose_kick_is_on_its_way() {
    let mut d = measured_v2();
    for i in 0..32 {
        fetch(
            &mut d,
            OTHER + 0x10_0000 + i * 0x1000,
            3000 + i * 2000,
            10_000,
        );
    }
    // Slow page: kicked.
    assert_eq!(d.fault_reported(tid(0), OTHER, t(100_000), false), Some(0));
    // Before the vCPU took it, it faults on a page that is nearly there: it waits for that
    // one, and the kick finds no fault to inject for a page it no longer waits on.
    assert_eq!(d.fault_reported(1, OTHER + 0x1000, t(90_100), false), None);
    assert_eq!(
        d.fault_reported(tid(0), OTHER + 0x1000, t(100_050), false),
        None
    );
    let e = d.entry(0, VcpuState::USER, true, t(100_100));
    assert!(injected(&e).is_none() && e.actions.is_empty(), "{e:?}");
}

#[test]
fn always_takes_the_apf_however_fast_the_source() {
    let mut d = v2(1);
    for i in 0..32 {
        fetch(&mut d, OTHER + 0x10_0000 + i * 0x1000, 3000 + i * 100, 1);
    }
    assert_eq!(d.fault_reported(tid(0), OTHER, t(10_000), false), Some(0));
    let e = d.entry(0, VcpuState::USER, true, t(10_100));
    assert!(injected(&e).is_some());
    assert_eq!(e.again, Again::No, "no sampling under --apf-policy always");
}

#[test]
fn a_sampled_v1_page_ready_asks_for_the_end_of_its_handler() {
    let mut d = v1_with(ApfPolicy::Adaptive, 1);
    let token = not_present(&mut d, 0, PAGE, t(1000));
    assert_ne!(token, 0);
    // The sampled injection's handler ends.
    d.entry(0, VcpuState::USER, true, t(1200));
    assert_eq!(kicks(d.page_mapped(PAGE, t(5000))), vec![0]);
    let e = d.entry(0, VcpuState::USER, true, t(5100));
    assert_eq!(reason(&e), Some(2));
    assert_eq!(e.again, Again::WhenInjectable);
    d.entry(0, VcpuState::USER, true, t(5400));
    let p = d.report().policy;
    assert_eq!(p.vcpus[0].ready_us, Some(300.0), "{p:?}");
}
