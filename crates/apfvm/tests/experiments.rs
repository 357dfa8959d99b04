//! `apfvm demo` and `apfvm soak` through the binary: what they print, the JSON they write,
//! their exit statuses, their temporary directories removed, and Ctrl-C during a soak (issue
//! 14 item 7: an interrupted soak is not a pass). The experiments themselves are tested in
//! crates/harness/tests. Prints exactly `SKIPPED: no /dev/kvm` where KVM is absent.

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::Stdio;

use common::{apfvm, scratch, texts};

#[test]
fn demo_prints_its_table_and_writes_json() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("demo-cli");
    let json = dir.join("demo.json");
    let out = apfvm()
        .args([
            "demo",
            "--repeats",
            "1",
            "--window",
            "100ms",
            "--scan-size",
            "2M",
            "--modes",
            "eager,off,apf-v2",
            "--no-progress",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.starts_with("apfvm demo: 1 vCPU × (3 compute tasks + 1 scan of 2 MiB cold memory)"),
        "{stdout}"
    );
    for mode in ["eager", "off", "apf-v2"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{mode} "))),
            "no row for {mode}:\n{stdout}"
        );
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(
        stdout.contains("apfvm demo, concurrent: 1 vCPU × 4 tasks, each scanning 2 MiB"),
        "no concurrent table:\n{stdout}"
    );
    // Three modes, for the mixed and the concurrent guest.
    assert_eq!(doc["runs"].as_array().unwrap().len(), 6, "{doc}");
    assert_eq!(doc["command"], "demo");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_short_soak_passes_and_reports_its_counts() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("soak-cli");
    let json = dir.join("soak.json");
    // Its own TMPDIR, to check that the snapshots' temporary directories are removed.
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = apfvm()
        .args(["soak", "--duration", "10s", "--seed", "3", "--json"])
        .arg(&json)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    println!("{stdout}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for needle in [
        "by mode:",
        "faults ",
        "APFs injected ",
        "wake-alls ",
        "lost wakeups 0, stuck tasks 0, checksum mismatches 0, VMM errors 0, VMM panics 0, page readies after a wake-all 0",
        "result: PASS",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    let lines = stdout.lines().filter(|l| l.starts_with('[')).count();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let summary = &doc["summary"];
    let counts = &summary["counts"];
    assert_eq!(
        (&summary["seed"], &summary["passed"], &summary["result"]),
        (&3.into(), &true.into(), &"pass".into())
    );
    let n = counts["iterations"].as_u64().unwrap();
    assert!(n >= 2, "{counts}");
    assert_eq!(usize::try_from(n).unwrap(), lines);
    assert_eq!(counts["passed"].as_u64(), Some(n));
    for zero in [
        "failed",
        "lost_wakeups",
        "stuck_tasks",
        "checksum_mismatches",
        "vmm_errors",
        "panics",
    ] {
        assert_eq!(counts[zero], 0, "{zero}: {counts}");
    }
    let by_mode: u64 = counts["by_mode"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(by_mode, n);
    for key in [
        "faults",
        "apf_injected",
        "page_ready_delivered",
        "wake_alls_delivered",
        "tokens_covered_by_wake_all",
    ] {
        assert!(counts[key].is_u64(), "{key}: {counts}");
    }
    let its = doc["iterations"].as_array().unwrap();
    assert_eq!(its.len() as u64, n);
    for it in its {
        assert_eq!(it["failures"].as_array().unwrap().len(), 0, "{it}");
        let tokens = (
            it["engine_injected"].as_u64().unwrap(),
            it["page_ready_delivered"].as_u64().unwrap(),
            it["tokens_covered_by_wake_all"].as_u64().unwrap(),
        );
        assert_eq!(tokens.0, tokens.1 + tokens.2, "{it}");
    }
    // The snapshots' temporary directories are gone.
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 14 item 7: Ctrl-C during a soak printed "result: PASS" and exited 0.
#[test]
fn an_interrupted_soak_is_not_a_pass() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("soak-int");
    let json = dir.join("soak.json");
    let mut child = apfvm()
        .args(["soak", "--duration", "1h", "--seed", "1", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // After the first iteration's line: Ctrl-C.
    while !seen.lines().any(|l| l.starts_with('[')) {
        assert!(
            stdout.read_line(&mut seen).unwrap() > 0,
            "soak ended early:\n{seen}"
        );
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    stdout.read_to_string(&mut seen).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{seen}\n{stderr}");
    assert!(
        seen.contains("result: INTERRUPTED") && seen.contains("(interrupted)"),
        "{seen}"
    );
    assert!(!seen.contains("result: PASS"), "{seen}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        (&doc["summary"]["result"], &doc["summary"]["passed"]),
        (&"interrupted".into(), &false.into()),
        "{doc}"
    );
    assert!(
        doc["summary"]["counts"]["iterations"].as_u64().unwrap() >= 1,
        "{doc}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
