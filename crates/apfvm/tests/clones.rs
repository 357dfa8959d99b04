//! `apfvm restore --clones N` end to end: the summary and JSON (one entry per clone, the
//! totals), the single-restore JSON left as it was, and bad input refused with status 125
//! before anything runs; `bench-clones` (from nbdkit). Prints exactly `SKIPPED: no /dev/kvm`
//! (or `SKIPPED: nbdkit not installed`) where that is absent.

mod common;

use common::{apfvm, scratch, texts};
use testkit::fixture::standard_snapshot;
use vmm::ApfMode;

#[test]
fn help_explains_clones() {
    let out = apfvm().args(["restore", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["--clones", "CLONES:", "MemAvailable", "copy-on-write"] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}

#[test]
fn clones_report_one_entry_each_and_the_totals() {
    if !testkit::require_kvm() {
        return;
    }
    let snap = standard_snapshot(ApfMode::V2);
    let dir = scratch("clones-json");
    let json = dir.join("clones.json");
    let out = apfvm()
        .arg("restore")
        .arg(snap)
        .args([
            "--lazy",
            "--clones",
            "3",
            "--fetch-latency",
            "1ms",
            "--timeout",
            "60",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("3 clones of"), "{stdout}");
    assert!(stdout.contains("host memory of the guests"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let clones = v["clones"].as_array().unwrap();
    assert_eq!(clones.len(), 3);
    for c in clones {
        assert_eq!(c["exit_status"], 0, "{c}");
        for key in ["done_us", "faults", "apfs", "memory", "tasks"] {
            assert!(!c[key].is_null(), "no {key} in {c}");
        }
    }
    let t = &v["totals"];
    assert!(
        t["source_bytes_fetched"].as_u64().unwrap() > 16 << 20,
        "{t}"
    );
    assert!(t["guest_memory"]["pss_bytes"].as_u64().unwrap() > 0, "{t}");
    assert!(t["wall_us"].as_u64().unwrap() > 0, "{t}");

    // Without --clones, the restore's JSON keeps its shape: no clone fields.
    let single = dir.join("single.json");
    let out = apfvm()
        .arg("restore")
        .arg(snap)
        .args(["--lazy", "--quiet", "--json"])
        .arg(&single)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", texts(&out));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&single).unwrap()).unwrap();
    assert!(v.get("clones").is_none() && v.get("totals").is_none());
    for key in ["exit_status", "tasks", "apf", "lazy", "restore"] {
        assert!(v.get(key).is_some(), "no {key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_clone_counts_are_refused_with_status_125_before_anything_runs() {
    if !testkit::require_kvm() {
        return;
    }
    let snap = standard_snapshot(ApfMode::V2);
    let run = |extra: &[&str]| {
        let out = apfvm()
            .arg("restore")
            .arg(snap)
            .args(extra)
            .output()
            .unwrap();
        let (stdout, stderr) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(125),
            "{extra:?}: {stdout}\n{stderr}"
        );
        assert!(!stdout.contains("clones of"), "{extra:?} ran: {stdout}");
        stderr
    };
    let e = run(&["--lazy", "--clones", "0"]);
    assert!(e.contains("--clones") && e.contains('0'), "{e}");
    let e = run(&["--lazy", "--clones", "100000"]);
    assert!(e.contains("MemAvailable") && e.contains("at most"), "{e}");
    let e = run(&["--clones", "2"]);
    assert!(e.contains("--lazy"), "{e}");
    let e = run(&["--lazy", "--clones", "2", "--snapshot-out", "/tmp/x"]);
    assert!(e.contains("--snapshot-out"), "{e}");
}

#[test]
fn bench_clones_prints_its_table_and_writes_json() {
    if !testkit::require_kvm() || !testkit::require_nbdkit() {
        return;
    }
    let dir = scratch("bench-clones");
    let json = dir.join("bench.json");
    let out = apfvm()
        .args([
            "bench-clones",
            "--clones",
            "2",
            "--mem",
            "64M",
            "--workload",
            "scan:2",
        ])
        .args(["--server", "nbdkit", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for row in [
        "one restore",
        "2 clones",
        "target: bytes read from the source",
    ] {
        assert!(stdout.contains(row), "no {row}:\n{stdout}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["clones"], 2);
    assert_eq!(v["targets"].as_array().unwrap().len(), 3);
    let (single, clones) = (&v["single"], &v["clones_run"]);
    assert_eq!(single["source_bytes"], 64 << 20, "{single}");
    // Each chunk once: no more than one guest's bytes.
    assert_eq!(clones["source_bytes"], 64 << 20, "{clones}");
    assert!(
        clones["host_bytes"].as_u64().unwrap() < 2 * (64 << 20),
        "{clones}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
