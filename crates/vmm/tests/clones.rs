//! Clones of one snapshot sharing one page cache (`vmm::clones`), with real KVM guests:
//! every clone's scans verified, each chunk fetched once for all of them, a clone's writes
//! (its guest's and the host's into its RAM) its own, a clone that dies or a hostile guest
//! stalling none of the others. Each test prints `SKIPPED: no /dev/kvm` and passes where
//! KVM is absent.
//!
//! The workload is the standard guest's (`testkit::fixture`): 2 vCPUs, 64 MiB,
//! `compute:2,scan:1`, the scan over 2 MiB (32 chunks), snapshot after its fill pass.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_abi::{COUNTERS_GPA, WORKLOAD_GPA};
use testkit::fixture::{Guest, assert_passed, restore_ok, restore_options, standard_snapshot};
use vmm::clones::{CloneOptions, ClonesReport, restore_clones};
use vmm::memory::GuestRam;
use vmm::{ApfMode, ApfPath, NoObserver, RunObserver};

/// A page no scan reads: the host writes each clone's own pattern there.
const MARK_GPA: u64 = WORKLOAD_GPA + (8 << 20);
const PAGE: usize = 4096;

fn options(dir: &std::path::Path, clones: u32, latency: &str) -> CloneOptions {
    CloneOptions {
        restore: restore_options(dir, true, ApfPath::Userspace, latency),
        clones,
    }
}

fn clones_ok(r: &ClonesReport) {
    for c in &r.clones {
        let run = c
            .report
            .as_deref()
            .unwrap_or_else(|| panic!("clone {} failed: {:?}", c.index, c.error));
        assert_passed(run);
    }
}

/// What each clone's observer saw of its own RAM at the end: the mark page and the page
/// after it (never written by anyone), and its counters page (written by its guest).
#[derive(Default, Clone, Debug)]
struct Seen {
    mark: Vec<u8>,
    neighbour: Vec<u8>,
    counters: Vec<u8>,
}

/// Clone `index` writes its pattern at [`MARK_GPA`] before its vCPUs run (the page is
/// fetched into the cache first, then copied for this clone) and reads back at the end.
struct Marker {
    index: u8,
    seen: Arc<Mutex<Vec<(u8, Seen)>>>,
}

impl RunObserver for Marker {
    fn start(&mut self, ram: &GuestRam) -> vmm::Result<()> {
        ram.write(MARK_GPA, &[self.index + 1; PAGE])?;
        Ok(())
    }

    fn finish(&mut self, ram: &GuestRam, _: Duration) {
        let read = |gpa| {
            let mut b = vec![0u8; PAGE];
            ram.read(gpa, &mut b).unwrap();
            b
        };
        let seen = Seen {
            mark: read(MARK_GPA),
            neighbour: read(MARK_GPA + PAGE as u64),
            counters: read(COUNTERS_GPA),
        };
        self.seen.lock().unwrap().push((self.index, seen));
    }
}

#[test]
fn clones_share_one_cache_fetch_each_chunk_once_and_keep_their_writes() {
    if !testkit::require_kvm() {
        return;
    }
    let snap = standard_snapshot(ApfMode::V2);
    let memory = std::fs::read(snap.join("memory.raw")).unwrap();
    let single = restore_ok(&restore_options(snap, true, ApfPath::Userspace, "2ms"));
    let single_lazy = single.lazy.as_ref().unwrap();
    let single_fetched = single.restore.as_ref().unwrap().eager_bytes
        + (single_lazy.pager.pages_copied + single_lazy.pager.eexist) * PAGE as u64;

    let seen = Arc::new(Mutex::new(Vec::new()));
    let observers = |i: usize| -> Box<dyn RunObserver + Send> {
        Box::new(Marker {
            index: u8::try_from(i).unwrap(),
            seen: Arc::clone(&seen),
        })
    };
    let r = restore_clones(&options(snap, 4, "2ms"), &observers).unwrap();
    println!("{}", r.summary());
    clones_ok(&r);
    let t = &r.totals;
    assert_eq!((t.clones, t.exited_ok, t.failed), (4, 4, 0));
    // One chunk more than the single restore: the mark page's (not scanned there).
    assert!(
        t.source_bytes_fetched <= single_fetched + 64 * 1024,
        "clones read {} bytes, one restore {single_fetched}",
        t.source_bytes_fetched
    );
    assert_eq!(t.pager.fetch_errors, 0);
    assert!(r.clones.iter().map(|c| c.apfs).sum::<u64>() > 0, "no APF");
    assert!(r.clones.iter().all(|c| c.faults > 0), "{:?}", r.clones);
    // Host memory: the cache once, plus what the clones wrote; well under two guests'
    // worth of what one restore maps. The cache holds every chunk fetched on demand, and of
    // the eager low 16 MiB the blocks that are not all zeros (a hole reads as zeros).
    let m = &t.guest_memory;
    let lazy_fetched = t.source_bytes_fetched - WORKLOAD_GPA;
    assert!(
        m.cache_bytes > lazy_fetched,
        "{m:?}, {lazy_fetched} fetched lazily"
    );
    assert!(m.cache_bytes <= t.source_bytes_fetched, "{m:?}");
    assert!(
        m.pss_bytes < 2 * single_fetched,
        "PSS {} for 4 clones, one guest fetched {single_fetched}",
        m.pss_bytes
    );
    assert!(m.private_bytes > 4 * PAGE as u64, "{m:?}");
    assert!(
        m.rss_bytes > m.pss_bytes,
        "shared pages count once in PSS: {m:?}"
    );

    // Each clone sees its own mark, the untouched neighbour as the snapshot has it, and its
    // own counters (its guest wrote them), which differ from the snapshot's and each other's.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    let at = |gpa: u64| &memory[usize::try_from(gpa).unwrap()..][..PAGE];
    for (i, s) in &seen {
        assert!(
            s.mark.iter().all(|&b| b == i + 1),
            "clone {i}: another clone's write"
        );
        assert_eq!(s.neighbour, at(MARK_GPA + PAGE as u64), "clone {i}");
        assert_ne!(
            s.counters,
            at(COUNTERS_GPA),
            "clone {i}: its guest wrote nothing?"
        );
    }
    for (i, a) in &seen {
        for (j, b) in &seen {
            if i < j {
                assert_ne!(
                    a.counters, b.counters,
                    "clones {i} and {j} share a written page"
                );
            }
        }
    }
}

/// Clone 1 loses its page tables before its first instruction: it dies at once.
struct Killer;

impl RunObserver for Killer {
    fn start(&mut self, ram: &GuestRam) -> vmm::Result<()> {
        ram.write(vmm::layout::PML4_GPA, &[0u8; PAGE])?;
        Ok(())
    }
}

#[test]
fn a_clone_that_dies_stalls_none_of_the_others() {
    if !testkit::require_kvm() {
        return;
    }
    let snap = standard_snapshot(ApfMode::V2);
    let observers = |i: usize| -> Box<dyn RunObserver + Send> {
        if i == 1 {
            Box::new(Killer)
        } else {
            Box::new(NoObserver)
        }
    };
    let r = restore_clones(&options(snap, 3, "2ms"), &observers).unwrap();
    println!("{}", r.summary());
    assert!(r.clones[1].error.is_some(), "{:?}", r.clones[1]);
    for i in [0, 2] {
        let run = r.clones[i].report.as_deref().expect("the others finish");
        assert_passed(run);
    }
    assert_eq!((r.totals.exited_ok, r.totals.failed), (2, 1));
}

#[test]
fn clones_of_a_hostile_guest_all_finish() {
    if !testkit::require_kvm() {
        return;
    }
    // 16 scans over one region: every clone's tasks fault on the same pages at once.
    let dir = testkit::scratch("clones", "hostile").join("snap");
    let mut guest = Guest::standard(ApfMode::V2);
    guest.workload = "hostile:same-page".into();
    guest.scan_bytes = Some(1 << 20);
    guest.snapshot(&dir);
    let r = restore_clones(&options(&dir, 3, "1ms"), &|_| Box::new(NoObserver)).unwrap();
    println!("{}", r.summary());
    clones_ok(&r);
    assert!(r.totals.pager.fetches <= 16, "{:?}", r.totals.pager);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn too_many_clones_or_none_are_refused_before_anything_runs() {
    if !testkit::require_kvm() {
        return;
    }
    let snap = standard_snapshot(ApfMode::V2);
    for n in [0, 1_000_000] {
        let e = restore_clones(&options(snap, n, "0"), &|_| Box::new(NoObserver)).unwrap_err();
        assert!(matches!(e, vmm::VmmError::Config(_)), "{e}");
        assert!(e.to_string().contains(&format!("--clones {n}")), "{e}");
    }
    let mut eager = options(snap, 2, "0");
    eager.restore.lazy = false;
    let e = restore_clones(&eager, &|_| Box::new(NoObserver)).unwrap_err();
    assert!(e.to_string().contains("--lazy"), "{e}");
}
