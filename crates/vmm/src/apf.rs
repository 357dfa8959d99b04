//! Glue between the vCPU threads and the apf-host engine: MSR exits in, engine actions
//! carried out (area writes into guest memory, #PF injection, MSIs), delivery windows opened
//! and retried with kicks.
//!
//! One engine per VM behind a mutex, taken only at exits that concern APF (never on every
//! `KVM_RUN`). An action for the calling vCPU is performed at once; a #PF for another vCPU is
//! left in that vCPU's mailbox and the vCPU is kicked: vCPU ioctls belong to its own thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use apf_abi::area::{REASON_OFFSET, TOKEN_OFFSET};
use apf_abi::{AsyncPfEn, PvFeatures};
use apf_host::{Action, Delivery, Engine, EngineConfig, RamMap, VcpuState};
use kvm_ioctls::VmFd;

use crate::error::Result;
use crate::exit::MsrRefused;
use crate::kick::{DelayedKicks, Kicker};
use crate::kvm::vcpu::{CpuState, Vcpu};
use crate::kvm::vm;
use crate::memory::GuestRam;

mod fault;
pub use fault::{FaultPath, LatencyUs, PendingFault, Samples};

/// How long to wait before retrying a delivery the vCPU could not take (IF = 0, reason not
/// consumed...): one kick, one exit, one new window.
pub const RETRY_DELAY: Duration = Duration::from_micros(500);

/// Most `_EN` writes remembered for the report.
const MAX_ENABLE_RECORDS: usize = 256;

/// A valid write to `MSR_KVM_ASYNC_PF_EN`, as the engine accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EnableRecord {
    /// The vCPU.
    pub vcpu: usize,
    /// The value written.
    pub raw: u64,
    /// Area address (bits 63..6).
    pub area_gpa: u64,
    /// Protocol turned on: 0 none (disable or inert), 1 v1, 2 v2.
    pub version: u8,
}

/// Per-vCPU #PF injections waiting for their vCPU's thread.
type Mailbox = Mutex<Vec<(u64, u32)>>;

/// The engine and what is needed to carry out its actions.
#[derive(Debug)]
pub struct Apf {
    engine: Mutex<Engine>,
    ram: Arc<GuestRam>,
    vm: Arc<VmFd>,
    kickers: Vec<Kicker>,
    delayed: DelayedKicks,
    mail: Vec<Mailbox>,
    has_mail: Vec<AtomicBool>,
    /// Hint, per vCPU: the engine may have a delivery for it (checked without the lock).
    maybe_pending: Vec<AtomicBool>,
    /// Per vCPU: after a held window, no new window before this time (µs since `epoch`),
    /// so a vCPU that exits often (console output) does not re-open one at every exit.
    retry_at_us: Vec<AtomicU64>,
    epoch: Instant,
    enables: Mutex<Vec<EnableRecord>>,
    msr_exits: AtomicU64,
    windows: AtomicU64,
    fault: FaultPath,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Apf {
    /// An engine offering `features` to `kickers.len()` vCPUs over `ram`, with at most
    /// `max_outstanding` APFs per vCPU (`None`: the engine's default, Linux's 64).
    pub fn new(
        features: PvFeatures,
        ram: Arc<GuestRam>,
        vm: Arc<VmFd>,
        kickers: Vec<Kicker>,
        max_outstanding: Option<usize>,
    ) -> Result<Apf> {
        let n = kickers.len();
        let ram_size = ram.size();
        let mut config =
            EngineConfig::new(features, n, RamMap::new(std::iter::once(0..ram.size())));
        if let Some(limit) = max_outstanding {
            config.max_outstanding_per_vcpu = limit.max(1);
        }
        Ok(Apf {
            engine: Mutex::new(Engine::new(config)),
            ram,
            vm,
            kickers,
            delayed: DelayedKicks::start()?,
            mail: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            has_mail: (0..n).map(|_| AtomicBool::new(false)).collect(),
            maybe_pending: (0..n).map(|_| AtomicBool::new(false)).collect(),
            retry_at_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            enables: Mutex::new(Vec::new()),
            msr_exits: AtomicU64::new(0),
            windows: AtomicU64::new(0),
            fault: FaultPath::new(n, ram_size),
        })
    }

    /// A `wrmsr` exit of an APF MSR on vCPU `vcpu`; `Err` → #GP.
    pub fn msr_write(&self, vcpu: &Vcpu, msr: u32, value: u64) -> Result<(), MsrRefused> {
        self.msr_exits.fetch_add(1, Ordering::Relaxed);
        let i = vcpu.index() as usize;
        let mut engine = lock(&self.engine);
        let features = engine.config().features;
        engine
            .msr_write(i, msr, value)
            .map_err(|e| MsrRefused(e.to_string()))?;
        if msr == apf_abi::msr::MSR_KVM_ASYNC_PF_EN
            && let Ok(en) = AsyncPfEn::parse(value, features)
        {
            tracing::info!(
                value = format_args!("{value:#x}"),
                area = format_args!("{:#x}", en.area_gpa()),
                version = ?en.version(),
                "MSR_KVM_ASYNC_PF_EN"
            );
            let mut rec = lock(&self.enables);
            if rec.len() < MAX_ENABLE_RECORDS {
                rec.push(EnableRecord {
                    vcpu: i,
                    raw: value,
                    area_gpa: en.area_gpa(),
                    version: match en.version() {
                        None => 0,
                        Some(apf_abi::Version::V1) => 1,
                        Some(apf_abi::Version::V2) => 2,
                    },
                });
            }
        }
        let inject = self.drain(&mut engine, vcpu);
        self.flag_pending(&engine);
        if let Some((cr2, error_code)) = inject
            && let Err(e) = vcpu.inject_pf(cr2, error_code)
        {
            tracing::error!(%e, "#PF injection failed");
        }
        Ok(())
    }

    /// Raises the per-vCPU hints for every vCPU the engine has something for.
    fn flag_pending(&self, engine: &Engine) {
        for v in engine.pending_deliveries() {
            self.maybe_pending[v].store(true, Ordering::Release);
        }
    }

    /// A `rdmsr` exit of an APF MSR; `Err` → #GP.
    pub fn msr_read(&self, vcpu: &Vcpu, msr: u32) -> Result<u64, MsrRefused> {
        self.msr_exits.fetch_add(1, Ordering::Relaxed);
        lock(&self.engine)
            .msr_read(vcpu.index() as usize, msr)
            .map_err(|e| MsrRefused(e.to_string()))
    }

    /// True when vCPU `i` has work here: mail to inject or a delivery the engine holds.
    pub fn wants_window(&self, i: usize) -> bool {
        if self.has_mail[i].load(Ordering::Acquire) || self.has_fault(i) {
            return true;
        }
        if !self.maybe_pending[i].load(Ordering::Acquire) {
            return false;
        }
        let (now, retry_at) = (self.now_us(), self.retry_at_us[i].load(Ordering::Relaxed));
        if now < retry_at {
            // Too early for a new window. Make sure a kick comes at `retry_at`: the kick
            // that brought us here may have been one scheduled before the window that set
            // `retry_at` (one delayed kick per vCPU covers later ones), and a vCPU that
            // never exits (CPL 3 code, `hlt` in the guest) would then never retry.
            self.delayed
                .kick_after(&self.kickers[i], Duration::from_micros(retry_at - now));
            return false;
        }
        let engine = lock(&self.engine);
        let pending = engine.pending_delivery(i);
        if !pending {
            self.maybe_pending[i].store(false, Ordering::Release);
        }
        pending
    }

    /// Opens a delivery window on `vcpu`. Call only when no instruction completion is
    /// pending (after an `EINTR` exit), so an injected #PF cannot merge with a #GP that a
    /// pending `wrmsr` completion would raise.
    pub fn window(&self, vcpu: &mut Vcpu) -> Result<()> {
        let i = vcpu.index() as usize;
        self.windows.fetch_add(1, Ordering::Relaxed);
        if self.has_mail[i].swap(false, Ordering::AcqRel) {
            let mail: Vec<_> = std::mem::take(&mut *lock(&self.mail[i]));
            if let Some(&(cr2, error_code)) = mail.first() {
                vcpu.inject_pf(cr2, error_code)?;
                // One exception per entry; the rest wait for the next window.
                if mail.len() > 1 {
                    lock(&self.mail[i]).extend_from_slice(&mail[1..]);
                    self.has_mail[i].store(true, Ordering::Release);
                }
                self.delayed.kick_after(&self.kickers[i], RETRY_DELAY);
                return Ok(());
            }
        }
        if self.take_fault(vcpu)? {
            // One exception per entry: deliveries wait for the next window.
            if lock(&self.engine).pending_delivery(i) {
                self.delayed.kick_after(&self.kickers[i], RETRY_DELAY);
            }
            return Ok(());
        }
        let cpu = vcpu.cpu_state()?;
        let mut engine = lock(&self.engine);
        let state = self.engine_state(&engine, i, cpu);
        let outcome = engine
            .delivery_window(i, state)
            .unwrap_or(Delivery::Nothing);
        tracing::debug!(?outcome, ?state, "delivery window");
        self.note_delivery(outcome);
        let inject = self.drain(&mut engine, vcpu);
        self.flag_pending(&engine);
        if let Some((cr2, error_code)) = inject {
            vcpu.inject_pf_now(cr2, error_code)?;
        }
        if engine.pending_delivery(i) {
            // Held, or more to deliver once the guest has consumed this one: come back later.
            let delay = u64::try_from(RETRY_DELAY.as_micros()).unwrap_or(u64::MAX);
            self.retry_at_us[i].store(self.now_us().saturating_add(delay), Ordering::Relaxed);
            self.delayed.kick_after(&self.kickers[i], RETRY_DELAY);
        }
        Ok(())
    }

    /// What the engine needs to know of vCPU `i` (`cpu`, read from KVM) and of its area (read
    /// from guest memory just now: the engine cannot read memory itself).
    pub(crate) fn engine_state(&self, engine: &Engine, i: usize, cpu: CpuState) -> VcpuState {
        let (area_reason, area_token) = match engine.area_gpa(i) {
            Some(area) => (
                self.ram.read_u32(area + REASON_OFFSET).unwrap_or(0),
                self.ram.read_u32(area + TOKEN_OFFSET).unwrap_or(0),
            ),
            None => (0, 0),
        };
        VcpuState {
            cpl: cpu.cpl,
            interrupts_enabled: cpu.interrupts_enabled,
            interrupt_shadow: cpu.interrupt_shadow,
            event_pending: cpu.event_pending,
            paging: cpu.paging,
            area_reason,
            area_token,
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Carries out every drained action, in order, but the first #PF for `current`: that one
    /// is returned for the caller to inject (through `kvm_run` when it can).
    fn drain(&self, engine: &mut Engine, current: &Vcpu) -> Option<(u64, u32)> {
        let mut inject = None;
        while let Some(action) = engine.poll_action() {
            tracing::debug!(?action, "engine action");
            match action {
                Action::WriteArea { gpa, value, .. } => {
                    if let Err(e) = self.ram.write_u32(gpa, value) {
                        tracing::error!(%e, "APF area write outside RAM (engine checked it at enable)");
                    }
                }
                Action::InjectPf {
                    vcpu,
                    cr2,
                    error_code,
                } => {
                    if vcpu == current.index() as usize && inject.is_none() {
                        inject = Some((cr2, error_code));
                    } else {
                        lock(&self.mail[vcpu]).push((cr2, error_code));
                        self.has_mail[vcpu].store(true, Ordering::Release);
                        self.kickers[vcpu].kick();
                    }
                }
                Action::RaiseInterrupt { vcpu, vector } => {
                    let apic_id = u32::try_from(vcpu).unwrap_or(u32::MAX);
                    if let Err(e) = vm::signal_msi(&self.vm, apic_id, vector) {
                        tracing::error!(%e, "page-ready interrupt failed");
                    }
                }
            }
        }
        inject
    }

    /// The APF MSRs of every vCPU, for a snapshot.
    pub fn save(&self) -> apf_host::SavedState {
        lock(&self.engine).save()
    }

    /// Loads saved APF MSRs (restore): the engine re-runs the enable path, queueing a
    /// wake-all per enabled vCPU, which each vCPU takes at its first delivery window.
    pub fn restore(&self, saved: &apf_host::SavedState) -> Result<()> {
        let mut engine = lock(&self.engine);
        engine.restore(saved).map_err(|e| {
            crate::error::VmmError::Config(format!("the snapshot's APF state is refused: {e}"))
        })?;
        self.flag_pending(&engine);
        Ok(())
    }

    /// Tokens outstanding now, over every vCPU.
    pub fn outstanding_total(&self) -> u64 {
        let engine = lock(&self.engine);
        (0..engine.vcpu_count())
            .map(|i| engine.outstanding(i) as u64)
            .sum()
    }

    /// The engine's counters.
    pub fn counters(&self) -> apf_host::Counters {
        lock(&self.engine).counters().clone()
    }

    /// APF state per vCPU at this moment: `(version, area)` while active.
    pub fn active(&self) -> Vec<Option<(u8, u64)>> {
        let engine = lock(&self.engine);
        (0..engine.vcpu_count())
            .map(|i| {
                let v = match engine.version(i)? {
                    apf_abi::Version::V1 => 1,
                    apf_abi::Version::V2 => 2,
                };
                Some((v, engine.area_gpa(i)?))
            })
            .collect()
    }

    /// Valid `_EN` writes seen (at most the first 256).
    pub fn enables(&self) -> Vec<EnableRecord> {
        lock(&self.enables).clone()
    }

    /// APF MSR exits (reads and writes, valid or not).
    pub fn msr_exits(&self) -> u64 {
        self.msr_exits.load(Ordering::Relaxed)
    }

    /// Delivery windows opened.
    pub fn windows(&self) -> u64 {
        self.windows.load(Ordering::Relaxed)
    }
}
