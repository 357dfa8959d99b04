//! A simulated guest coupled with the engine, for the property tests and the model checker.
//!
//! The guest: tasks pinned to vCPUs touch pages; a fault the engine answers with "not
//! present" puts the task to sleep on the token in the apf-guest `SleeperTable` (shared by
//! all vCPUs, as a kernel's is); a "page ready" wakes it. The guest behaves like a real one:
//! its #PF handler reads the reason and writes 0 back first, its page-ready interrupt handler
//! reads the slot, writes 0 and then ACKs (as a separate step, to widen the interleavings);
//! an injected #PF is taken before a pending interrupt. The checker, at every step, verifies
//! what the engine asked for against the protocol's rules and the guest's actual state.
//!
//! Wake-all coverage ("all outstanding APFs should be woken (no individual type 2 APFs will
//! be sent)", §2) is checked from both sides: when a wake-all goes out on vCPU v, every
//! token of v the checker holds (its "not present" was injected before) is covered, and an
//! individual "page ready" for a covered token fails the run; and when the guest runs a
//! wake-all on v, a task of v it wakes from a token the host still holds is noted, and an
//! individual "page ready" for that token fails the run too, unless a later wake-all of v
//! covered it first (a snapshot may carry a raised wake-all the restored engine never saw).
#![allow(
    dead_code,
    clippy::missing_panics_doc,
    clippy::struct_excessive_bools,
    clippy::unnecessary_wraps
)]

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use apf_abi::msr::{MSR_KVM_ASYNC_PF_ACK, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT};
use apf_abi::{PvFeatures, Token, Version};
use apf_guest::reason::{self, PfKind, Ready};
use apf_guest::{Entry, SleeperTable, WaitOutcome, WakeOutcome};
use apf_host::{Action, Engine, EngineConfig, FaultOutcome, RamMap, VcpuState};

pub const TABLE: usize = 32;
pub const VECTOR: u8 = 0xf3;
const PAGE_BASE: u64 = 0x10_0000;

pub fn area(v: usize) -> u64 {
    0x7000 + 64 * v as u64
}

pub fn page_gpa(p: usize) -> u64 {
    PAGE_BASE + ((p as u64) << 12)
}

/// The guest state a fault or a window happens in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavor {
    User,
    Kernel,
    Cli,
    Shadow,
    NoPaging,
}

impl Flavor {
    pub const ALL: [Flavor; 5] = [
        Flavor::User,
        Flavor::Kernel,
        Flavor::Cli,
        Flavor::Shadow,
        Flavor::NoPaging,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskState {
    Runnable,
    /// Took "not present"; its #PF handler has not run yet.
    Faulting,
    Sleeping(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Task {
    pub vcpu: usize,
    pub pages: Vec<usize>,
    pub pos: usize,
    pub state: TaskState,
    pub progress: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct GVcpu {
    /// The guest's view: APF enabled by its last `_EN` write.
    pub enabled: bool,
    pub send_always: bool,
    pub area_reason: u32,
    pub area_token: u32,
    /// An injected #PF not taken yet: CR2 and, for "not present", the faulting task.
    pub pending_pf: Option<(u64, Option<u8>)>,
    pub irq_pending: bool,
    pub ack_due: bool,
    /// The state last passed to the engine (for checking what it injected).
    pub last_state: Option<VcpuState>,
    /// The last area write was the reason word (so the next #PF must carry it).
    pub round_robin: usize,
}

#[derive(Clone, Debug)]
pub struct Guest {
    pub vcpus: Vec<GVcpu>,
    pub tasks: Vec<Task>,
    pub table: SleeperTable<u8, TABLE>,
    pub present: Vec<bool>,
    pub requested: Vec<bool>,
}

impl Guest {
    fn table_key(&self) -> Vec<(u32, Option<u8>)> {
        let mut v: Vec<(u32, Option<u8>)> = self
            .table
            .iter()
            .map(|e| match e {
                Entry::Sleeper { token, task } => (token.get(), Some(task)),
                Entry::Dummy(token) => (token.get(), None),
            })
            .collect();
        v.sort_unstable();
        v
    }
}

impl PartialEq for Guest {
    fn eq(&self, o: &Self) -> bool {
        self.vcpus == o.vcpus
            && self.tasks == o.tasks
            && self.present == o.present
            && self.requested == o.requested
            && self.table_key() == o.table_key()
    }
}
impl Eq for Guest {}
impl Hash for Guest {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.vcpus.hash(h);
        self.tasks.hash(h);
        self.present.hash(h);
        self.requested.hash(h);
        self.table_key().hash(h);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// The next runnable task of the vCPU touches its next page.
    Touch(usize, Flavor),
    /// The pager delivers a page whose fetch is in flight.
    Arrive(usize),
    /// The host evicts a present page (so tasks fault again).
    Evict(usize),
    /// The vCPU enters the guest: a pending #PF is taken.
    Enter(usize),
    /// The VMM offers a delivery window.
    Window(usize, Flavor),
    /// The v2 page-ready interrupt handler runs (slot read and freed).
    Irq(usize),
    /// The handler's ACK write.
    Ack(usize),
    Disable(usize),
    /// `_EN` with ENABLED; `true`: with SEND_ALWAYS (v2 only).
    Enable(usize, bool),
    Reset(usize),
    /// Snapshot and restore of the whole VM.
    Restore,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct World {
    pub engine: Engine,
    pub guest: Guest,
    pub version: Version,
    /// The checker's own table of outstanding tokens → owning vCPU.
    pub outstanding: BTreeMap<u32, usize>,
    /// Tokens covered by a wake-all delivered after their "not present" (history for the
    /// error message only: a covered token has also left `outstanding`).
    pub covered: BTreeSet<u32>,
    /// Outstanding tokens whose task a wake-all run by the guest on the token's vCPU has
    /// woken: the guest's side of "covered". Always a subset of `outstanding`.
    pub woken_by_wake_all: BTreeSet<u32>,
    /// The vCPU's APF was disabled or reset since this task slept: the host's wake-all on
    /// re-enable must cover it (used only for reporting).
    pub stats: Stats,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    pub injected: u64,
    pub readies: u64,
    pub wake_alls: u64,
    /// Tokens covered by a delivered wake-all.
    pub covered: u64,
    pub events: u64,
}

pub type Check = Result<(), String>;

impl World {
    /// `tasks[i]` = (vCPU, pages it touches cyclically).
    pub fn new(
        version: Version,
        vcpus: usize,
        pages: usize,
        tasks: &[(usize, Vec<usize>)],
    ) -> World {
        World::with_cross_vcpu(version, vcpus, pages, tasks, false)
    }

    /// As [`World::new`], choosing `EngineConfig::v1_ready_on_other_vcpus`.
    pub fn with_cross_vcpu(
        version: Version,
        vcpus: usize,
        pages: usize,
        tasks: &[(usize, Vec<usize>)],
        cross: bool,
    ) -> World {
        let features = match version {
            Version::V1 => PvFeatures::SEED,
            Version::V2 => PvFeatures::MODERN,
        };
        let ram = RamMap::single(0..PAGE_BASE + ((pages as u64) << 12));
        let mut config = EngineConfig::new(features, vcpus, ram);
        config.max_outstanding_per_vcpu = 4;
        config.v1_ready_on_other_vcpus = cross;
        World {
            engine: Engine::new(config),
            guest: Guest {
                vcpus: vec![GVcpu::default(); vcpus],
                tasks: tasks
                    .iter()
                    .map(|(v, p)| Task {
                        vcpu: *v,
                        pages: p.clone(),
                        pos: 0,
                        state: TaskState::Runnable,
                        progress: 0,
                    })
                    .collect(),
                table: SleeperTable::new(),
                present: vec![false; pages],
                requested: vec![false; pages],
            },
            version,
            outstanding: BTreeMap::new(),
            covered: BTreeSet::new(),
            woken_by_wake_all: BTreeSet::new(),
            stats: Stats::default(),
        }
    }

    fn vcpu_state(&self, v: usize, flavor: Flavor) -> VcpuState {
        let g = &self.guest.vcpus[v];
        let base = VcpuState {
            area_reason: g.area_reason,
            area_token: g.area_token,
            event_pending: g.pending_pf.is_some(),
            ..VcpuState::USER
        };
        match flavor {
            Flavor::User => base,
            Flavor::Kernel => VcpuState { cpl: 0, ..base },
            Flavor::Cli => VcpuState {
                cpl: 0,
                interrupts_enabled: false,
                ..base
            },
            Flavor::Shadow => VcpuState {
                interrupt_shadow: true,
                ..base
            },
            Flavor::NoPaging => VcpuState {
                cpl: 0,
                paging: false,
                ..base
            },
        }
    }

    /// Applies one event. Events that do not apply in this state are no-ops returning
    /// `Ok(false)`; `Ok(true)` means something happened.
    pub fn apply(&mut self, ev: Event) -> Result<bool, String> {
        self.stats.events += 1;
        let did = match ev {
            Event::Touch(v, f) => self.touch(v, f)?,
            Event::Arrive(p) => self.arrive(p)?,
            Event::Evict(p) => {
                if self.guest.present[p] {
                    self.guest.present[p] = false;
                    // The engine forgets the arrival (a restored engine never saw it).
                    let _ = self.engine.page_evicted(page_gpa(p));
                    true
                } else {
                    false
                }
            }
            Event::Enter(v) => self.enter(v)?,
            Event::Window(v, f) => {
                let state = self.vcpu_state(v, f);
                self.guest.vcpus[v].last_state = Some(state);
                self.engine
                    .delivery_window(v, state)
                    .map_err(|e| e.to_string())?;
                self.perform(None)?
            }
            Event::Irq(v) => self.irq(v)?,
            Event::Ack(v) => {
                if self.guest.vcpus[v].ack_due {
                    self.guest.vcpus[v].ack_due = false;
                    self.engine
                        .msr_write(v, MSR_KVM_ASYNC_PF_ACK, 1)
                        .map_err(|e| format!("ACK refused: {e}"))?;
                    true
                } else {
                    false
                }
            }
            Event::Disable(v) => {
                let g = &self.guest.vcpus[v];
                if g.enabled && g.pending_pf.is_none() {
                    self.engine
                        .msr_write(v, MSR_KVM_ASYNC_PF_EN, area(v))
                        .map_err(|e| format!("disable refused: {e}"))?;
                    self.guest.vcpus[v].enabled = false;
                    self.outstanding.retain(|_, o| *o != v);
                    true
                } else {
                    false
                }
            }
            Event::Enable(v, send_always) => self.enable(v, send_always)?,
            Event::Reset(v) => {
                self.engine.reset(v).map_err(|e| e.to_string())?;
                let g = &mut self.guest.vcpus[v];
                if let Some((_, Some(task))) = g.pending_pf.take() {
                    self.guest.tasks[usize::from(task)].state = TaskState::Runnable;
                }
                // The guest's bring-up re-initializes its per-CPU area.
                *g = GVcpu::default();
                self.outstanding.retain(|_, o| *o != v);
                true
            }
            Event::Restore => {
                let saved = self.engine.save();
                let mut fresh = Engine::new(self.engine.config().clone());
                fresh.restore(&saved).map_err(|e| format!("restore: {e}"))?;
                self.engine = fresh;
                self.outstanding.clear();
                true
            }
        };
        // Tokens dropped (disable, reset, restore) are owed nothing any more.
        let out = &self.outstanding;
        self.woken_by_wake_all.retain(|t| out.contains_key(t));
        self.engine.check_invariants()?;
        Ok(did)
    }

    /// The guest writes `_EN` with ENABLED (again, if `g.enabled`: re-enabling while enabled
    /// is allowed and gets a fresh wake-all).
    pub fn enable(&mut self, v: usize, send_always: bool) -> Result<bool, String> {
        let g = &self.guest.vcpus[v];
        if g.pending_pf.is_some() {
            return Ok(false);
        }
        let flags = match self.version {
            Version::V1 => 1,
            Version::V2 => {
                // "The guest writes `_INT` before `_EN`".
                self.engine
                    .msr_write(v, MSR_KVM_ASYNC_PF_INT, u64::from(VECTOR))
                    .map_err(|e| format!("INT refused: {e}"))?;
                if send_always { 0b1011 } else { 0b1001 }
            }
        };
        self.engine
            .msr_write(v, MSR_KVM_ASYNC_PF_EN, area(v) | flags)
            .map_err(|e| format!("enable refused: {e}"))?;
        let g = &mut self.guest.vcpus[v];
        g.enabled = true;
        g.send_always = send_always && self.version == Version::V2;
        // An enable drops nothing: its wake-all covers the vCPU's tokens when delivered.
        Ok(true)
    }

    fn touch(&mut self, v: usize, flavor: Flavor) -> Result<bool, String> {
        if self.guest.vcpus[v].pending_pf.is_some() {
            return Ok(false);
        }
        let n = self.guest.tasks.len();
        let start = self.guest.vcpus[v].round_robin;
        let Some(ti) = (0..n).map(|k| (start + k) % n).find(|&i| {
            self.guest.tasks[i].vcpu == v && self.guest.tasks[i].state == TaskState::Runnable
        }) else {
            return Ok(false);
        };
        self.guest.vcpus[v].round_robin = (ti + 1) % n;
        let task = &self.guest.tasks[ti];
        let page = task.pages[task.pos % task.pages.len()];
        if self.guest.present[page] {
            let task = &mut self.guest.tasks[ti];
            task.pos += 1;
            task.progress += 1;
            return Ok(true);
        }
        let state = self.vcpu_state(v, flavor);
        self.guest.vcpus[v].last_state = Some(state);
        let out = self
            .engine
            .fault(v, page_gpa(page) + 0x10, state)
            .map_err(|e| e.to_string())?;
        match out {
            FaultOutcome::Injected(t) => {
                let g = &self.guest.vcpus[v];
                if !g.enabled {
                    return Err(format!("{t:?} injected on vCPU {v} with APF disabled"));
                }
                if !state.paging || !state.interrupts_allowed() || state.event_pending {
                    return Err(format!("{t:?} injected in {state:?}"));
                }
                if state.cpl != 3 && !g.send_always {
                    return Err(format!(
                        "{t:?} injected at CPL {} without SEND_ALWAYS",
                        state.cpl
                    ));
                }
                if !t.is_individual() {
                    return Err(format!("broadcast token allocated to a fault: {t:?}"));
                }
                if self.outstanding.insert(t.get(), v).is_some() {
                    return Err(format!("{t:?} reused while outstanding"));
                }
                // A token value used again names a new fault.
                self.covered.remove(&t.get());
                self.woken_by_wake_all.remove(&t.get());
                self.stats.injected += 1;
                self.guest.requested[page] = true;
                self.guest.tasks[ti].state = TaskState::Faulting;
                self.perform(Some((ti, t)))?;
                Ok(true)
            }
            FaultOutcome::AlreadyPresent => Err(format!(
                "fault on page {page} answered already present, but the guest does not have it"
            )),
            FaultOutcome::Sync(_) => {
                // The vCPU waits for the page: the fetch completes, then the access.
                self.guest.requested[page] = true;
                self.arrive(page)?;
                let task = &mut self.guest.tasks[ti];
                task.pos += 1;
                task.progress += 1;
                Ok(true)
            }
        }
    }

    fn arrive(&mut self, p: usize) -> Result<bool, String> {
        if !self.guest.requested[p] {
            return Ok(false);
        }
        self.guest.requested[p] = false;
        self.guest.present[p] = true;
        self.engine.page_arrived(page_gpa(p));
        Ok(true)
    }

    /// Performs the engine's actions, checking each against the rules and the guest's state.
    fn perform(&mut self, fault: Option<(usize, Token)>) -> Result<bool, String> {
        let mut did = false;
        let mut last_write: Option<(usize, u64, u32)> = None;
        while let Some(a) = self.engine.poll_action() {
            did = true;
            match a {
                Action::WriteArea { vcpu, gpa, value } => {
                    let g = &mut self.guest.vcpus[vcpu];
                    if !g.enabled {
                        return Err(format!("area write on disabled vCPU {vcpu}"));
                    }
                    if gpa == area(vcpu) {
                        if g.area_reason != 0 {
                            return Err(format!(
                                "reason {} overwritten on vCPU {vcpu}",
                                g.area_reason
                            ));
                        }
                        g.area_reason = value;
                    } else if gpa == area(vcpu) + 4 {
                        if g.area_token != 0 {
                            return Err(format!(
                                "token slot {:#x} overwritten on vCPU {vcpu}",
                                g.area_token
                            ));
                        }
                        g.area_token = value;
                    } else {
                        return Err(format!("write outside the area: {gpa:#x}"));
                    }
                    last_write = Some((vcpu, gpa, value));
                }
                Action::InjectPf {
                    vcpu,
                    cr2,
                    error_code,
                } => {
                    let g = &self.guest.vcpus[vcpu];
                    let state = g.last_state.unwrap_or_default();
                    if g.pending_pf.is_some() {
                        return Err(format!("#PF injected over a pending one on vCPU {vcpu}"));
                    }
                    if !state.interrupts_allowed() || state.event_pending {
                        return Err(format!("#PF injected in {state:?}"));
                    }
                    if last_write != Some((vcpu, area(vcpu), g.area_reason)) || error_code != 0 {
                        return Err(format!("#PF without its reason write on vCPU {vcpu}"));
                    }
                    let task = match (g.area_reason, fault) {
                        (1, Some((ti, t))) if u64::from(t.get()) == cr2 => {
                            Some(u8::try_from(ti).unwrap())
                        }
                        (2, None) => {
                            self.retire_ready(cr2, vcpu)?;
                            None
                        }
                        other => return Err(format!("unexpected #PF {other:?} cr2 {cr2:#x}")),
                    };
                    self.guest.vcpus[vcpu].pending_pf = Some((cr2, task));
                }
                Action::RaiseInterrupt { vcpu, vector } => {
                    if self.version != Version::V2 || vector != VECTOR {
                        return Err(format!("interrupt {vector} raised"));
                    }
                    let g = &self.guest.vcpus[vcpu];
                    if last_write != Some((vcpu, area(vcpu) + 4, g.area_token)) {
                        return Err("interrupt without its slot write".into());
                    }
                    let slot = u64::from(g.area_token);
                    self.retire_ready(slot, vcpu)?;
                    self.guest.vcpus[vcpu].irq_pending = true;
                }
            }
        }
        Ok(did)
    }

    /// A "page ready" for `raw` goes out on `vcpu`: it must be the broadcast or a token
    /// still outstanding (injected, not dropped, not covered, not delivered before). The
    /// broadcast covers every token of `vcpu` outstanding now.
    pub fn retire_ready(&mut self, raw: u64, vcpu: usize) -> Check {
        if raw == 0xffff_ffff {
            self.stats.wake_alls += 1;
            let mine: Vec<u32> = self
                .outstanding
                .iter()
                .filter(|&(_, &o)| o == vcpu)
                .map(|(&t, _)| t)
                .collect();
            for t in mine {
                self.outstanding.remove(&t);
                self.woken_by_wake_all.remove(&t);
                self.covered.insert(t);
                self.stats.covered += 1;
            }
            return Ok(());
        }
        let Ok(t) = u32::try_from(raw) else {
            return Err(format!("ready with a non-token {raw:#x}"));
        };
        if self.woken_by_wake_all.remove(&t) {
            return Err(format!(
                "token {t:#x}: a wake-all on its vCPU woke its task, and it gets an \
                 individual page ready too"
            ));
        }
        match self.outstanding.remove(&t) {
            Some(owner) => {
                if owner != vcpu && self.version == Version::V2 {
                    return Err(format!(
                        "v2 ready {t:#x} of vCPU {owner} delivered on {vcpu}"
                    ));
                }
                self.stats.readies += 1;
                Ok(())
            }
            None if self.covered.contains(&t) => Err(format!(
                "token {t:#x} got both a covering wake-all and an individual page ready"
            )),
            None => Err(format!("ready for {t:#x}, which is not outstanding")),
        }
    }

    fn enter(&mut self, v: usize) -> Result<bool, String> {
        let Some((cr2, task)) = self.guest.vcpus[v].pending_pf.take() else {
            return Ok(false);
        };
        // "the guest's #PF handler must read the reason first and reset it to 0".
        let g = &mut self.guest.vcpus[v];
        let reason_word = core::mem::take(&mut g.area_reason);
        match reason::classify(self.version, reason_word, cr2) {
            PfKind::NotPresent(t) => {
                let Some(ti) = task else {
                    return Err("not present without a task".into());
                };
                let ti = usize::from(ti);
                let state = match self.guest.table.wait(t, u8::try_from(ti).unwrap()) {
                    WaitOutcome::Sleep => TaskState::Sleeping(t.get()),
                    WaitOutcome::Retry | WaitOutcome::DuplicateToken => TaskState::Runnable,
                    other => return Err(format!("wait({t:?}) = {other:?}")),
                };
                self.guest.tasks[ti].state = state;
            }
            PfKind::Ready(r) => self.ready(v, r)?,
            other => return Err(format!("guest #PF classified {other:?}")),
        }
        Ok(true)
    }

    /// The guest on vCPU `v` handles a page ready (or the broadcast).
    pub fn ready(&mut self, v: usize, r: Ready) -> Check {
        match r {
            Ready::Page(t) => match self.guest.table.wake(t) {
                WakeOutcome::Woken(task) => {
                    self.guest.tasks[usize::from(task)].state = TaskState::Runnable;
                    Ok(())
                }
                WakeOutcome::DummyRecorded => Ok(()),
                other => Err(format!("wake({t:?}) = {other:?}")),
            },
            Ready::WakeAll => {
                // The guest's wake-all wakes the whole table. Its own vCPU's tasks must not
                // get an individual page ready for the token they slept on any more.
                for (t, task) in self.guest.table.iter_sleepers() {
                    let owner = self.guest.tasks[usize::from(task)].vcpu;
                    if owner == v && self.outstanding.contains_key(&t.get()) {
                        self.woken_by_wake_all.insert(t.get());
                    }
                }
                let tasks = &mut self.guest.tasks;
                let _ = self
                    .guest
                    .table
                    .wake_all(|task| tasks[usize::from(task)].state = TaskState::Runnable);
                Ok(())
            }
        }
    }

    fn irq(&mut self, v: usize) -> Result<bool, String> {
        let g = &mut self.guest.vcpus[v];
        // An injected exception is taken before a pending interrupt.
        if !g.irq_pending || g.pending_pf.is_some() {
            return Ok(false);
        }
        g.irq_pending = false;
        let slot = core::mem::take(&mut g.area_token);
        g.ack_due = true;
        if let Some(r) = reason::take_ready_token(slot) {
            self.ready(v, r)?;
        }
        Ok(true)
    }

    /// Runs the VM to quiescence: every fetch completes, every vCPU re-enables APF, and
    /// every vCPU is offered windows until nothing moves. Then nobody may sleep.
    pub fn complete(&mut self) -> Check {
        let (nv, np) = (self.guest.vcpus.len(), self.guest.present.len());
        for round in 0.. {
            if round > 10_000 {
                return Err("no quiescence".into());
            }
            let mut did = false;
            for p in 0..np {
                did |= self.apply(Event::Arrive(p))?;
            }
            for v in 0..nv {
                did |= self.apply(Event::Enter(v))?;
                if !self.guest.vcpus[v].enabled {
                    did |= self.enable(v, false)?;
                }
                did |= self.apply(Event::Irq(v))?;
                did |= self.apply(Event::Ack(v))?;
                did |= self.apply(Event::Window(v, Flavor::User))?;
            }
            if !did {
                break;
            }
        }
        if let Some((i, t)) = self
            .guest
            .tasks
            .iter()
            .enumerate()
            .find(|(_, t)| t.state != TaskState::Runnable)
        {
            return Err(format!("lost wakeup: task {i} {t:?} sleeps forever"));
        }
        if self.guest.table.sleepers() != 0 {
            return Err("sleepers left in the table".into());
        }
        if let Some(v) = self.engine.pending_deliveries().next() {
            return Err(format!("vCPU {v} still has a delivery pending"));
        }
        Ok(())
    }
}
