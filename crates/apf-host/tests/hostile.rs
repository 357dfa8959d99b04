//! Hostile input: every MSR value and number, every vCPU index, every guest state. Nothing
//! may panic; every invalid MSR value is answered with #GP and changes nothing; the engine's
//! invariants hold after every input.

use apf_abi::cpuid::{FEATURE_ASYNC_PF, FEATURE_ASYNC_PF_INT, FEATURE_ASYNC_PF_VMEXIT};
use apf_abi::msr::{self, MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use apf_abi::{AsyncPfAck, AsyncPfEn, AsyncPfInt, MsrError, PvFeatures};
use apf_host::{
    Action, Engine, EngineConfig, Error, FaultOutcome, RamMap, SavedState, SavedVcpu, VcpuState,
};
use proptest::prelude::*;

const FEATURES: [PvFeatures; 5] = [
    PvFeatures(0),
    PvFeatures::SEED,
    PvFeatures::MODERN,
    PvFeatures(FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT | FEATURE_ASYNC_PF_VMEXIT),
    PvFeatures(FEATURE_ASYNC_PF_INT),
];
const RAM_END: u64 = 0x10_0000;

fn engine(features: PvFeatures, vcpus: usize) -> Engine {
    let mut c = EngineConfig::new(
        features,
        vcpus,
        RamMap::new([0..RAM_END, 0x1_0000_0000..0x1_0001_0000]),
    );
    c.max_outstanding_per_vcpu = 3;
    Engine::new(c)
}

fn msr_number() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(MSR_KVM_ASYNC_PF_EN),
        Just(MSR_KVM_ASYNC_PF_INT),
        Just(MSR_KVM_ASYNC_PF_ACK),
        any::<u32>()
    ]
}

fn msr_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0..RAM_END / 64, 0..64u64).prop_map(|(a, f)| (a * 64) | f),
        (0..64u64).prop_map(|f| 0x7000 | f),
        0..300u64,
    ]
}

fn state() -> impl Strategy<Value = VcpuState> {
    (
        0..4u8,
        any::<[bool; 4]>(),
        prop_oneof![Just(0u32), any::<u32>()],
        prop_oneof![Just(0u32), any::<u32>()],
    )
        .prop_map(|(cpl, [i, s, e, p], area_reason, area_token)| VcpuState {
            cpl,
            interrupts_enabled: i,
            interrupt_shadow: s,
            event_pending: e,
            paging: p,
            area_reason,
            area_token,
        })
}

/// What the engine must answer for an MSR write, from apf-abi's parsing and the RAM map.
fn expected(features: PvFeatures, msr: u32, value: u64) -> Result<(), Error> {
    let r = match msr {
        MSR_KVM_ASYNC_PF_EN => AsyncPfEn::parse(value, features).and_then(|en| {
            let ram = RamMap::new([0..RAM_END, 0x1_0000_0000..0x1_0001_0000]);
            if en.version().is_some() && !ram.contains_area(en.area_gpa()) {
                Err(MsrError::AreaNotInRam { gpa: en.area_gpa() })
            } else {
                Ok(())
            }
        }),
        MSR_KVM_ASYNC_PF_INT => AsyncPfInt::parse(value, features).map(|_| ()),
        MSR_KVM_ASYNC_PF_ACK => AsyncPfAck::parse(value, features).map(|_| ()),
        msr => return Err(Error::NotApfMsr { msr }),
    };
    r.map_err(Error::Gp)
}

#[derive(Clone, Debug)]
enum Input {
    Write(usize, u32, u64),
    Read(usize, u32),
    Fault(usize, u64, VcpuState),
    Arrive(u64),
    Window(usize, VcpuState),
    Reset(usize),
    Restore(Vec<(u64, u64, u64)>),
    Poll,
}

fn input() -> impl Strategy<Value = Input> {
    let v = prop_oneof![0..3usize, any::<usize>()];
    let page = prop_oneof![
        (0..4u64).prop_map(|p| 0x4_0000 + (p << 12) + 7),
        any::<u64>()
    ];
    prop_oneof![
        4 => (v.clone(), msr_number(), msr_value()).prop_map(|(v, m, x)| Input::Write(v, m, x)),
        1 => (v.clone(), msr_number()).prop_map(|(v, m)| Input::Read(v, m)),
        4 => (v.clone(), page.clone(), state()).prop_map(|(v, p, s)| Input::Fault(v, p, s)),
        2 => page.prop_map(Input::Arrive),
        4 => (v.clone(), state()).prop_map(|(v, s)| Input::Window(v, s)),
        1 => v.prop_map(Input::Reset),
        1 => prop::collection::vec((msr_value(), msr_value(), 0..3u64), 0..4).prop_map(Input::Restore),
        4 => Just(Input::Poll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every MSR number and value, in every feature mode, on a fresh and on an enabled vCPU:
    /// the answer is exactly apf-abi's verdict (plus the RAM check), and a #GP changes nothing.
    #[test]
    fn every_invalid_msr_value_is_gp_and_changes_nothing(
        f in 0..FEATURES.len(), msr in msr_number(), value in msr_value(), prior in msr_value()
    ) {
        let features = FEATURES[f];
        let mut e = engine(features, 2);
        let _ = e.msr_write(0, MSR_KVM_ASYNC_PF_INT, 0xf3);
        let _ = e.msr_write(0, MSR_KVM_ASYNC_PF_EN, prior);
        let before = e.clone();
        let got = e.msr_write(0, msr, value);
        prop_assert_eq!(got, expected(features, msr, value));
        if got.is_err() {
            // Only the #GP counter moved.
            let mut after = e.clone();
            let mut b = before.clone();
            let _ = after.take_counters();
            let _ = b.take_counters();
            prop_assert_eq!(after, b);
            if let Err(Error::Gp(_)) = got {
                prop_assert_eq!(e.counters().gp.total(), before.counters().gp.total() + 1);
            }
        }
        let _ = e.msr_read(1, msr);
        e.check_invariants().map_err(TestCaseError::fail)?;
    }

    /// Arbitrary sequences of every input, with out-of-range vCPUs and hostile guest state:
    /// no panic, invariants hold, tokens are never 0 or 0xffffffff, never reused while
    /// outstanding, and actions only name existing vCPUs.
    #[test]
    fn arbitrary_inputs_never_panic(f in 0..FEATURES.len(), inputs in prop::collection::vec(input(), 1..200)) {
        let mut e = engine(FEATURES[f], 3);
        for i in inputs {
            match i {
                Input::Write(v, m, x) => { let _ = e.msr_write(v, m, x); }
                Input::Read(v, m) => { let _ = e.msr_read(v, m); }
                Input::Fault(v, p, s) => {
                    let was = e.clone();
                    if let Ok(FaultOutcome::Injected(t)) = e.fault(v, p, s) {
                        prop_assert!(t.is_individual() && t.get() != 0);
                        prop_assert!(!was.is_outstanding(t), "{:?} reused", t);
                        prop_assert!(s.interrupts_allowed() && !s.event_pending && s.paging && s.area_reason == 0);
                    }
                }
                Input::Arrive(p) => { e.page_arrived(p); }
                Input::Window(v, s) => { let _ = e.delivery_window(v, s); }
                Input::Reset(v) => { let _ = e.reset(v); }
                Input::Restore(vs) => {
                    let saved = SavedState {
                        vcpus: vs.into_iter().map(|(a, b, c)| SavedVcpu { async_pf_en: a, async_pf_int: b, async_pf_ack: c }).collect(),
                    };
                    let before = e.clone();
                    if e.restore(&saved).is_err() {
                        prop_assert_eq!(&e, &before);
                    }
                }
                Input::Poll => {
                    while let Some(a) = e.poll_action() {
                        prop_assert!(a.vcpu() < 3);
                        if let Action::RaiseInterrupt { vector, .. } = a {
                            prop_assert!(vector >= msr::MIN_INT_VECTOR);
                        }
                    }
                }
            }
            e.check_invariants().map_err(TestCaseError::fail)?;
            for v in 0..3 {
                prop_assert!(e.outstanding(v) <= 3);
            }
        }
    }
}
