//! Working sets end to end on KVM (issue 12): record on a lazy restore, replay on the next
//! ones; a guest that behaves differently from the recording; every kind of bad file
//! (ignored with a warning, the restore correct); `--working-set off`; recording into a
//! directory that cannot take the file. Each test prints exactly `SKIPPED: no /dev/kvm` and
//! passes where KVM is absent.

use std::path::{Path, PathBuf};

use testkit::fixture::{assert_passed, copy_dir, restore_ok, restore_options, standard_snapshot};
use vmm::snapshot::Snapshot;
use vmm::working_set::{
    FILE_NAME, Touch, WorkingSet, WorkingSetMode, WorkingSetStatus, snapshot_id,
};
use vmm::{ApfMode, ApfPath, RestoreOptions, RunReport, VmmError};

const LATENCY: &str = "1ms";

fn scratch(name: &str) -> PathBuf {
    testkit::scratch("ws", name)
}

fn opts(dir: &Path) -> RestoreOptions {
    restore_options(dir, true, ApfPath::Userspace, LATENCY)
}

fn faults(r: &RunReport) -> u64 {
    r.lazy.as_ref().expect("a lazy run").pager.fault_messages
}

/// A copy of the standard snapshot with a working set recorded into it.
fn recorded(name: &str) -> (PathBuf, RunReport) {
    let dir = scratch(name).join("snap");
    copy_dir(standard_snapshot(ApfMode::V2), &dir);
    let mut o = opts(&dir);
    o.working_set = WorkingSetMode::Record;
    let r = restore_ok(&o);
    assert_passed(&r);
    (dir, r)
}

#[test]
fn a_recorded_working_set_is_replayed_must_have_pages_first_and_faults_mostly_gone() {
    if !testkit::require_kvm() {
        return;
    }
    let (dir, rec) = recorded("replay");
    let ws_rec = rec.working_set.clone().expect("a working-set section");
    assert_eq!(ws_rec.status, WorkingSetStatus::Recorded);
    assert_eq!(
        rec.restore.as_ref().unwrap().eager_bytes,
        0,
        "all of RAM lazy"
    );
    let summary = ws_rec.recorded.expect("counts by touch");
    assert!(
        summary.user > 0,
        "the scan's pages are touched at CPL 3: {summary:?}"
    );
    assert!(dir.join(FILE_NAME).exists());

    // Without it (--working-set off): the fixed low 16 MiB, every scan chunk a fault.
    let mut off = opts(&dir);
    off.working_set = WorkingSetMode::Ignore;
    let base = restore_ok(&off);
    assert_passed(&base);
    assert_eq!(
        base.working_set.as_ref().unwrap().status,
        WorkingSetStatus::Off
    );
    assert_eq!(base.restore.as_ref().unwrap().eager_bytes, 16 << 20);

    let r = restore_ok(&opts(&dir));
    assert_passed(&r);
    testkit::fixture::assert_every_token_answered(&r);
    let ws = r.working_set.clone().unwrap();
    assert_eq!(ws.status, WorkingSetStatus::Used, "{ws:?}");
    assert!(ws.hits > 0 && ws.pages > 0, "{ws:?}");
    assert!(ws.resident_us.is_some(), "the whole set arrived: {ws:?}");
    // Before the first instruction: the must-have pages' chunks, nothing else.
    let eager = r.restore.as_ref().unwrap().eager_bytes;
    assert!(
        eager <= ws.must_have_pages * (64 << 10),
        "{eager} bytes for {ws:?}"
    );
    assert!(
        faults(&r) * 4 <= faults(&base),
        "faults with the working set {} against {} without",
        faults(&r),
        faults(&base)
    );
    assert_eq!(ws.misses, ws.misses_outside + ws.misses_early);
}

#[test]
fn a_guest_that_touches_other_pages_than_recorded_is_served_on_demand_and_counted() {
    if !testkit::require_kvm() {
        return;
    }
    let (dir, _) = recorded("different");
    // The recording's CPL 3 pages moved 32 MiB up: the stream fetches memory the guest
    // never reads, and the scan's pages are all misses outside the working set.
    let memory = Snapshot::open(&dir).unwrap().manifest.memory;
    let mut ws = WorkingSet::read(&dir, &memory).unwrap().unwrap();
    for e in ws.entries.iter_mut().filter(|e| !e.touch.must_have()) {
        e.gpa = (e.gpa + (32 << 20)) % (64 << 20);
    }
    ws.write(&dir).unwrap();
    let r = restore_ok(&opts(&dir));
    assert_passed(&r);
    let w = r.working_set.unwrap();
    assert_eq!(w.status, WorkingSetStatus::Used);
    assert!(
        w.misses_outside >= 16,
        "the scan's chunks are misses: {w:?}"
    );
}

#[test]
fn a_bad_working_set_file_is_ignored_with_a_warning_and_the_restore_stays_correct() {
    if !testkit::require_kvm() {
        return;
    }
    let (dir, _) = recorded("bad");
    let good = std::fs::read(dir.join(FILE_NAME)).unwrap();
    let memory = Snapshot::open(&dir).unwrap().manifest.memory;
    let reseal = |mut b: Vec<u8>| {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let mut corrupt = good.clone();
    corrupt[33] ^= 0xff;
    let mut older = good.clone();
    older[8] = 0;
    let mut other = WorkingSet::decode(&good, &memory).unwrap();
    other.snapshot_id ^= 1;
    let mut outside = WorkingSet::decode(&good, &memory).unwrap();
    outside.entries[0].gpa = 3 << 30;
    outside.entries[0].touch = Touch::User;
    assert_eq!(outside.snapshot_id, snapshot_id(&memory));
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("corrupt", corrupt, "corrupt"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("other snapshot", other.encode(), "another snapshot"),
        ("older version", reseal(older), "version 0"),
        (
            "page outside RAM",
            outside.encode(),
            "not a page of guest RAM",
        ),
    ];
    for (what, bytes, says) in cases {
        std::fs::write(dir.join(FILE_NAME), bytes).unwrap();
        let r = restore_ok(&opts(&dir));
        assert_passed(&r);
        let w = r.working_set.unwrap();
        assert_eq!(w.status, WorkingSetStatus::Ignored, "{what}");
        let note = w.note.unwrap_or_default();
        assert!(note.contains(says), "{what}: {note}");
        assert_eq!(
            r.restore.unwrap().eager_bytes,
            16 << 20,
            "{what}: a plain lazy restore"
        );
    }
}

#[test]
fn recording_needs_a_writable_snapshot_directory_and_says_so_before_the_guest_runs() {
    if !testkit::require_kvm() {
        return;
    }
    let base = scratch("readonly");
    let dir = base.join("snap");
    copy_dir(standard_snapshot(ApfMode::V2), &dir);
    let Some(view) = testkit::ReadOnlyView::new(&dir, &base.join("ro")) else {
        println!("SKIPPED: no read-only view of a directory here (root without mount)");
        return;
    };
    let mut o = opts(view.path());
    o.working_set = WorkingSetMode::Record;
    let t0 = std::time::Instant::now();
    let e = vmm::restore(&o, &mut vmm::NoObserver).unwrap_err();
    assert!(matches!(e, VmmError::WorkingSet(_)), "{e}");
    assert!(
        e.to_string().contains("Read-only") || e.to_string().contains("ermission"),
        "{e}"
    );
    assert!(
        t0.elapsed().as_millis() < 2000,
        "refused before the guest ran"
    );
    // Without --lazy a recording is refused too.
    let mut eager = restore_options(&dir, false, ApfPath::Userspace, "0");
    eager.working_set = WorkingSetMode::Record;
    assert!(matches!(
        vmm::restore(&eager, &mut vmm::NoObserver),
        Err(VmmError::Config(_))
    ));
}

#[test]
fn a_snapshot_of_a_replayed_guest_carries_its_working_set_forward() {
    if !testkit::require_kvm() {
        return;
    }
    let (dir, _) = recorded("carry");
    let out = dir.with_file_name("snap2");
    let mut o = opts(&dir);
    o.snapshot = Some(vmm::SnapshotPlan {
        out: out.clone(),
        on_guest_request: false,
        at: Some(std::time::Duration::from_millis(10)),
        on_flag: None,
    });
    restore_ok(&o);
    let memory = Snapshot::open(&out).unwrap().manifest.memory;
    let ws = WorkingSet::read(&out, &memory)
        .unwrap()
        .expect("carried forward");
    assert_eq!(ws.snapshot_id, snapshot_id(&memory));
    let r = restore_ok(&opts(&out));
    assert_passed(&r);
    assert_eq!(r.working_set.unwrap().status, WorkingSetStatus::Used);
}
