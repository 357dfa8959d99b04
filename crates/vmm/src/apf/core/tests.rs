//! The driver's decisions, driven by fabricated event sequences: thread ids, fault messages,
//! page arrivals, vCPU states at entries, MSR writes, all with made-up times.

use std::time::{Duration, Instant};

use apf_abi::PvFeatures;
use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use apf_host::{Action, EngineConfig, FallbackReason, RamMap, VcpuState};

use super::{Again, Driver, DriverConfig, Entry, Wake};
use crate::apf::policy::ApfPolicy;

const RAM: u64 = 64 << 20;
const PAGE: u64 = 0x200_0000;
const OTHER: u64 = 0x300_0000;
const VECTOR: u8 = 0xf3;
/// What the tests' guests serve lazily (their areas, at 0x7000, are below).
const LAZY: std::ops::Range<u64> = 0x100_0000..RAM;
/// Thread id of vCPU `v`'s thread.
fn tid(v: usize) -> u32 {
    1000 + u32::try_from(v).unwrap()
}

fn area(v: usize) -> u64 {
    0x7000 + 64 * v as u64
}

/// `us` microseconds after a fixed instant.
fn t(us: u64) -> Instant {
    thread_local! { static BASE: Instant = Instant::now(); }
    BASE.with(|b| *b + Duration::from_micros(us))
}

fn driver(features: PvFeatures, vcpus: usize, config: impl FnOnce(&mut EngineConfig)) -> Driver {
    driver_with(ApfPolicy::Always, features, vcpus, config)
}

fn driver_with(
    policy: ApfPolicy,
    features: PvFeatures,
    vcpus: usize,
    config: impl FnOnce(&mut EngineConfig),
) -> Driver {
    let mut engine = EngineConfig::new(features, vcpus, RamMap::single(0..RAM));
    config(&mut engine);
    let mut d = Driver::new(DriverConfig {
        engine,
        faults_to_apf: true,
        lazy: vec![LAZY],
        policy,
    });
    for v in 0..vcpus {
        d.vcpu_thread(v, tid(v));
    }
    d
}

fn with_area(d: &Driver, v: usize, mut s: VcpuState, reason: u32, token: u32) -> VcpuState {
    assert!(d.area(v).is_some(), "APF active on vCPU {v}");
    s.area_reason = reason;
    s.area_token = token;
    s
}

/// A v1 VM: every vCPU enabled and its enable's wake-all delivered and consumed.
fn v1(vcpus: usize) -> Driver {
    v1_with(ApfPolicy::Always, vcpus)
}

fn v1_with(policy: ApfPolicy, vcpus: usize) -> Driver {
    let mut d = driver_with(policy, PvFeatures::SEED, vcpus, |_| {});
    for v in 0..vcpus {
        assert_eq!(
            d.msr_write(v, MSR_KVM_ASYNC_PF_EN, area(v) | 1, t(0)),
            Ok(true),
            "wake-all queued"
        );
        let e = d.entry(v, VcpuState::USER, true, t(0));
        assert_eq!(injected(&e), Some(0xffff_ffff), "{e:?}");
    }
    d
}

/// A v2 VM: `_INT` and `_EN` written, the wake-all raised and ACKed.
fn v2(vcpus: usize) -> Driver {
    v2_with(ApfPolicy::Always, vcpus)
}

fn v2_with(policy: ApfPolicy, vcpus: usize) -> Driver {
    let mut d = driver_with(policy, PvFeatures::MODERN, vcpus, |_| {});
    for v in 0..vcpus {
        d.msr_write(v, MSR_KVM_ASYNC_PF_INT, u64::from(VECTOR), t(0))
            .unwrap();
        assert_eq!(
            d.msr_write(v, MSR_KVM_ASYNC_PF_EN, area(v) | 9, t(0)),
            Ok(true)
        );
        let e = d.entry(v, VcpuState::USER, true, t(0));
        assert_eq!(raised(&e), Some(0xffff_ffff), "{e:?}");
        d.msr_write(v, MSR_KVM_ASYNC_PF_ACK, 1, t(0)).unwrap();
    }
    d
}

/// The vCPUs a page arrival kicks (none may be handed its page-ready from the pager).
fn kicks(wakes: Vec<Wake>) -> Vec<usize> {
    wakes
        .into_iter()
        .map(|w| match w {
            Wake::Kick(v) => v,
            Wake::Deliver { .. } => panic!("delivered from the pager thread: {w:?}"),
        })
        .collect()
}

/// The CR2 of the #PF an entry injects.
fn injected(e: &Entry) -> Option<u32> {
    let pfs: Vec<u32> = e
        .actions
        .iter()
        .filter_map(|a| match *a {
            Action::InjectPf { cr2, .. } => Some(u32::try_from(cr2).unwrap()),
            _ => None,
        })
        .collect();
    assert!(pfs.len() <= 1, "one exception per entry: {e:?}");
    pfs.first().copied()
}

/// The token a v2 entry writes at offset 4 and raises the vector for.
fn raised(e: &Entry) -> Option<u32> {
    let token = e.actions.iter().find_map(|a| match *a {
        Action::WriteArea { gpa, value, .. } if gpa % 64 == 4 => Some(value),
        _ => None,
    })?;
    assert!(
        e.actions.contains(&Action::RaiseInterrupt {
            vcpu: 0,
            vector: VECTOR
        }) || e
            .actions
            .iter()
            .any(|a| matches!(a, Action::RaiseInterrupt { vector: VECTOR, .. })),
        "{e:?}"
    );
    Some(token)
}

/// The reason an entry writes at offset 0.
fn reason(e: &Entry) -> Option<u32> {
    e.actions.iter().find_map(|a| match *a {
        Action::WriteArea { gpa, value, .. } if gpa % 64 == 0 => Some(value),
        _ => None,
    })
}

/// vCPU `v` faults on `gpa`, is kicked, and takes the fault at CPL 3 with IF = 1.
fn not_present(d: &mut Driver, v: usize, gpa: u64, at: Instant) -> u32 {
    assert_eq!(d.fault_reported(tid(v), gpa, at, false), Some(v));
    let e = d.entry(v, with_area(d, v, VcpuState::USER, 0, 0), true, at);
    assert_eq!(reason(&e), Some(1), "{e:?}");
    injected(&e).expect("not present injected")
}

#[test]
fn fault_on_a_thread_that_is_no_vcpu_kicks_nobody() {
    let mut d = v1(1);
    assert_eq!(d.fault_reported(7, PAGE, t(0), false), None);
    assert_eq!(d.counters().other_thread_faults, 1);
    assert!(!d.has_work(0));
}

#[test]
fn fault_on_a_vcpu_thread_kicks_that_vcpu() {
    let mut d = v1(2);
    assert_eq!(d.fault_reported(tid(1), PAGE + 0x123, t(0), false), Some(1));
    assert!(d.has_work(1) && !d.has_work(0));
    assert_eq!(d.counters().fault_kicks, 1);
}

#[test]
fn faults_are_not_kicked_when_apf_is_off() {
    let mut d = Driver::new(DriverConfig {
        engine: EngineConfig::new(PvFeatures::SEED, 1, RamMap::single(0..RAM)),
        faults_to_apf: false,
        lazy: vec![LAZY],
        policy: ApfPolicy::Always,
    });
    d.vcpu_thread(0, tid(0));
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), None);
    assert_eq!(d.counters().apf_off_faults, 1);
}

#[test]
fn kicked_vcpu_at_cpl_3_gets_reason_1_and_a_pf_with_the_token() {
    for mut d in [v1(1), v2(1)] {
        assert_eq!(d.fault_reported(tid(0), PAGE + 8, t(0), false), Some(0));
        let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(30));
        let token = d.engine().tokens_on_page(PAGE)[0];
        assert_eq!(
            e.actions,
            [
                Action::WriteArea {
                    vcpu: 0,
                    gpa: area(0),
                    value: 1
                },
                Action::InjectPf {
                    vcpu: 0,
                    cr2: u64::from(token.get()),
                    error_code: 0
                },
            ]
        );
        assert_eq!(e.again, Again::No);
        assert_eq!(d.engine().tokens_on_page(PAGE).len(), 1);
        assert_eq!(d.latency().fault_to_apf.summary().count, 1);
        assert!(d.latency().fault_to_apf.summary().p50_ns >= 29_000);
    }
}

#[test]
fn fault_on_a_page_that_arrived_while_the_kick_travelled_is_dropped() {
    let mut d = v1(1);
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    assert!(
        d.page_mapped(PAGE, t(5)).is_empty(),
        "no token yet: nobody to kick"
    );
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(10));
    assert!(e.actions.is_empty(), "{e:?}");
    assert_eq!(e.again, Again::No);
    assert_eq!(d.counters().stale_faults, 1);
    assert_eq!(d.engine().counters().injected, 0);
}

#[test]
fn fault_message_read_after_its_page_arrived_kicks_nobody() {
    let mut d = v1(1);
    d.page_mapped(PAGE, t(0));
    assert_eq!(d.fault_reported(tid(0), PAGE, t(1), true), None);
    assert_eq!(d.counters().faults_after_arrival, 1);
    assert!(!d.has_work(0));
}

#[test]
fn second_fault_on_an_in_flight_page_by_the_same_vcpu_waits_synchronously() {
    let mut d = v1(1);
    not_present(&mut d, 0, PAGE, t(0));
    // Another task of vCPU 0 (or a late duplicate message) on the same page: no kick, no
    // second token for a fault the vCPU may not be blocked on.
    assert_eq!(d.fault_reported(tid(0), PAGE + 0x800, t(1), true), None);
    assert_eq!(d.counters().same_page_sync, 1);
    assert_eq!(d.engine().tokens_on_page(PAGE).len(), 1);
}

#[test]
fn second_fault_on_an_in_flight_page_from_another_vcpu_gets_its_own_token() {
    let mut d = v1(2);
    let a = not_present(&mut d, 0, PAGE, t(0));
    let b = not_present(&mut d, 1, PAGE + 16, t(1));
    assert_ne!(a, b);
    assert_eq!(d.engine().tokens_on_page(PAGE).len(), 2);
    // Both become ready together; each owner is kicked.
    assert_eq!(kicks(d.page_mapped(PAGE, t(9))), [0, 1]);
    let ea = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(10));
    let eb = d.entry(1, with_area(&d, 1, VcpuState::USER, 0, 0), true, t(10));
    assert_eq!((injected(&ea), injected(&eb)), (Some(a), Some(b)));
    assert_eq!((reason(&ea), reason(&eb)), (Some(2), Some(2)));
}

#[test]
fn duplicate_message_before_the_entry_is_coalesced() {
    let mut d = v1(1);
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    assert_eq!(
        d.fault_reported(tid(0), PAGE, t(3), true),
        None,
        "the first kick is on its way"
    );
    assert_eq!(d.counters().coalesced_faults, 1);
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(10));
    assert!(injected(&e).is_some());
    // The latency counts from the first message.
    assert!(d.latency().fault_to_apf.summary().p50_ns >= 9_000);
}

#[test]
fn a_later_fault_supersedes_an_untaken_one() {
    let mut d = v1(1);
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    assert_eq!(d.fault_reported(tid(0), OTHER, t(1), false), None);
    assert_eq!(d.counters().superseded_faults, 1);
    not_present_taken(&mut d, OTHER);
}

fn not_present_taken(d: &mut Driver, page: u64) {
    let e = d.entry(0, with_area(d, 0, VcpuState::USER, 0, 0), true, t(5));
    assert!(injected(&e).is_some(), "{e:?}");
    assert_eq!(d.engine().tokens_on_page(page).len(), 1);
}

#[test]
fn a_synchronous_fault_is_not_kicked_again_until_its_page_arrives() {
    let mut d = v1(1);
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    let cli = VcpuState {
        interrupts_enabled: false,
        ..VcpuState::USER
    };
    let e = d.entry(0, with_area(&d, 0, cli, 0, 0), true, t(1));
    assert!(e.actions.is_empty());
    assert_eq!(
        d.engine()
            .counters()
            .fallback
            .get(FallbackReason::InterruptsDisabled),
        1
    );
    // KVM retried the access after the kick: the new message is not kicked.
    assert_eq!(d.fault_reported(tid(0), PAGE, t(2), true), None);
    assert_eq!(d.counters().sync_waits, 1);
    d.page_mapped(PAGE, t(3));
    // Another page is a new fault.
    assert_eq!(d.fault_reported(tid(0), OTHER, t(4), false), Some(0));
}

#[test]
fn v1_page_ready_while_the_guest_has_if_0_is_held_then_delivered() {
    let mut d = v1(1);
    let token = not_present(&mut d, 0, PAGE, t(0));
    assert_eq!(kicks(d.page_mapped(PAGE, t(100))), [0]);
    let cli = VcpuState {
        interrupts_enabled: false,
        ..VcpuState::USER
    };
    let e = d.entry(0, with_area(&d, 0, cli, 0, 0), true, t(101));
    assert!(e.actions.is_empty(), "never a #PF while IF = 0: {e:?}");
    assert_eq!(e.again, Again::WhenInjectable);
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(150));
    assert_eq!((reason(&e), injected(&e)), (Some(2), Some(token)));
    assert_eq!(e.again, Again::No);
    assert!(d.latency().ready_delivery.summary().p50_ns >= 49_000);
}

#[test]
fn v1_page_ready_never_overwrites_an_unconsumed_reason() {
    let mut d = v1(1);
    let token = not_present(&mut d, 0, PAGE, t(0));
    d.page_mapped(PAGE, t(1));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 1, 0), true, t(2));
    assert!(e.actions.is_empty());
    assert_eq!(
        e.again,
        Again::Later,
        "the guest's area holds it, not its interrupt state"
    );
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(injected(&e), Some(token));
}

#[test]
fn page_mapped_kicks_only_the_owners_of_its_tokens() {
    let mut d = v1(3);
    not_present(&mut d, 1, PAGE, t(0));
    not_present(&mut d, 2, OTHER, t(0));
    assert_eq!(kicks(d.page_mapped(PAGE, t(1))), [1]);
    assert!(d.page_mapped(PAGE + 0x1000, t(1)).is_empty());
    assert_eq!(d.counters().ready_kicks, 1);
    assert!(d.has_work(1) && !d.has_work(0) && !d.has_work(2));
}

#[test]
fn v2_page_ready_writes_the_token_raises_the_vector_and_waits_for_the_ack() {
    let mut d = v2(1);
    let a = not_present(&mut d, 0, PAGE, t(0));
    let b = not_present(&mut d, 0, OTHER, t(1));
    assert_eq!(
        d.page_mapped(PAGE, t(2)),
        [Wake::Deliver {
            vcpu: 0,
            area: area(0)
        }],
        "the area is in RAM: the pager thread hands the page-ready out"
    );
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(raised(&e), Some(a));
    assert_eq!(e.again, Again::No, "the ACK brings the vCPU back");
    assert!(
        d.page_mapped(OTHER, t(3)).is_empty(),
        "nothing before the ACK"
    );
    // Nothing more until the guest frees the slot and ACKs.
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, a), true, t(4));
    assert!(e.actions.is_empty());
    assert_eq!(
        d.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1, t(0)),
        Ok(true),
        "the next ready is due"
    );
    // The ACK's wrmsr still has to complete: an interrupt may go now.
    let e = d.entry(0, with_area(&d, 0, VcpuState::KERNEL, 0, 0), false, t(5));
    assert_eq!(raised(&e), Some(b));
}

#[test]
fn v1_two_ready_tokens_go_one_per_entry_back_to_back() {
    let mut d = v1(1);
    let a = not_present(&mut d, 0, PAGE, t(0));
    let b = not_present(&mut d, 0, OTHER, t(1));
    d.page_mapped(PAGE, t(2));
    d.page_mapped(OTHER, t(2));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(injected(&e), Some(a));
    assert_eq!(
        e.again,
        Again::WhenInjectable,
        "the second waits for the next chance"
    );
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(4));
    assert_eq!(injected(&e), Some(b));
    assert_eq!(e.again, Again::No);
    let counters = d.counters();
    assert_eq!(
        (
            counters.window_waits,
            counters.window_deliveries,
            counters.retry_waits
        ),
        (1, 1, 0),
        "{counters:?}"
    );
}

#[test]
fn v1_not_present_and_page_ready_at_one_entry_one_exception() {
    let mut d = v1(1);
    let a = not_present(&mut d, 0, PAGE, t(0));
    d.page_mapped(PAGE, t(1));
    assert_eq!(d.fault_reported(tid(0), OTHER, t(1), false), Some(0));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(2));
    let first = injected(&e).unwrap();
    assert_ne!(first, a, "the fault the vCPU is blocked on goes first");
    assert_eq!(e.again, Again::WhenInjectable);
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(3));
    assert_eq!(injected(&e), Some(a));
}

#[test]
fn completion_pending_keeps_the_fault_for_the_entry_after_it() {
    let mut d = v1(1);
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), false, t(1));
    assert!(
        e.actions.is_empty(),
        "no exception before the completion: {e:?}"
    );
    assert_eq!(e.again, Again::AfterCompletion);
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(2));
    assert!(injected(&e).is_some());
}

#[test]
fn disable_with_faults_outstanding_delivers_nothing_for_them() {
    for mut d in [v1(1), v2(1)] {
        let token = not_present(&mut d, 0, PAGE, t(0));
        assert_eq!(d.msr_write(0, MSR_KVM_ASYNC_PF_EN, 0, t(0)), Ok(false));
        assert!(
            !d.engine()
                .is_outstanding(apf_abi::Token::new(token).unwrap())
        );
        assert!(d.page_mapped(PAGE, t(1)).is_empty());
        assert!(!d.has_work(0));
        assert_eq!(d.report().outstanding_at_end, 0);
    }
}

#[test]
fn outstanding_limit_reached_the_fault_waits_synchronously() {
    let mut d = driver(PvFeatures::SEED, 1, |c| c.max_outstanding_per_vcpu = 1);
    d.msr_write(0, MSR_KVM_ASYNC_PF_EN, area(0) | 1, t(0))
        .unwrap();
    d.entry(0, VcpuState::USER, true, t(0));
    not_present(&mut d, 0, PAGE, t(0));
    assert_eq!(d.fault_reported(tid(0), OTHER, t(1), false), Some(0));
    let e = d.entry(0, with_area(&d, 0, VcpuState::USER, 0, 0), true, t(2));
    assert!(e.actions.is_empty());
    assert_eq!(
        d.engine()
            .counters()
            .fallback
            .get(FallbackReason::OutstandingLimit),
        1
    );
    assert_eq!(
        d.fault_reported(tid(0), OTHER, t(3), true),
        None,
        "waits for its page"
    );
}

#[test]
fn apf_not_enabled_the_fault_waits_synchronously() {
    let mut d = driver(PvFeatures::SEED, 1, |_| {});
    assert_eq!(d.fault_reported(tid(0), PAGE, t(0), false), Some(0));
    let e = d.entry(0, VcpuState::USER, true, t(1));
    assert!(e.actions.is_empty());
    assert_eq!(
        d.engine()
            .counters()
            .fallback
            .get(FallbackReason::NotEnabled),
        1
    );
}

mod adaptive;
mod direct;
mod lifecycle;
