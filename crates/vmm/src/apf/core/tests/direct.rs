//! Page-readies handed out from the pager thread (v2, area in RAM) and what stays the
//! vCPU's own to deliver.

use super::*;

#[test]
fn v2_page_ready_goes_out_from_the_pager_thread_when_the_area_is_in_ram() {
    let mut d = v2(1);
    let a = not_present(&mut d, 0, PAGE, t(0));
    let wakes = d.page_mapped(PAGE, t(10));
    assert_eq!(
        wakes,
        [Wake::Deliver {
            vcpu: 0,
            area: area(0)
        }]
    );
    let actions = d.deliver_now(0, 0, t(12)).expect("the slot is free");
    assert_eq!(
        actions,
        [
            Action::WriteArea {
                vcpu: 0,
                gpa: area(0) + 4,
                value: a
            },
            Action::RaiseInterrupt {
                vcpu: 0,
                vector: VECTOR
            },
        ]
    );
    assert_eq!(d.counters().direct_readies, 1);
    assert_eq!(d.counters().ready_kicks, 0, "no exit needed");
    assert!(d.latency().ready_delivery.summary().p50_ns >= 1_900);
    // Until the ACK nothing else goes, from any thread.
    assert_eq!(d.deliver_now(0, 0, t(13)), None);
}

#[test]
fn v2_page_ready_with_the_slot_still_busy_is_left_to_the_vcpu() {
    let mut d = v2(1);
    let a = not_present(&mut d, 0, PAGE, t(0));
    // The guest freed the slot of its last ready but has not written it back to 0 yet
    // (its handler runs): the pager thread leaves the delivery to the vCPU.
    d.page_mapped(PAGE, t(1));
    assert_eq!(d.deliver_now(0, 0xdead, t(2)), None);
    assert_eq!(d.counters().ready_kicks, 1);
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(raised(&e), Some(a));
}

#[test]
fn v2_area_in_lazy_memory_is_written_by_the_vcpu_until_it_arrived() {
    // The area lies in the lazily served range: reading it from the pager thread could
    // fault on a page only that thread can map. The vCPU takes its readies itself.
    let lazy_area = LAZY.start + 0x40;
    let mut d = driver(PvFeatures::MODERN, 1, |_| {});
    d.msr_write(0, MSR_KVM_ASYNC_PF_INT, u64::from(VECTOR), t(0))
        .unwrap();
    d.msr_write(0, MSR_KVM_ASYNC_PF_EN, lazy_area | 9, t(0))
        .unwrap();
    let e = d.entry(0, VcpuState::USER, true, t(0));
    assert_eq!(raised(&e), Some(0xffff_ffff));
    d.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1, t(0)).unwrap();
    let tok = not_present(&mut d, 0, PAGE, t(1));
    assert_eq!(d.page_mapped(PAGE, t(2)), [Wake::Kick(0)]);
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(raised(&e), Some(tok));
    d.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1, t(0)).unwrap();
    // Once the area's page is in RAM, the pager thread may deliver.
    d.page_mapped(lazy_area, t(4));
    not_present(&mut d, 0, OTHER, t(5));
    assert_eq!(
        d.page_mapped(OTHER, t(6)),
        [Wake::Deliver {
            vcpu: 0,
            area: lazy_area
        }]
    );
}

#[test]
fn v1_page_ready_is_always_the_vcpus_own_to_inject() {
    let mut d = v1(1);
    not_present(&mut d, 0, PAGE, t(0));
    assert_eq!(d.page_mapped(PAGE, t(1)), [Wake::Kick(0)]);
    assert_eq!(
        d.deliver_now(0, 0, t(2)),
        None,
        "a #PF cannot come from another thread"
    );
}
