//! Micro-benchmarks of the engine's hot paths: fault admission, page arrival with many tokens,
//! "page ready" delivery, the full not-present → ready → delivered cycle (v1 and v2), and MSR
//! parsing for reference.
//!
//! `cargo bench -p apf-host --bench engine` (short defaults: 1 s warm-up, 2 s measurement;
//! command-line options such as `--quick` or `--measurement-time` override them).
//!
//! Every timed section performs real engine work on one long-lived engine in a realistic
//! state: APF enabled on the vCPU, the enable's wake-all delivered (and ACKed in v2). Where a
//! benchmark consumes state (a fault adds a token, a delivery retires one, an arrival is
//! remembered), it runs in rounds of at most 64 calls (the outstanding limit) whose setup and
//! retirement are not timed (see [`rounds`]); retirement includes `page_evicted` for the
//! round's pages, so the next round faults on them again.

use std::hint::black_box;
use std::time::{Duration, Instant};

use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use apf_abi::{AsyncPfEn, PvFeatures, Token, Version};
use apf_host::{
    DEFAULT_MAX_OUTSTANDING_PER_VCPU, Delivery, Engine, EngineConfig, FaultOutcome, PAGE_SIZE,
    RamMap, VcpuState,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Guest RAM: 1 GiB at 0.
const RAM_END: u64 = 1 << 30;
/// vCPU 0's APF area.
const AREA: u64 = 0x7000;
/// The v2 "page ready" vector (Linux's).
const VECTOR: u64 = 0xf3;
/// The first page the benchmarks fault on.
const PAGE: u64 = 0x10_0000;

const VERSIONS: [Version; 2] = [Version::V1, Version::V2];

fn name(version: Version) -> &'static str {
    match version {
        Version::V1 => "v1",
        Version::V2 => "v2",
    }
}

/// A one-vCPU VM with APF enabled in `version`, its wake-all delivered (and ACKed in v2), no
/// action left to drain.
fn engine(version: Version) -> Engine {
    let (features, en) = match version {
        Version::V1 => (PvFeatures::SEED, AREA | 1),
        Version::V2 => (PvFeatures::MODERN, AREA | 9),
    };
    let mut e = Engine::new(EngineConfig::new(features, 1, RamMap::single(0..RAM_END)));
    if version == Version::V2 {
        e.msr_write(0, MSR_KVM_ASYNC_PF_INT, VECTOR).unwrap();
    }
    e.msr_write(0, MSR_KVM_ASYNC_PF_EN, en).unwrap();
    let d = e.delivery_window(0, VcpuState::USER).unwrap();
    assert!(
        matches!(d, Delivery::Delivered { token, .. } if token.is_wake_all()),
        "{d:?}"
    );
    drain(&mut e);
    ack(&mut e, version);
    e
}

/// Drains the queued actions as a VMM would, returning how many there were.
fn drain(e: &mut Engine) -> usize {
    let mut n = 0;
    while let Some(a) = e.poll_action() {
        black_box(a);
        n += 1;
    }
    n
}

/// v2: the guest cleared the slot and writes `_ACK` = 1. v1 has no ACK.
fn ack(e: &mut Engine, version: Version) {
    if version == Version::V2 {
        e.msr_write(0, MSR_KVM_ASYNC_PF_ACK, 1).unwrap();
    }
}

/// Injects "not present" on vCPU 0 for `gpa` and drains the two actions.
fn inject(e: &mut Engine, gpa: u64) -> Token {
    let FaultOutcome::Injected(t) = e.fault(0, gpa, VcpuState::USER).unwrap() else {
        panic!("fault at {gpa:#x} fell back");
    };
    assert_eq!(drain(e), 2);
    t
}

/// The `i`-th distinct page after [`PAGE`].
fn page(i: u64) -> u64 {
    PAGE + i * PAGE_SIZE
}

/// Forgets the arrival of pages `0..k` (untimed), so they can be faulted on again.
fn evict(e: &mut Engine, k: u64) {
    for i in 0..k {
        e.page_evicted(page(i));
    }
}

/// Times `iters` calls of `op` on one long-lived engine (as a VMM keeps it: its queues keep
/// their capacity), in rounds of at most `round` calls: `setup(e, k)` prepares a round of `k`
/// calls, `op(e, i)` is call `i` of the round (the only timed part), `teardown(e, k)` brings
/// the engine back to no token outstanding. A clone per call (`iter_batched`) would instead
/// time the first allocation of every queue of the clone, several times the steady cost.
fn rounds(
    e: &mut Engine,
    iters: u64,
    round: u64,
    mut setup: impl FnMut(&mut Engine, u64),
    mut op: impl FnMut(&mut Engine, u64),
    mut teardown: impl FnMut(&mut Engine, u64),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let k = round.min(iters - done);
        setup(e, k);
        let start = Instant::now();
        for i in 0..k {
            op(e, i);
        }
        total += start.elapsed();
        teardown(e, k);
        assert_eq!(e.outstanding(0), 0);
        done += k;
    }
    total
}

/// Hands out every pending "page ready" (v2: with its `_ACK`), draining the actions.
fn deliver_all(e: &mut Engine, version: Version) {
    while e.pending_delivery(0) {
        let d = e.delivery_window(0, VcpuState::USER).unwrap();
        assert!(matches!(d, Delivery::Delivered { .. }), "{d:?}");
        drain(e);
        ack(e, version);
    }
}

/// Tokens one vCPU may have outstanding (Linux's 64).
const LIMIT: u64 = DEFAULT_MAX_OUTSTANDING_PER_VCPU as u64;

/// `fault` → `Injected` plus draining its two actions (area write, #PF), on faults at 0..63
/// tokens already outstanding (rounds of 64 distinct pages, retired between rounds); and the
/// cheapest refusal (IF = 0 → synchronous) for reference.
fn fault_admission(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_admission");
    for version in VERSIONS {
        let mut e = engine(version);
        g.bench_function(name(version), |b| {
            b.iter_custom(|iters| {
                rounds(
                    &mut e,
                    iters,
                    LIMIT,
                    |_, _| {},
                    |e, i| {
                        let outcome = e.fault(0, black_box(page(i)), black_box(VcpuState::USER));
                        assert!(matches!(outcome, Ok(FaultOutcome::Injected(_))));
                        assert_eq!(drain(e), 2);
                    },
                    |e, k| {
                        for i in 0..k {
                            assert_eq!(e.page_arrived(page(i)), 1);
                        }
                        deliver_all(e, version);
                        evict(e, k);
                    },
                )
            });
        });
    }
    // A refused fault changes nothing but a counter, so it runs on one engine as it is.
    let mut e = engine(Version::V2);
    let irq_off = VcpuState {
        interrupts_enabled: false,
        ..VcpuState::USER
    };
    g.bench_function("v2/sync_fallback_if0", |b| {
        b.iter(|| {
            let outcome = e.fault(0, black_box(PAGE), black_box(irq_off));
            assert!(matches!(outcome, Ok(FaultOutcome::Sync(_))));
        });
    });
    g.finish();
}

/// One `page_arrived` readying 1, 16 or 64 tokens waiting on its page (rounds of 64/N such
/// pages); 64 pages with one token each (one iteration = 64 calls); and a page nobody waits
/// for. The path is the same in v1 and v2; the engine is v2.
fn page_arrival(c: &mut Criterion) {
    let version = Version::V2;
    let mut g = c.benchmark_group("page_arrival");
    for tokens in [1_u64, 16, 64] {
        let mut e = engine(version);
        g.throughput(Throughput::Elements(tokens));
        g.bench_function(BenchmarkId::new("one_page", tokens), |b| {
            b.iter_custom(|iters| {
                rounds(
                    &mut e,
                    iters,
                    LIMIT / tokens,
                    |e, k| {
                        for p in 0..k {
                            for _ in 0..tokens {
                                inject(e, page(p));
                            }
                        }
                    },
                    |e, p| {
                        let n = e.page_arrived(black_box(page(p)));
                        assert_eq!(u64::try_from(n), Ok(tokens));
                    },
                    |e, k| {
                        deliver_all(e, version);
                        evict(e, k);
                    },
                )
            });
        });
    }
    let mut e = engine(version);
    g.throughput(Throughput::Elements(LIMIT));
    g.bench_function("64_pages_one_token_each", |b| {
        b.iter_custom(|iters| {
            rounds(
                &mut e,
                iters,
                1,
                |e, _| {
                    for p in 0..LIMIT {
                        inject(e, page(p));
                    }
                },
                |e, _| {
                    for p in 0..LIMIT {
                        assert_eq!(e.page_arrived(black_box(page(p))), 1);
                    }
                },
                |e, _| {
                    deliver_all(e, version);
                    evict(e, LIMIT);
                },
            )
        });
    });
    g.throughput(Throughput::Elements(1));
    let mut e = engine(version);
    g.bench_function("no_waiter", |b| {
        b.iter_custom(|iters| {
            rounds(
                &mut e,
                iters,
                LIMIT,
                |_, _| {},
                |e, p| assert_eq!(e.page_arrived(black_box(page(p))), 0),
                evict,
            )
        });
    });
    g.finish();
}

/// `delivery_window` handing out one ready token plus draining its two actions (v1: area
/// write + #PF; v2: slot write + interrupt, then the guest's `_ACK`), in rounds of 64 ready
/// tokens; and a window with nothing to deliver (every vCPU entry may ask).
fn delivery(c: &mut Criterion) {
    let mut g = c.benchmark_group("delivery");
    for version in VERSIONS {
        let mut e = engine(version);
        g.bench_function(BenchmarkId::new(name(version), "one_ready"), |b| {
            b.iter_custom(|iters| {
                rounds(
                    &mut e,
                    iters,
                    LIMIT,
                    |e, k| {
                        for p in 0..k {
                            inject(e, page(p));
                        }
                        for p in 0..k {
                            assert_eq!(e.page_arrived(page(p)), 1);
                        }
                    },
                    |e, _| {
                        let d = e.delivery_window(0, black_box(VcpuState::USER));
                        assert!(matches!(d, Ok(Delivery::Delivered { .. })));
                        assert_eq!(drain(e), 2);
                        ack(e, version);
                    },
                    evict,
                )
            });
        });
    }
    for version in VERSIONS {
        let mut e = engine(version);
        g.bench_function(BenchmarkId::new(name(version), "nothing_pending"), |b| {
            b.iter(|| {
                let d = e.delivery_window(0, black_box(VcpuState::USER));
                assert_eq!(d, Ok(Delivery::Nothing));
            });
        });
    }
    g.finish();
}

/// One whole APF on one engine: fault → `Injected`, drain; page arrives; delivery window →
/// `Delivered`, drain; v2 `_ACK`. Each iteration retires its token; rounds of 64 distinct
/// pages, whose arrivals are forgotten between rounds (untimed).
fn cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("cycle");
    for version in VERSIONS {
        let mut e = engine(version);
        g.bench_function(name(version), |b| {
            b.iter_custom(|iters| {
                rounds(
                    &mut e,
                    iters,
                    LIMIT,
                    |_, _| {},
                    |e, i| {
                        let outcome = e.fault(0, black_box(page(i)), black_box(VcpuState::USER));
                        let Ok(FaultOutcome::Injected(token)) = outcome else {
                            panic!("{outcome:?}");
                        };
                        assert_eq!(drain(e), 2);
                        assert_eq!(e.page_arrived(black_box(page(i))), 1);
                        let d = e.delivery_window(0, black_box(VcpuState::USER));
                        assert_eq!(
                            d,
                            Ok(Delivery::Delivered {
                                token,
                                from_vcpu: 0
                            })
                        );
                        assert_eq!(drain(e), 2);
                        ack(e, version);
                    },
                    evict,
                )
            });
        });
        assert_eq!(e.outstanding(0), 0);
    }
    g.finish();
}

/// `AsyncPfEn::parse` of a valid seed and modern value, and of one with a reserved bit.
fn msr_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("msr_parse");
    let cases = [
        ("en_v1", AREA | 1, PvFeatures::SEED),
        ("en_v2", AREA | 9, PvFeatures::MODERN),
        ("en_v1_reserved_gp", AREA | 5, PvFeatures::SEED),
    ];
    for (id, raw, features) in cases {
        g.bench_function(id, |b| {
            b.iter(|| AsyncPfEn::parse(black_box(raw), black_box(features)));
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = fault_admission, page_arrival, delivery, cycle, msr_parse
}
criterion_main!(benches);
