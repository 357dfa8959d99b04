//! The human-readable summary printed at the end of a run.

use std::fmt::Write as _;

use super::{RunReport, TaskState, exit_status_name};
use crate::lazy::LazyReport;
use crate::working_set::WorkingSetStatus;

fn ms(us: u64) -> f64 {
    std::time::Duration::from_micros(us).as_secs_f64() * 1000.0
}

impl RunReport {
    /// The summary: the exit, the tasks, the vCPUs, the APF path, the restore.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== apfvm: guest exit status {} ({}) after {:.3} ms (apf {:?}, {} vCPU, {} MiB)",
            self.exit_status,
            exit_status_name(self.exit_status),
            ms(self.elapsed_us),
            self.protocol,
            self.vcpus,
            self.mem_size >> 20
        );
        if !self.guest_counters_valid {
            let _ = writeln!(s, "   (the guest did not publish its counters page)");
        }
        self.write_tasks(&mut s);
        self.write_cpus(&mut s);
        self.write_apf(&mut s);
        for v in &self.vmm {
            let _ = writeln!(
                s,
                "   vmm: vCPU {}: {} exits ({} io, {} msr, {} eintr), {} kicks",
                v.index, v.exits, v.io_exits, v.msr_exits, v.interrupted, v.kicks
            );
        }
        if let Some(snap) = &self.snapshot {
            let _ = writeln!(
                s,
                "   snapshot: {} ({} MiB of memory, trigger: {}, written in {:.1} ms)",
                snap.dir,
                snap.memory_bytes >> 20,
                snap.trigger,
                ms(snap.write_us)
            );
        }
        if let Some(r) = &self.restore {
            let _ = writeln!(
                s,
                "   restore: {:?} from {} (APF path {}, memory from {}), set-up {:.1} ms, {} loaded before the first instruction; counters count from the restore",
                r.mode,
                r.dir,
                r.apf_path,
                r.source,
                ms(r.setup_us),
                if r.eager_bytes % (1 << 20) == 0 {
                    format!("{} MiB", r.eager_bytes >> 20)
                } else {
                    format!("{} KiB", r.eager_bytes >> 10)
                }
            );
        }
        if let Some(w) = &self.working_set
            && w.status == WorkingSetStatus::None
        {
            let _ = writeln!(
                s,
                "   working set: none in the snapshot (record one with --record-working-set)"
            );
        } else if let Some(w) = &self.working_set {
            let _ = writeln!(
                s,
                "   working set: {:?}, {} pages ({} before the first instruction), hits {}, misses {} ({} outside it, {} not arrived yet), resident at {}{}",
                w.status,
                w.pages,
                w.must_have_pages,
                w.hits,
                w.misses,
                w.misses_outside,
                w.misses_early,
                w.resident_us
                    .map_or("-".into(), |us| format!("{:.1} ms", ms(us))),
                w.note.as_ref().map_or(String::new(), |n| format!("; {n}")),
            );
        }
        if let Some(l) = &self.lazy {
            write_lazy(&mut s, l);
        }
        s
    }

    fn write_tasks(&self, s: &mut String) {
        if self.tasks.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "   {:>4} {:<12} {:>3} {:<7} {:>4} {:>12} {:>18} {:>4} {:>6} {:>9} {:>10}",
            "task",
            "kind",
            "cpu",
            "state",
            "exit",
            "work",
            "checksum",
            "ok?",
            "sleeps",
            "ran-w/tok",
            "run-us"
        );
        for t in &self.tasks {
            let kind = t
                .kind
                .map_or_else(|| "?".to_string(), |k| format!("{k:?}").to_lowercase());
            let state = match t.state {
                TaskState::New => "new".to_string(),
                TaskState::Running => "running".to_string(),
                TaskState::Done => "done".to_string(),
                TaskState::Unknown(v) => format!("state{v}"),
            };
            let _ = writeln!(
                s,
                "   {:>4} {:<12} {:>3} {:<7} {:>4} {:>12} {:>#18x} {:>4} {:>6} {:>9} {:>10}",
                t.index,
                kind,
                t.cpu,
                state,
                t.exit_code,
                t.work,
                t.checksum,
                match t.checksum_ok {
                    Some(true) => "ok",
                    Some(false) => "BAD",
                    None => "-",
                },
                t.apf_sleeps,
                t.ran_while_token_outstanding,
                t.run_us
            );
        }
    }

    fn write_cpus(&self, s: &mut String) {
        if self.cpus.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "   {:>4} {:>3} {:>4} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8}",
            "vcpu",
            "apf",
            "vec",
            "not-pres",
            "ready",
            "wake-all",
            "early",
            "halts",
            "ticks",
            "switches"
        );
        for r in &self.cpus {
            let c = &r.counters;
            let _ = writeln!(
                s,
                "   {:>4} {:>3} {:>#4x} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8}",
                r.index,
                c.apf_version,
                c.apf_vector,
                c.not_present,
                c.page_ready,
                c.wake_all,
                c.early_ready,
                c.idle_halts,
                c.timer_ticks,
                c.switches
            );
        }
    }

    fn write_apf(&self, s: &mut String) {
        let e = &self.apf.engine;
        let d = &self.apf.driver;
        let _ = writeln!(
            s,
            "   engine: msr exits {} (en {}, int {}, ack {}, #GP {}), faults {}, injected {}, page-ready {}, wake-all {}/{} delivered, tokens covered by wake-all {}",
            d.msr_exits,
            e.en_writes,
            e.int_writes,
            e.acks,
            e.gp.total(),
            e.faults,
            e.injected,
            e.page_ready_delivered,
            e.wake_all_delivered,
            e.wake_all_queued,
            e.dropped.wake_all,
        );
        let fallbacks: Vec<String> = e
            .fallback
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if !fallbacks.is_empty() {
            let _ = writeln!(
                s,
                "   engine: synchronous fallbacks by reason: {}",
                fallbacks.join(", ")
            );
        }
        for (i, a) in self.apf.active.iter().enumerate() {
            if let Some(a) = a {
                let _ = writeln!(
                    s,
                    "   engine: vCPU {i}: APF v{} active, area {:#x}",
                    a.version, a.area_gpa
                );
            }
        }
        if d.vcpu_faults + d.other_thread_faults > 0 {
            let _ = writeln!(
                s,
                "   apf: vCPU faults {} (dup {}, other threads {}), kicks {}, to engine {}, stale {}, deferred {}, same-page sync {}, sync waits {}, apf-off stalls {}; pages mapped {}, ready kicks {}, entries {}",
                d.vcpu_faults,
                d.duplicate_faults,
                d.other_thread_faults,
                d.fault_kicks,
                d.faults_to_engine,
                d.stale_faults,
                d.deferred_faults,
                d.same_page_sync,
                d.sync_waits,
                d.apf_off_faults,
                d.pages_mapped,
                d.ready_kicks,
                d.entries
            );
            let _ = writeln!(
                s,
                "   apf: page-readies from the pager thread {}, at interrupt windows {}; waits for a window {}, for the retry timer {}",
                d.direct_readies, d.window_deliveries, d.window_waits, d.retry_waits
            );
            let policy = &self.apf.policy;
            let us = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
            for (i, c) in policy.vcpus.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "   apf policy {}: vCPU {i}: fetch {} µs; APF cycle {} µs = inject {} + handler {} + ready {}",
                    match policy.mode {
                        crate::apf::ApfPolicy::Always => "always",
                        crate::apf::ApfPolicy::Adaptive => "adaptive",
                    },
                    us(policy.fetch_us),
                    us(c.cycle_us),
                    us(c.inject_us),
                    us(c.handler_us),
                    us(c.ready_us)
                );
            }
            let l = &self.apf.latency;
            let _ = writeln!(
                s,
                "   apf: uffd message → APF injected: {}",
                l.fault_to_apf.summary()
            );
            let _ = writeln!(
                s,
                "   apf: first fault → page mapped:   {}",
                l.fetch.summary()
            );
            let _ = writeln!(
                s,
                "   apf: page mapped → ready handed out: {}",
                l.ready_delivery.summary()
            );
        }
    }
}

fn write_lazy(s: &mut String, l: &LazyReport) {
    let p = &l.pager;
    let _ = writeln!(
        s,
        "   lazy: {} KiB on demand from {} (fetch latency {}, prefetch {}), {} pages resident at the end",
        l.lazy_bytes >> 10,
        l.source,
        l.fetch_latency,
        l.prefetch,
        l.resident_pages
    );
    let _ = writeln!(
        s,
        "   pager: {} messages, {} fetches, {} pages copied ({} EEXIST), {} retries, {} errors; source fetch {}; {}",
        p.fault_messages,
        p.fetches,
        p.pages_copied,
        p.eexist,
        p.fetch_retries,
        p.fetch_errors,
        p.fetch_time,
        match p.fully_resident_ns {
            Some(ns) => format!(
                "resident at {:.1} ms",
                std::time::Duration::from_nanos(ns).as_secs_f64() * 1000.0
            ),
            None => "not fully resident at the end".into(),
        }
    );
}
