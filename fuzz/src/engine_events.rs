//! `engine_events`: arbitrary sequences of `apf_host::Engine` inputs (MSR writes and reads of
//! any MSR and value, faults in any vCPU state, page arrivals, delivery windows, resets, save
//! and restore, restores of arbitrary saved states, partial drains of the action queue), in
//! every CPUID mode, on 1..4 vCPUs with an outstanding limit of 1..8.
//!
//! After every input: `Engine::check_invariants()` (the invariants the property tests in
//! `crates/apf-host/tests/` check), and the engine agrees with a shadow model written from the
//! protocol's rules (`docs/protocol.md` §2–4, quoted in apf-host):
//!
//! - every MSR write and every restore gets exactly the answer the rules give (#GP / error
//!   value included), and a refused one changes nothing but the counters;
//! - a fault on a frame of RAM that has arrived answers "already present" and queues nothing;
//!   a second arrival of a frame is a no-op;
//! - otherwise a fault injects "page not present" exactly when the rules allow it (APF
//!   enabled and active, paging on, CPL 3 or SEND_ALWAYS, IF = 1, no shadow, no event pending
//!   and no injection handed out and not drained, reason consumed, v2: no wake-all in the
//!   token slot, under the outstanding limit), and otherwise falls back with the first rule
//!   that forbids it; an injection is "write reason 1 at offset 0, then #PF with CR2 =
//!   token";
//! - tokens are never 0 or 0xffffffff, never equal to one still outstanding (or sitting in a
//!   v2 token slot), and the engine's outstanding set, per-page waiting lists and per-vCPU
//!   counts are the model's;
//! - a "page ready" goes out only when allowed (v1: IF = 1, no shadow, no event or undrained
//!   injection, reason consumed; v2: a vector written, token slot free, no undrained
//!   interrupt), a queued wake-all first, then ready tokens in arrival order, as "write area,
//!   then #PF / interrupt"; and when allowed with something pending, it does go out; a
//!   wake-all going out covers every token of its vCPU outstanding then (no ready of their
//!   own); an enable only queues the wake-all, a disable drops everything;
//! - inputs other than faults and windows queue no action; a disable, reset or restore drops
//!   exactly the vCPU's undrained actions (an enable none); the queue drains in order.

use std::collections::VecDeque;

use apf_abi::cpuid::{FEATURE_ASYNC_PF, FEATURE_ASYNC_PF_INT, FEATURE_ASYNC_PF_VMEXIT};
use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use apf_abi::{MsrError, PvFeatures, Token, Version};
use apf_host::{
    Action, Delivery, Engine, EngineConfig, Error, FallbackReason, FaultOutcome, RamMap,
    SavedState, SavedVcpu, VcpuState,
};
use arbitrary::Unstructured;

use crate::msr_parse::{oracle_ack, oracle_en, oracle_int};
use crate::take;

/// CPUID feature words tried: none, seed, modern, modern + vmexit, bit 14 alone.
pub const FEATURES: [u32; 5] = [
    0,
    FEATURE_ASYNC_PF,
    FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT,
    FEATURE_ASYNC_PF | FEATURE_ASYNC_PF_INT | FEATURE_ASYNC_PF_VMEXIT,
    FEATURE_ASYNC_PF_INT,
];
/// Guest RAM: 1 MiB at 0 and 64 KiB at 4 GiB.
pub const RAM: [(u64, u64); 2] = [(0, 0x10_0000), (0x1_0000_0000, 0x1_0001_0000)];
/// The pages faults usually name (`PageSel::Few`).
pub const PAGES: u64 = 6;
/// Inputs per case at most.
pub const MAX_OPS: usize = 512;

/// The VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    /// Index into [`FEATURES`] (mod 5).
    pub features: u8,
    /// vCPUs = 1 + this % 4.
    pub vcpus: u8,
    /// Outstanding limit = 1 + this % 8.
    pub max_outstanding: u8,
    /// `EngineConfig::v1_ready_on_other_vcpus`.
    pub steal: bool,
}

/// An MSR number: 0 → `_EN`, 1 → `_INT`, 2 → `_ACK`, else the raw number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrSel {
    /// `MSR_KVM_ASYNC_PF_EN`.
    En,
    /// `MSR_KVM_ASYNC_PF_INT`.
    Int,
    /// `MSR_KVM_ASYNC_PF_ACK`.
    Ack,
    /// Any other number.
    Raw(u32),
}

/// An MSR value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    /// Any u64.
    Raw(u64),
    /// A 64-byte slot of the low RAM region (slot mod 16384) with flag bits 5..0.
    Area(u16, u8),
    /// A small number (vectors, ACK values).
    Small(u16),
    /// The vCPU's usual area (0x7000 + 64 × vCPU) with flag bits 5..0.
    OwnArea(u8),
}

/// Where a fault or an arrival is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSel {
    /// Page `n % PAGES` of 0x40000.., at byte offset `n * 7 % 4096`.
    Few(u8),
    /// Any address.
    Raw(u64),
}

/// The vCPU state at a fault or window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSel {
    /// `VcpuState::USER`.
    User,
    /// `VcpuState::KERNEL`.
    Kernel,
    /// `USER` with these area words (reason, token), as small numbers.
    Area(u8, u8),
    /// cpl % 4, flags bit 0 IF, 1 shadow, 2 event pending, 3 paging; area words.
    Any(u8, u8, u32, u32),
}

/// One input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// WRMSR.
    Write(u8, MsrSel, Value),
    /// RDMSR.
    Read(u8, MsrSel),
    /// A fault.
    Fault(u8, PageSel, StateSel),
    /// A page arrived.
    Arrive(PageSel),
    /// A delivery window.
    Window(u8, StateSel),
    /// vCPU reset.
    Reset(u8),
    /// `restore(save())`.
    SaveRestore,
    /// Restore an arbitrary saved state of up to 4 vCPUs (en, int, ack).
    Restore(Vec<(Value, Value, Value)>),
    /// Drain this many actions (0: all).
    Poll(u8),
}

/// Decodes the setup (4 bytes) and then inputs until the data runs out.
pub fn decode(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut u = Unstructured::new(data);
    let setup = Setup {
        features: take(&mut u),
        vcpus: take(&mut u),
        max_outstanding: take(&mut u),
        steal: take(&mut u),
    };
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_OPS {
        let kind: u8 = take(&mut u);
        let op = match kind % 9 {
            0 => Op::Write(take(&mut u), msr_sel(&mut u), value(&mut u)),
            1 => Op::Read(take(&mut u), msr_sel(&mut u)),
            2 => Op::Fault(take(&mut u), page_sel(&mut u), state_sel(&mut u)),
            3 => Op::Arrive(page_sel(&mut u)),
            4 => Op::Window(take(&mut u), state_sel(&mut u)),
            5 => Op::Reset(take(&mut u)),
            6 => Op::SaveRestore,
            7 => {
                let n: u8 = take(&mut u);
                Op::Restore(
                    (0..n % 5)
                        .map(|_| (value(&mut u), value(&mut u), value(&mut u)))
                        .collect(),
                )
            }
            _ => Op::Poll(take(&mut u)),
        };
        ops.push(op);
    }
    (setup, ops)
}

fn msr_sel(u: &mut Unstructured<'_>) -> MsrSel {
    match take::<u8>(u) % 4 {
        0 => MsrSel::En,
        1 => MsrSel::Int,
        2 => MsrSel::Ack,
        _ => MsrSel::Raw(take(u)),
    }
}

fn value(u: &mut Unstructured<'_>) -> Value {
    match take::<u8>(u) % 4 {
        0 => Value::Raw(take(u)),
        1 => Value::Area(take(u), take(u)),
        2 => Value::Small(take(u)),
        _ => Value::OwnArea(take(u)),
    }
}

fn page_sel(u: &mut Unstructured<'_>) -> PageSel {
    let n: u8 = take(u);
    if n < 240 {
        PageSel::Few(n)
    } else {
        PageSel::Raw(take(u))
    }
}

fn state_sel(u: &mut Unstructured<'_>) -> StateSel {
    match take::<u8>(u) % 4 {
        0 => StateSel::User,
        1 => StateSel::Kernel,
        2 => StateSel::Area(take(u), take(u)),
        _ => StateSel::Any(take(u), take(u), take(u), take(u)),
    }
}

/// The bytes [`decode`] turns into `(setup, ops)` (for hand-written seeds).
pub fn encode(setup: Setup, ops: &[Op]) -> Vec<u8> {
    let mut b = vec![
        setup.features,
        setup.vcpus,
        setup.max_outstanding,
        u8::from(setup.steal),
    ];
    let msr = |b: &mut Vec<u8>, m: MsrSel| match m {
        MsrSel::En => b.push(0),
        MsrSel::Int => b.push(1),
        MsrSel::Ack => b.push(2),
        MsrSel::Raw(x) => {
            b.push(3);
            b.extend_from_slice(&x.to_le_bytes());
        }
    };
    let val = |b: &mut Vec<u8>, v: Value| match v {
        Value::Raw(x) => {
            b.push(0);
            b.extend_from_slice(&x.to_le_bytes());
        }
        Value::Area(s, f) => {
            b.push(1);
            b.extend_from_slice(&s.to_le_bytes());
            b.push(f);
        }
        Value::Small(x) => {
            b.push(2);
            b.extend_from_slice(&x.to_le_bytes());
        }
        Value::OwnArea(f) => b.extend_from_slice(&[3, f]),
    };
    let page = |b: &mut Vec<u8>, p: PageSel| match p {
        PageSel::Few(n) => b.push(n.min(239)),
        PageSel::Raw(x) => {
            b.push(255);
            b.extend_from_slice(&x.to_le_bytes());
        }
    };
    let state = |b: &mut Vec<u8>, s: StateSel| match s {
        StateSel::User => b.push(0),
        StateSel::Kernel => b.push(1),
        StateSel::Area(r, t) => b.extend_from_slice(&[2, r, t]),
        StateSel::Any(c, f, r, t) => {
            b.extend_from_slice(&[3, c, f]);
            b.extend_from_slice(&r.to_le_bytes());
            b.extend_from_slice(&t.to_le_bytes());
        }
    };
    for op in ops {
        match op {
            Op::Write(v, m, x) => {
                b.extend_from_slice(&[0, *v]);
                msr(&mut b, *m);
                val(&mut b, *x);
            }
            Op::Read(v, m) => {
                b.extend_from_slice(&[1, *v]);
                msr(&mut b, *m);
            }
            Op::Fault(v, p, s) => {
                b.extend_from_slice(&[2, *v]);
                page(&mut b, *p);
                state(&mut b, *s);
            }
            Op::Arrive(p) => {
                b.push(3);
                page(&mut b, *p);
            }
            Op::Window(v, s) => {
                b.extend_from_slice(&[4, *v]);
                state(&mut b, *s);
            }
            Op::Reset(v) => b.extend_from_slice(&[5, *v]),
            Op::SaveRestore => b.push(6),
            Op::Restore(vs) => {
                b.push(7);
                b.push(u8::try_from(vs.len()).expect("at most 4"));
                for &(e, i, a) in vs {
                    val(&mut b, e);
                    val(&mut b, i);
                    val(&mut b, a);
                }
            }
            Op::Poll(n) => b.extend_from_slice(&[8, *n]),
        }
    }
    b
}

impl Value {
    fn get(self, vcpu: usize) -> u64 {
        match self {
            Value::Raw(x) => x,
            Value::Area(slot, f) => {
                ((u64::from(slot) % (RAM[0].1 / 64)) * 64) | u64::from(f & 0x3f)
            }
            Value::Small(x) => u64::from(x),
            Value::OwnArea(f) => own_area(vcpu) | u64::from(f & 0x3f),
        }
    }
}

/// The area the seeds give vCPU `v`.
pub fn own_area(v: usize) -> u64 {
    0x7000 + 64 * (v as u64 % 64)
}

impl MsrSel {
    fn get(self) -> u32 {
        match self {
            MsrSel::En => MSR_KVM_ASYNC_PF_EN,
            MsrSel::Int => MSR_KVM_ASYNC_PF_INT,
            MsrSel::Ack => MSR_KVM_ASYNC_PF_ACK,
            MsrSel::Raw(x) => x,
        }
    }
}

impl PageSel {
    fn get(self) -> u64 {
        match self {
            PageSel::Few(n) => 0x4_0000 + (u64::from(n) % PAGES) * 4096 + u64::from(n) * 7 % 4096,
            PageSel::Raw(x) => x,
        }
    }
}

impl StateSel {
    fn get(self) -> VcpuState {
        match self {
            StateSel::User => VcpuState::USER,
            StateSel::Kernel => VcpuState::KERNEL,
            StateSel::Area(r, t) => VcpuState {
                area_reason: small_word(r),
                area_token: small_word(t),
                ..VcpuState::USER
            },
            StateSel::Any(cpl, f, r, t) => VcpuState {
                cpl: cpl % 4,
                interrupts_enabled: f & 1 != 0,
                interrupt_shadow: f & 2 != 0,
                event_pending: f & 4 != 0,
                paging: f & 8 != 0,
                area_reason: r,
                area_token: t,
            },
        }
    }
}

/// Mostly 0 (a consumed reason / free slot), sometimes 1, 2 or a token-like value.
fn small_word(x: u8) -> u32 {
    match x {
        0..=127 => 0,
        128..=159 => 1,
        160..=191 => 2,
        _ => u32::from(x) << 12,
    }
}

fn vcpu_index(x: u8, n: usize) -> usize {
    // Mostly an existing vCPU; 250.. name ones the VM does not have.
    if x < 250 {
        usize::from(x) % n
    } else {
        n + usize::from(x - 250)
    }
}

/// The frame of `gpa` if it lies in RAM (the regions are page-aligned).
fn ram_frame(gpa: u64) -> Option<u64> {
    let frame = gpa & !0xfff;
    RAM.iter()
        .any(|&(s, e)| s <= frame && frame < e)
        .then_some(frame)
}

fn in_ram(gpa: u64) -> bool {
    let Some(end) = gpa.checked_add(64) else {
        return false;
    };
    RAM.iter().any(|&(s, e)| s <= gpa && end <= e)
}

/// One vCPU of the shadow model.
#[derive(Clone, Debug, Default)]
struct VcpuModel {
    /// Last valid `_EN` (None: never written / reset).
    en: Option<u64>,
    /// Last valid `_INT` vector.
    int: Option<u8>,
    /// A wake-all is queued.
    wake_all: bool,
    /// v2: a page ready was raised and not ACKed.
    awaiting_ack: bool,
    /// Tokens whose page arrived, in arrival order.
    ready: VecDeque<Token>,
}

/// The shadow model: what the rules say the engine holds.
#[derive(Clone, Debug)]
struct Model {
    features: u32,
    max: usize,
    steal: bool,
    vcpus: Vec<VcpuModel>,
    /// Injected tokens whose page has not arrived: (token, vCPU, page), in fault order.
    waiting: Vec<(Token, usize, u64)>,
    /// Frames of RAM that have arrived.
    arrived: std::collections::BTreeSet<u64>,
}

impl Model {
    fn modern(&self) -> bool {
        self.features & FEATURE_ASYNC_PF_INT != 0
    }

    fn version(&self, v: usize) -> Option<Version> {
        let en = self.vcpus[v].en?;
        match (en & 1 != 0, self.modern(), en & 8 != 0) {
            (false, _, _) | (true, true, false) => None,
            (true, false, _) => Some(Version::V1),
            (true, true, true) => Some(Version::V2),
        }
    }

    fn area(&self, v: usize) -> Option<u64> {
        self.version(v)?;
        self.vcpus[v].en.map(|en| en & !0x3f)
    }

    fn outstanding(&self, v: usize) -> usize {
        self.waiting.iter().filter(|w| w.1 == v).count() + self.vcpus[v].ready.len()
    }

    fn is_outstanding(&self, t: Token) -> bool {
        self.waiting.iter().any(|w| w.0 == t) || self.vcpus.iter().any(|m| m.ready.contains(&t))
    }

    /// Everything outstanding or queued for `v` is dropped (disable, enable, reset, restore).
    fn drop_vcpu(&mut self, v: usize) {
        self.waiting.retain(|w| w.1 != v);
        let m = &mut self.vcpus[v];
        m.ready.clear();
        m.wake_all = false;
        m.awaiting_ack = false;
    }

    /// A valid `_EN` value takes effect: an enable queues a wake-all and keeps everything
    /// else (tokens, a v2 ready awaiting its ACK); a disable or inert value drops everything.
    fn set_en(&mut self, v: usize, raw: u64) {
        self.vcpus[v].en = Some(raw);
        if self.version(v).is_some() {
            self.vcpus[v].wake_all = true;
        } else {
            self.drop_vcpu(v);
        }
    }

    /// A wake-all goes out on `v`: it covers every token of `v` outstanding now.
    fn cover(&mut self, v: usize) {
        self.waiting.retain(|w| w.1 != v);
        self.vcpus[v].ready.clear();
    }

    /// What a WRMSR must answer.
    fn expected_write(&self, v: usize, msr: u32, value: u64) -> Result<(), Error> {
        if v >= self.vcpus.len() {
            return Err(Error::NoSuchVcpu {
                vcpu: v,
                vcpus: self.vcpus.len(),
            });
        }
        match msr {
            MSR_KVM_ASYNC_PF_EN => self.expected_en(value),
            MSR_KVM_ASYNC_PF_INT => oracle_int(value, self.features).map(|_| ()),
            MSR_KVM_ASYNC_PF_ACK => oracle_ack(value, self.features).map(|_| ()),
            msr => return Err(Error::NotApfMsr { msr }),
        }
        .map_err(Error::Gp)
    }

    fn expected_en(&self, value: u64) -> Result<(), MsrError> {
        oracle_en(value, self.features)?;
        // "bits 63..6: guest-physical address of a 64-byte aligned, 64-byte area, in guest
        // RAM"; checked when the value turns APF on (seed: ENABLED; modern: ENABLED and
        // DELIVERY_AS_INT), the only area KVM maps.
        let gpa = value & !0x3f;
        let active = value & 1 != 0 && (!self.modern() || value & 8 != 0);
        if active && !in_ram(gpa) {
            return Err(MsrError::AreaNotInRam { gpa });
        }
        Ok(())
    }

    /// What a restore must answer.
    fn expected_restore(&self, saved: &SavedState) -> Result<(), Error> {
        if saved.vcpus.len() != self.vcpus.len() {
            return Err(Error::SavedVcpuCount {
                saved: saved.vcpus.len(),
                vcpus: self.vcpus.len(),
            });
        }
        for (vcpu, s) in saved.vcpus.iter().enumerate() {
            let bad = |error| Error::SavedMsr { vcpu, error };
            if s.async_pf_en != 0 {
                self.expected_en(s.async_pf_en).map_err(bad)?;
            }
            if s.async_pf_int != 0 {
                oracle_int(s.async_pf_int, self.features).map_err(bad)?;
            }
            if s.async_pf_ack != 0 {
                oracle_ack(s.async_pf_ack, self.features).map_err(bad)?;
            }
        }
        Ok(())
    }

    fn restore(&mut self, saved: &SavedState) {
        self.arrived.clear();
        for (v, s) in saved.vcpus.iter().enumerate() {
            self.drop_vcpu(v);
            self.vcpus[v].en = None;
            self.vcpus[v].int = match s.async_pf_int {
                0 => None,
                x => Some(u8::try_from(x).expect("validated")),
            };
            if s.async_pf_en != 0 {
                self.set_en(v, s.async_pf_en);
            }
        }
    }

    /// The first rule that forbids "page not present" on `v` now, or `None`.
    /// `undrained_wake_all`: the write of a wake-all into `v`'s token slot is not drained.
    fn forbids(
        &self,
        v: usize,
        s: &VcpuState,
        undrained_pf: bool,
        undrained_wake_all: bool,
    ) -> Option<FallbackReason> {
        let Some(en) = self.vcpus[v].en.filter(|en| en & 1 != 0) else {
            return Some(FallbackReason::NotEnabled);
        };
        if self.version(v).is_none() {
            return Some(FallbackReason::Inert);
        }
        if !s.paging {
            return Some(FallbackReason::PagingOff);
        }
        if s.cpl != 3 && en & 2 == 0 {
            return Some(FallbackReason::NotUserMode);
        }
        if !s.interrupts_enabled {
            return Some(FallbackReason::InterruptsDisabled);
        }
        if s.interrupt_shadow {
            return Some(FallbackReason::InterruptShadow);
        }
        if s.event_pending || undrained_pf {
            return Some(FallbackReason::EventPending);
        }
        if s.area_reason != 0 {
            return Some(FallbackReason::ReasonNotConsumed);
        }
        if self.version(v) == Some(Version::V2) && (s.area_token == u32::MAX || undrained_wake_all)
        {
            return Some(FallbackReason::WakeAllInFlight);
        }
        if self.outstanding(v) >= self.max {
            return Some(FallbackReason::OutstandingLimit);
        }
        None
    }

    /// Compares the engine's observable state with the model.
    fn compare(&self, e: &mut Engine) {
        if let Err(why) = e.check_invariants() {
            panic!("invariant broken: {why}\n{e:#?}");
        }
        for (v, m) in self.vcpus.iter().enumerate() {
            assert_eq!(e.version(v), self.version(v), "vCPU {v} version");
            assert_eq!(e.area_gpa(v), self.area(v), "vCPU {v} area");
            assert_eq!(
                e.outstanding(v),
                self.outstanding(v),
                "vCPU {v} outstanding"
            );
            assert!(e.outstanding(v) <= self.max, "vCPU {v} over the limit");
            if self.version(v) == Some(Version::V2) {
                let pending =
                    (m.wake_all || !m.ready.is_empty()) && !m.awaiting_ack && m.int.is_some();
                assert_eq!(e.pending_delivery(v), pending, "vCPU {v} pending_delivery");
            } else if self.version(v).is_none() {
                assert!(!e.pending_delivery(v), "vCPU {v} pending while inactive");
            } else if m.wake_all || !m.ready.is_empty() {
                assert!(e.pending_delivery(v), "vCPU {v} v1 has something pending");
            }
        }
        for m in &self.vcpus {
            for &t in &m.ready {
                assert!(e.is_outstanding(t), "ready {t:?} not outstanding");
            }
        }
        for &(t, v, page) in &self.waiting {
            assert!(e.is_outstanding(t), "waiting {t:?} not outstanding");
            assert_eq!(e.token_owner(t), Some(v), "owner of {t:?}");
            assert!(e.waits_on(v, page), "{v} waits on {page:#x}");
        }
        for p in 0..PAGES {
            let page = 0x4_0000 + p * 4096;
            assert_eq!(
                e.is_arrived(page),
                self.arrived.contains(&page),
                "arrival of {page:#x}"
            );
        }
        for p in 0..PAGES {
            let page = 0x4_0000 + p * 4096;
            let want: Vec<Token> = self
                .waiting
                .iter()
                .filter(|w| w.2 == page)
                .map(|w| w.0)
                .collect();
            assert_eq!(
                e.tokens_on_page(page),
                want.as_slice(),
                "tokens on {page:#x}"
            );
        }
    }
}

/// The engine's undrained actions, without draining them.
fn queued(e: &Engine) -> Vec<Action> {
    let mut c = e.clone();
    std::iter::from_fn(|| c.poll_action()).collect()
}

/// `after` must be `before` followed by `added`.
fn assert_appended(before: &[Action], after: &[Action], added: &[Action]) {
    let mut want = before.to_vec();
    want.extend_from_slice(added);
    assert_eq!(after, want.as_slice(), "action queue");
}

/// The engine without its counters (a refused input may move only those).
fn sans_counters(e: &Engine) -> Engine {
    let mut c = e.clone();
    let _ = c.take_counters();
    c
}

/// Runs the decoded case.
pub fn check(data: &[u8]) {
    let (setup, ops) = decode(data);
    let _ = run(setup, &ops);
}

/// Runs `ops` on a fresh engine, checking after each; returns the engine's counters.
pub fn run(setup: Setup, ops: &[Op]) -> apf_host::Counters {
    let features = FEATURES[usize::from(setup.features) % FEATURES.len()];
    let n = 1 + usize::from(setup.vcpus % 4);
    let max = 1 + usize::from(setup.max_outstanding % 8);
    let mut config = EngineConfig::new(
        PvFeatures(features),
        n,
        RamMap::new(RAM.iter().map(|&(s, e)| s..e)),
    );
    config.max_outstanding_per_vcpu = max;
    config.v1_ready_on_other_vcpus = setup.steal;
    let mut e = Engine::new(config);
    let mut m = Model {
        features,
        max,
        steal: setup.steal,
        vcpus: vec![VcpuModel::default(); n],
        waiting: Vec::new(),
        arrived: std::collections::BTreeSet::new(),
    };
    for op in ops {
        step(&mut e, &mut m, op);
        m.compare(&mut e);
    }
    e.counters().clone()
}

#[allow(clippy::too_many_lines)]
fn step(e: &mut Engine, m: &mut Model, op: &Op) {
    let n = m.vcpus.len();
    let before = queued(e);
    match *op {
        Op::Write(v, msr, value) => {
            let v = vcpu_index(v, n);
            let (msr, value) = (msr.get(), value.get(v));
            let was = sans_counters(e);
            let got = e.msr_write(v, msr, value);
            assert_eq!(
                got,
                m.expected_write(v, msr, value),
                "wrmsr {msr:#x} = {value:#x} on {v}"
            );
            if got.is_err() {
                assert_eq!(sans_counters(e), was, "a refused write changed the engine");
                return;
            }
            match msr {
                MSR_KVM_ASYNC_PF_EN => {
                    m.set_en(v, value);
                    if m.version(v).is_some() {
                        assert_eq!(queued(e), before, "an enable drops nothing");
                    } else {
                        let want: Vec<Action> =
                            before.iter().copied().filter(|a| a.vcpu() != v).collect();
                        assert_eq!(queued(e), want, "a disable drops the undrained actions");
                    }
                    return;
                }
                MSR_KVM_ASYNC_PF_INT => {
                    m.vcpus[v].int = Some(u8::try_from(value).expect("validated"));
                }
                _ => {
                    if value == 1 {
                        m.vcpus[v].awaiting_ack = false;
                    }
                }
            }
            assert_eq!(queued(e), before);
        }
        Op::Read(v, msr) => {
            let v = vcpu_index(v, n);
            let msr = msr.get();
            let got = e.msr_read(v, msr);
            if v >= n {
                assert!(matches!(got, Err(Error::NoSuchVcpu { .. })));
            } else if let Ok(x) = got {
                let want = match msr {
                    MSR_KVM_ASYNC_PF_EN => m.vcpus[v].en.unwrap_or(0),
                    MSR_KVM_ASYNC_PF_INT => m.vcpus[v].int.map_or(0, u64::from),
                    _ => 0,
                };
                assert_eq!(x, want, "rdmsr {msr:#x} on {v}");
            }
            assert_eq!(queued(e), before);
        }
        Op::Fault(v, page, state) => {
            let v = vcpu_index(v, n);
            let (gpa, s) = (page.get(), state.get());
            let got = e.fault(v, gpa, s);
            if v >= n {
                assert!(matches!(got, Err(Error::NoSuchVcpu { .. })));
                assert_eq!(queued(e), before);
                return;
            }
            let undrained_pf = before
                .iter()
                .any(|a| matches!(*a, Action::InjectPf { vcpu, .. } if vcpu == v));
            let slot = m.area(v).map(|a| a.wrapping_add(4));
            let undrained_wake_all = before.iter().any(|a| {
                matches!(*a, Action::WriteArea { vcpu, gpa, value }
                    if vcpu == v && Some(gpa) == slot && value == u32::MAX)
            });
            if ram_frame(gpa).is_some_and(|f| m.arrived.contains(&f)) {
                assert_eq!(
                    got,
                    Ok(FaultOutcome::AlreadyPresent),
                    "fault on arrived {gpa:#x}"
                );
                assert_eq!(queued(e), before);
                return;
            }
            let forbidden = m.forbids(v, &s, undrained_pf, undrained_wake_all);
            match got.expect("existing vCPU") {
                FaultOutcome::AlreadyPresent => panic!("{gpa:#x} has not arrived"),
                FaultOutcome::Sync(reason) => {
                    assert_eq!(Some(reason), forbidden, "fault on {v} in {s:?}");
                    assert_eq!(queued(e), before);
                }
                FaultOutcome::Injected(t) => {
                    assert_eq!(forbidden, None, "injected {t:?} on {v} in {s:?}");
                    assert!(t.get() != 0 && t.is_individual(), "token {t:?}");
                    assert!(!m.is_outstanding(t), "{t:?} allocated while outstanding");
                    let area = m.area(v).expect("active");
                    assert_appended(
                        &before,
                        &queued(e),
                        &[
                            Action::WriteArea {
                                vcpu: v,
                                gpa: area,
                                value: 1,
                            },
                            Action::InjectPf {
                                vcpu: v,
                                cr2: u64::from(t.get()),
                                error_code: 0,
                            },
                        ],
                    );
                    m.waiting.push((t, v, gpa & !0xfff));
                }
            }
        }
        Op::Arrive(page) => {
            let page = page.get() & !0xfff;
            let got = e.page_arrived(page);
            if let Some(frame) = ram_frame(page)
                && !m.arrived.insert(frame)
            {
                assert_eq!(got, 0, "a second arrival of {page:#x} is a no-op");
                assert_eq!(queued(e), before);
                return;
            }
            let mut arrived = 0;
            let waiting = std::mem::take(&mut m.waiting);
            for w in waiting {
                if w.2 == page {
                    m.vcpus[w.1].ready.push_back(w.0);
                    arrived += 1;
                } else {
                    m.waiting.push(w);
                }
            }
            assert_eq!(got, arrived, "tokens made ready by {page:#x}");
            assert_eq!(queued(e), before);
        }
        Op::Window(v, state) => {
            let v = vcpu_index(v, n);
            let s = state.get();
            let got = e.delivery_window(v, s);
            if v >= n {
                assert!(matches!(got, Err(Error::NoSuchVcpu { .. })));
                assert_eq!(queued(e), before);
                return;
            }
            let got = got.expect("existing vCPU");
            window(e, m, v, &s, &before, got);
        }
        Op::Reset(v) => {
            let v = vcpu_index(v, n);
            let got = e.reset(v);
            if v >= n {
                assert!(got.is_err());
                assert_eq!(queued(e), before);
                return;
            }
            got.expect("reset");
            m.drop_vcpu(v);
            m.vcpus[v].en = None;
            m.vcpus[v].int = None;
            let want: Vec<Action> = before.iter().copied().filter(|a| a.vcpu() != v).collect();
            assert_eq!(queued(e), want);
        }
        Op::SaveRestore => {
            let saved = e.save();
            assert_eq!(saved.vcpus.len(), n);
            for (v, s) in saved.vcpus.iter().enumerate() {
                assert_eq!(s.async_pf_en, m.vcpus[v].en.unwrap_or(0));
                assert_eq!(s.async_pf_int, m.vcpus[v].int.map_or(0, u64::from));
                assert_eq!(s.async_pf_ack, 0);
            }
            e.restore(&saved)
                .expect("a saved state restores into its own engine");
            m.restore(&saved);
            assert!(queued(e).is_empty());
            assert_eq!(e.save(), saved);
        }
        Op::Restore(ref vs) => {
            let saved = SavedState {
                vcpus: vs
                    .iter()
                    .enumerate()
                    .map(|(v, &(en, int, ack))| SavedVcpu {
                        async_pf_en: en.get(v),
                        async_pf_int: int.get(v),
                        async_pf_ack: ack.get(v),
                    })
                    .collect(),
            };
            let was = sans_counters(e);
            let got = e.restore(&saved);
            assert_eq!(got, m.expected_restore(&saved), "restore {saved:?}");
            if got.is_err() {
                assert_eq!(
                    sans_counters(e),
                    was,
                    "a refused restore changed the engine"
                );
                return;
            }
            m.restore(&saved);
            assert!(queued(e).is_empty());
        }
        Op::Poll(k) => {
            let k = if k == 0 { usize::MAX } else { usize::from(k) };
            let mut drained = Vec::new();
            while drained.len() < k {
                let Some(a) = e.poll_action() else { break };
                drained.push(a);
            }
            assert_eq!(drained.as_slice(), &before[..drained.len()], "drain order");
            assert_eq!(queued(e).as_slice(), &before[drained.len()..]);
        }
    }
}

/// Checks a delivery window's outcome against the rules and updates the model.
fn window(e: &Engine, m: &mut Model, v: usize, s: &VcpuState, before: &[Action], got: Delivery) {
    let after = queued(e);
    let version = m.version(v);
    let own_pending = m.vcpus[v].wake_all || !m.vcpus[v].ready.is_empty();
    let undrained = |pf: bool| {
        before.iter().any(|a| match *a {
            Action::InjectPf { vcpu, .. } => pf && vcpu == v,
            Action::RaiseInterrupt { vcpu, .. } => !pf && vcpu == v,
            Action::WriteArea { .. } => false,
        })
    };
    let allowed = match version {
        None => false,
        Some(Version::V1) => {
            s.interrupts_enabled
                && !s.interrupt_shadow
                && !s.event_pending
                && !undrained(true)
                && s.area_reason == 0
        }
        Some(Version::V2) => m.vcpus[v].int.is_some() && s.area_token == 0 && !undrained(false),
    };
    let Delivery::Delivered { token, from_vcpu } = got else {
        // Allowed with something of its own pending: it must go out (no lost delivery).
        assert!(
            !(allowed && own_pending),
            "window on {v} in {s:?} gave {got:?} with {:?}",
            m.vcpus[v]
        );
        if version.is_none() {
            assert_eq!(got, Delivery::Nothing);
        }
        assert_eq!(after, before);
        return;
    };
    assert!(allowed, "delivered {token:?} on {v} in {s:?}, not allowed");
    let area = m.area(v).expect("active");
    if from_vcpu == v {
        // Its own: the wake-all first, then ready tokens in arrival order.
        let mv = &mut m.vcpus[v];
        if mv.wake_all {
            assert_eq!(token, Token::WAKE_ALL, "wake-all goes first");
            mv.wake_all = false;
            m.cover(v);
        } else {
            assert_eq!(Some(token), mv.ready.pop_front(), "ready order on {v}");
        }
    } else {
        assert!(
            m.steal && version == Some(Version::V1) && !own_pending,
            "taken from {from_vcpu}"
        );
        assert!(from_vcpu < m.vcpus.len());
        assert_eq!(m.version(from_vcpu), Some(Version::V1));
        assert_eq!(
            Some(token),
            m.vcpus[from_vcpu].ready.pop_front(),
            "ready order on {from_vcpu}"
        );
    }
    let added = if version == Some(Version::V1) {
        [
            Action::WriteArea {
                vcpu: v,
                gpa: area,
                value: 2,
            },
            Action::InjectPf {
                vcpu: v,
                cr2: u64::from(token.get()),
                error_code: 0,
            },
        ]
    } else {
        m.vcpus[v].awaiting_ack = true;
        let vector = m.vcpus[v].int.expect("allowed");
        assert!(vector >= 32);
        [
            Action::WriteArea {
                vcpu: v,
                gpa: area.wrapping_add(4),
                value: token.get(),
            },
            Action::RaiseInterrupt { vcpu: v, vector },
        ]
    };
    assert_appended(before, &after, &added);
}
