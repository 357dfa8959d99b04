//! `apfvm soak --duration 10s` end to end, through the binary: one line per iteration, the
//! summary's structure, the JSON's fields, and zero failures. Prints exactly
//! `SKIPPED: no /dev/kvm` where KVM is absent.

use std::process::Command;

#[test]
fn a_short_soak_passes_and_reports_its_counts() {
    if !vmm::kvm_available() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let json = std::env::temp_dir().join(format!("apfvm-soak-{}.json", std::process::id()));
    // Its own TMPDIR, to check that the snapshots' temporary directories are removed.
    let tmp = std::env::temp_dir().join(format!("apfvm-soak-tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apfvm"))
        .args(["soak", "--duration", "10s", "--seed", "3", "--json"])
        .arg(&json)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
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
        "lost wakeups 0, stuck tasks 0, checksum mismatches 0, VMM errors 0, VMM panics 0",
        "result: PASS",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    let lines = stdout.lines().filter(|l| l.starts_with('[')).count();

    let text = std::fs::read_to_string(&json).unwrap();
    std::fs::remove_file(&json).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let summary = &doc["summary"];
    let counts = &summary["counts"];
    assert_eq!(summary["seed"], 3);
    assert_eq!(summary["passed"], true);
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
    assert!(summary["machine"]["cpus"].as_u64().unwrap() > 0);
    let its = doc["iterations"].as_array().unwrap();
    assert_eq!(its.len() as u64, n);
    for it in its {
        assert_eq!(it["failures"].as_array().unwrap().len(), 0, "{it}");
        assert!(it["mode"].is_string() && it["workload"].is_string(), "{it}");
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
    std::fs::remove_dir(&tmp).unwrap();
}
