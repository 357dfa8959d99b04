//! `apfvm demo` and `apfvm bench --quick` end to end: output structure and internal
//! consistency (eager has no fault, `off` injects nothing, every APF mode injects, every
//! checksum verified, the JSON has its fields), never speed. `bench --quick` also has its
//! memory rows: file and NBD (`qemu-nbd`, started by bench) with each prefetch policy, or
//! one line saying the NBD rows were skipped where `qemu-nbd` is missing. Prints exactly
//! `SKIPPED: no /dev/kvm` where KVM is absent.

use std::process::Command;

fn apfvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_apfvm"))
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("apfvm-{name}-{}", std::process::id()))
}

#[test]
fn demo_prints_one_table_with_every_mode() {
    if !vmm::kvm_available() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let json = temp("demo.json");
    let out = apfvm()
        .args([
            "demo",
            "--repeats",
            "1",
            "--window",
            "100ms",
            "--scan-size",
            "2M",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for word in [
        "mode",
        "×eager",
        "×off",
        "scan ms",
        "faults",
        "APFs",
        "fault→APF",
    ] {
        assert!(stdout.contains(word), "no {word:?} in:\n{stdout}");
    }
    for mode in ["eager", "off", "off-halt", "apf-v1", "apf-v2", "kernel"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{mode} "))),
            "no row for {mode}:\n{stdout}"
        );
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    check_runs(&doc, 6);
}

fn check_runs(doc: &serde_json::Value, at_least: usize) {
    for key in ["machine", "date", "command", "runs"] {
        assert!(doc.get(key).is_some(), "no {key:?} in the JSON");
    }
    let runs = doc["runs"].as_array().unwrap();
    assert!(runs.len() >= at_least, "{} runs", runs.len());
    for r in runs {
        for key in [
            "mode",
            "fetch_latency_us",
            "tasks_per_vcpu",
            "vcpus",
            "compute_work",
            "scan_ms",
            "faults",
            "apf_injected",
            "sync_fallbacks",
            "inject_latency_us",
            "repeats",
            "source",
            "prefetch",
            "scans_verified",
            "prefetched_pages",
            "fetch_retries",
        ] {
            assert!(r.get(key).is_some(), "no {key:?} in {r}");
        }
        let mode = r["mode"].as_str().unwrap();
        let faults = r["faults"].as_u64().unwrap();
        let apfs = r["apf_injected"].as_u64().unwrap();
        let source = r["source"].as_str().unwrap();
        let prefetch = r["prefetch"].as_str().unwrap();
        assert!(matches!(source, "file" | "nbd"), "{r}");
        assert!(matches!(prefetch, "none" | "readahead" | "fill"), "{r}");
        // Every scan's checksum verified, no fetch retried (no checksum mismatch).
        assert_eq!(r["scans_verified"], r["vcpus"], "{r}");
        assert_eq!(r["fetch_retries"].as_u64(), Some(0), "{r}");
        let prefetched = r["prefetched_pages"].as_u64().unwrap();
        if prefetch == "none" {
            assert_eq!(prefetched, 0, "{r}");
        } else {
            // A prefetch may map a page before its fault, or every page before any fault.
            assert!(faults + prefetched > 0, "{r}");
        }
        match mode {
            "eager" => assert_eq!(faults, 0, "{r}"),
            "off" | "off-halt" => {
                assert_eq!(apfs, 0, "{r}");
                assert!(faults > 0 || prefetch != "none", "{r}");
            }
            "apf-v1" | "apf-v2" | "kernel" => {
                assert!((faults > 0 && apfs > 0) || prefetch != "none", "{r}");
            }
            other => panic!("unknown mode {other}"),
        }
        // (A prefetched row may have had nothing to inject.)
        if (mode == "apf-v1" || mode == "apf-v2") && (prefetch == "none" || apfs > 0) {
            let p = &r["inject_latency_us"];
            assert!(
                p["p50"].as_f64().unwrap() <= p["p99"].as_f64().unwrap(),
                "{r}"
            );
        }
        assert!(r["scan_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["repeats"].as_u64().unwrap() >= 1, "{r}");
        if r["tasks_per_vcpu"].as_u64().unwrap() > 1 {
            assert!(r["compute_work"].as_u64().unwrap() > 0, "{r}");
        }
    }
}

#[test]
fn bench_quick_writes_json_and_plot() {
    if !vmm::kvm_available() {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let json = temp("bench.json");
    let svg = temp("bench.svg");
    let out = apfvm()
        .args(["bench", "--quick", "--no-progress", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // 2 latencies × 2 task counts × 5 modes.
    check_runs(&doc, 20);
    let runs = doc["runs"].as_array().unwrap();
    let rows = |source: &str, prefetch: &str| -> Vec<&serde_json::Value> {
        runs.iter()
            .filter(|r| r["source"] == source && r["prefetch"] == prefetch)
            .collect()
    };
    assert_eq!(rows("file", "none").len(), 20, "{doc}");
    // The memory rows: at 1 ms, for off, apf-v1 and apf-v2, both task counts.
    for prefetch in ["readahead", "fill"] {
        assert_eq!(rows("file", prefetch).len(), 6, "{doc}");
    }
    let qemu_nbd = Command::new("qemu-nbd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if qemu_nbd {
        for prefetch in ["none", "readahead", "fill"] {
            let nbd = rows("nbd", prefetch);
            assert_eq!(nbd.len(), 6, "{doc}");
            for r in nbd {
                assert_eq!(r["fetch_latency_us"], 1000, "{r}");
                let faults = r["faults"].as_u64().unwrap();
                let apfs = r["apf_injected"].as_u64().unwrap();
                if prefetch == "none" {
                    // Every chunk of every scan came over NBD through a fault.
                    assert!(faults >= 32, "{r}");
                    if r["mode"] != "off" {
                        assert!(apfs > 0, "{r}");
                    }
                }
                if prefetch == "fill" {
                    assert!(r["prefetched_pages"].as_u64().unwrap() > 0, "{r}");
                }
            }
        }
        assert!(doc["memory"]["nbd_skipped"].is_null(), "{doc}");
    } else {
        println!("qemu-nbd not installed: checking that bench skipped its NBD rows");
        assert!(stderr.contains("qemu-nbd not found"), "{stderr}");
        assert!(rows("nbd", "none").is_empty(), "{doc}");
    }
    assert!(stdout.contains("nbd+fill") == qemu_nbd, "{stdout}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.contains("<svg") && plot.contains("apf-v2"), "{plot}");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
}

#[test]
fn demo_without_kvm_or_with_bad_options_fails_clearly() {
    let out = apfvm()
        .args(["demo", "--tasks-per-vcpu", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if vmm::kvm_available() {
        assert!(stderr.contains("--tasks-per-vcpu"), "{stderr}");
    } else {
        assert!(stderr.contains("SKIPPED: no /dev/kvm"), "{stderr}");
    }
}
