//! The APF driver on KVM: the [`Driver`] core behind one mutex, and a thin executor of what
//! it decides — kicks, area reads and writes in guest memory, #PF injection, MSIs.
//!
//! Locking rule: the mutex is never held while guest memory is touched. Guest memory that
//! is served lazily faults into the pager thread, which reports the arrival here and needs
//! the same mutex; so area words are read before the decision and area writes are done
//! after it, both without the lock. The vCPU's own thread is the only one that changes its
//! APF MSRs and the only one that runs it, so its area cannot move or change in between.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use apf_abi::area::{REASON_OFFSET, TOKEN_OFFSET};
use apf_host::{Action, SavedState};

use super::core::{Again, Driver, DriverConfig, Wake};
use super::metrics::ApfReport;
use crate::error::{Result, VmmError};
use crate::exit::MsrRefused;
use crate::kick::{DelayedKicks, Kicker};
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::{self, Vm};

/// How long to wait before looking again at a delivery the guest's area holds (a reason it
/// has not consumed, a v2 token slot it has not freed): one kick, one exit, one new entry.
/// Deliveries its interrupt state holds wait for an interrupt window instead, which comes
/// at the first moment the guest can take them.
pub const RETRY_DELAY: Duration = Duration::from_micros(500);

/// The driver and the world it acts on.
#[derive(Debug)]
pub struct ApfService {
    driver: Mutex<Driver>,
    /// Per vCPU: the driver may have work for its next entry (checked without the lock).
    attention: Vec<AtomicBool>,
    kickers: Vec<Kicker>,
    vm: Arc<Vm>,
    retry: DelayedKicks,
    /// Set when the VM pauses for a snapshot: no page-ready goes out from another thread
    /// any more (it would change the guest's area and LAPIC while their state is saved).
    /// Held for reading across such a delivery, so a pause waits for one in progress.
    frozen: RwLock<bool>,
}

impl ApfService {
    /// A driver per `config` acting on `vm` and its RAM, kicking vCPU `i` through
    /// `kickers[i]`.
    pub fn new(config: DriverConfig, vm: Arc<Vm>, kickers: Vec<Kicker>) -> Result<ApfService> {
        Ok(ApfService {
            attention: (0..kickers.len()).map(|_| AtomicBool::new(false)).collect(),
            driver: Mutex::new(Driver::new(config)),
            kickers,
            vm,
            retry: DelayedKicks::start()?,
            frozen: RwLock::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Driver> {
        self.driver.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self, vcpu: usize) {
        self.attention[vcpu].store(true, Ordering::Release);
        self.kickers[vcpu].kick();
    }

    /// Stops page-readies from going out from other threads than the vCPUs' (a pause for a
    /// snapshot begins); waits for one in progress.
    pub fn freeze(&self) {
        *self.frozen.write().unwrap_or_else(PoisonError::into_inner) = true;
    }

    /// Loads the APF MSRs of a snapshot before the first entry (each enabled vCPU gets the
    /// enable path's wake-all).
    pub fn restore(&self, saved: &SavedState) -> Result<()> {
        let pending = self.lock().restore(saved).map_err(VmmError::ApfState)?;
        for v in pending {
            self.attention[v].store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The APF MSRs of every vCPU, for a snapshot.
    pub fn save(&self) -> SavedState {
        self.lock().engine().save()
    }

    /// The report section.
    pub fn report(&self) -> ApfReport {
        self.lock().report()
    }

    /// vCPU `vcpu`'s thread runs with thread id `tid`.
    pub fn vcpu_thread(&self, vcpu: usize, tid: u32) {
        self.lock().vcpu_thread(vcpu, tid);
    }

    /// Pager thread: thread `tid` faulted on `gpa`. Kicks the vCPU that must take it.
    pub fn fault_reported(&self, tid: u32, gpa: u64, at: Instant, duplicate: bool) {
        let kick = self.lock().fault_reported(tid, gpa, at, duplicate);
        if let Some(v) = kick {
            self.wake(v);
        }
    }

    /// Pager thread: `gpa`'s page is mapped. A v2 vCPU with a page-ready due gets it from
    /// here when its area is in RAM (the vCPU stays in the guest); any other is kicked.
    pub fn page_mapped(&self, gpa: u64, at: Instant) {
        let wakes = self.lock().page_mapped(gpa, at);
        for w in wakes {
            match w {
                Wake::Kick(v) => self.wake(v),
                Wake::Deliver { vcpu, area } => {
                    if let Err(e) = self.deliver_now(vcpu, area) {
                        tracing::error!(%e, vcpu, "page-ready from the pager thread failed; kicking");
                        self.wake(vcpu);
                    }
                }
            }
        }
    }

    /// Hands vCPU `vcpu` its v2 page-ready from this (non-vCPU) thread: reads the token slot
    /// of its area (resident: the driver said so; the lock is not held), lets the driver
    /// decide, writes the token and raises the interrupt. Kicks the vCPU when the driver
    /// leaves it to the vCPU.
    fn deliver_now(&self, vcpu: usize, area: u64) -> Result<()> {
        let frozen = self.frozen.read().unwrap_or_else(PoisonError::into_inner);
        if *frozen {
            // A pause is under way: the page-ready stays queued (a snapshot does not keep
            // it; the restore's wake-all stands in for it).
            return Ok(());
        }
        let slot = self.vm.ram().read_u32(area + TOKEN_OFFSET)?;
        let Some(actions) = self.lock().deliver_now(vcpu, slot, Instant::now()) else {
            self.wake(vcpu);
            return Ok(());
        };
        for action in actions {
            match action {
                Action::WriteArea { gpa, value, .. } => self.vm.ram().write_u32(gpa, value)?,
                Action::RaiseInterrupt { vcpu: v, vector } => {
                    vm::signal_msi(self.vm.fd(), u32::try_from(v).unwrap_or(u32::MAX), vector)?;
                }
                // A v2 page-ready never injects an exception; should the engine ever say
                // otherwise, the vCPU's own thread is where an injection belongs.
                Action::InjectPf { .. } => {
                    tracing::error!(?action, "an exception for another thread to inject");
                    self.wake(vcpu);
                }
            }
        }
        Ok(())
    }

    /// vCPU thread, before `KVM_RUN`: true when the driver may have work for this entry.
    pub fn wants_entry(&self, vcpu: usize) -> bool {
        self.attention[vcpu].load(Ordering::Acquire)
    }

    /// vCPU thread, out of `KVM_RUN`: asks the driver what to inject and does it, and
    /// arranges for the vCPU to come back when work is left: an interrupt window when the
    /// guest's state holds it, a retry a little later when its area does. Returns whether
    /// the vCPU must come back right after the completion of the exit's instruction
    /// (re-enter with `immediate_exit`).
    pub fn entry(&self, vcpu: &mut Vcpu) -> Result<bool> {
        let i = vcpu.index() as usize;
        if !self.attention[i].swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let area = self.lock().area(i);
        let mut state = vcpu.cpu_state()?;
        if let Some(area) = area {
            // Without the lock: the area may lie in memory that is still arriving.
            state.area_reason = self.vm.ram().read_u32(area + REASON_OFFSET)?;
            state.area_token = self.vm.ram().read_u32(area + TOKEN_OFFSET)?;
        }
        let plan = self
            .lock()
            .entry(i, state, !vcpu.completion_pending(), Instant::now());
        for action in plan.actions {
            self.perform(vcpu, action)?;
        }
        vcpu.request_window(plan.again == Again::WhenInjectable);
        if plan.again != Again::No {
            self.attention[i].store(true, Ordering::Release);
        }
        match plan.again {
            Again::AfterCompletion => return Ok(true),
            Again::Later => self.retry.kick_after(&self.kickers[i], RETRY_DELAY),
            Again::No | Again::WhenInjectable => {}
        }
        Ok(false)
    }

    /// Carries out one engine action for the calling vCPU.
    fn perform(&self, vcpu: &mut Vcpu, action: Action) -> Result<()> {
        tracing::debug!(?action, "engine action");
        debug_assert_eq!(
            action.vcpu(),
            vcpu.index() as usize,
            "actions are for the entering vCPU"
        );
        match action {
            Action::WriteArea { gpa, value, .. } => self.vm.ram().write_u32(gpa, value)?,
            Action::InjectPf {
                cr2, error_code, ..
            } => vcpu.inject_pf(cr2, error_code)?,
            Action::RaiseInterrupt { vcpu: v, vector } => {
                vm::signal_msi(self.vm.fd(), u32::try_from(v).unwrap_or(u32::MAX), vector)?;
            }
        }
        Ok(())
    }

    /// vCPU thread: a `wrmsr` of an APF MSR; `Err` → #GP.
    pub fn msr_write(&self, vcpu: &Vcpu, msr: u32, value: u64) -> Result<(), MsrRefused> {
        let i = vcpu.index() as usize;
        let pending = self
            .lock()
            .msr_write(i, msr, value, Instant::now())
            .map_err(|e| MsrRefused(e.to_string()))?;
        if pending {
            self.attention[i].store(true, Ordering::Release);
        }
        Ok(())
    }

    /// vCPU thread: a `rdmsr` of an APF MSR; `Err` → #GP.
    pub fn msr_read(&self, vcpu: &Vcpu, msr: u32) -> Result<u64, MsrRefused> {
        self.lock()
            .msr_read(vcpu.index() as usize, msr)
            .map_err(|e| MsrRefused(e.to_string()))
    }
}
