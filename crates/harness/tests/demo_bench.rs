//! The demo and the quick bench end to end, through the library: output structure and
//! internal consistency (eager has no fault, `off` injects nothing, every APF mode injects,
//! every checksum verified, the JSON has its fields), never speed. The quick bench also has
//! its memory rows: file and NBD (`qemu-nbd`, started by the bench) with each prefetch
//! policy, or a note that the NBD rows were skipped where `qemu-nbd` is missing. Prints
//! exactly `SKIPPED: no /dev/kvm` where KVM is absent.

use std::time::Duration;

use harness::bench::{BenchOptions, Mode, PREFETCH_ALL, Source};
use harness::demo::DemoOptions;

fn check_runs(doc: &serde_json::Value, at_least: usize) {
    for key in ["machine", "date", "command", "runs", "window_ms", "setups"] {
        assert!(doc.get(key).is_some(), "no {key:?} in the JSON");
    }
    let runs = doc["runs"].as_array().unwrap();
    assert!(runs.len() >= at_least, "{} runs", runs.len());
    for r in runs {
        for key in [
            "shape",
            "mode",
            "fetch_latency_us",
            "tasks_per_vcpu",
            "vcpus",
            "compute_work",
            "scan_ms",
            "faults",
            "apf_injected",
            "sync_fallbacks",
            "sync_fallbacks_by_reason",
            "inject_latency",
            "repeats",
            "source",
            "prefetch",
            "scans_verified",
            "prefetched_pages",
            "fetch_retries",
            "samples",
        ] {
            assert!(r.get(key).is_some(), "no {key:?} in {r}");
        }
        let mode = r["mode"].as_str().unwrap();
        let faults = r["faults"].as_u64().unwrap();
        let apfs = r["apf_injected"].as_u64().unwrap();
        let prefetch = r["prefetch"].as_str().unwrap();
        assert!(
            matches!(r["source"].as_str().unwrap(), "file" | "nbd"),
            "{r}"
        );
        assert!(matches!(prefetch, "none" | "readahead" | "fill"), "{r}");
        // Every scan's checksum verified, no fetch retried (no checksum mismatch).
        let vcpus = r["vcpus"].as_u64().unwrap();
        let tpv = r["tasks_per_vcpu"].as_u64().unwrap();
        let concurrent = match r["shape"].as_str().unwrap() {
            "mixed" => false,
            "concurrent" => true,
            other => panic!("unknown shape {other}"),
        };
        let scans = if concurrent { vcpus * tpv } else { vcpus };
        assert_eq!(r["scans_verified"].as_u64(), Some(scans), "{r}");
        assert_eq!(r["fetch_retries"].as_u64(), Some(0), "{r}");
        let prefetched = r["prefetched_pages"].as_u64().unwrap();
        // A replayed working set streams its pages (counted as prefetched).
        let ws = mode.ends_with("+ws");
        if prefetch == "none" && !ws {
            assert_eq!(prefetched, 0, "{r}");
        } else if ws {
            assert!(prefetched > 0, "the working set was streamed: {r}");
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
            "kernel" => assert!((faults > 0 && apfs > 0) || prefetch != "none", "{r}"),
            "apf-v1" | "apf-v2" => {
                // The adaptive policy may let faults wait for pages that come soon.
                let waited = r["sync_fallbacks_by_reason"]["short_wait"]
                    .as_u64()
                    .unwrap_or(0);
                assert!(
                    (faults > 0 && apfs + waited > 0) || prefetch != "none",
                    "{r}"
                );
            }
            // Every page may have arrived before the guest asked.
            "off+ws" => assert_eq!(apfs, 0, "{r}"),
            "apf+ws" => {}
            other => panic!("unknown mode {other}"),
        }
        // Userspace APF times each injection (a prefetched row may have had none to inject).
        if (mode == "apf-v1" || mode == "apf-v2") && apfs > 0 {
            let p = &r["inject_latency"];
            assert!(p["count"].as_u64().unwrap() > 0, "{r}");
            assert!(
                p["p50_ns"].as_u64().unwrap() <= p["p99_ns"].as_u64().unwrap(),
                "{r}"
            );
        }
        assert!(r["scan_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["repeats"].as_u64().unwrap() >= 1, "{r}");
        if !concurrent && tpv > 1 {
            assert!(r["compute_work"].as_u64().unwrap() > 0, "{r}");
        }
    }
}

#[test]
fn the_demo_measures_every_mode_in_one_table() {
    if !testkit::require_kvm() {
        return;
    }
    let out = harness::demo::demo(&DemoOptions {
        fetch_latency: Duration::from_millis(1),
        repeats: 1,
        tasks_per_vcpu: 4,
        vcpus: 1,
        modes: Mode::ALL.to_vec(),
        window: Duration::from_millis(100),
        scan_per_task: 2 << 20,
        progress: false,
    })
    .unwrap();
    assert!(out.problems.is_empty(), "{:?}\n{}", out.problems, out.table);
    for word in [
        "mode",
        "×eager",
        "×off",
        "scan ms",
        "faults",
        "APFs",
        "fault→APF",
    ] {
        assert!(out.table.contains(word), "no {word:?} in:\n{}", out.table);
    }
    assert!(
        out.table
            .contains("apfvm demo, concurrent: 1 vCPU × 4 tasks"),
        "no concurrent table:\n{}",
        out.table
    );
    for mode in Mode::NAMES {
        let rows = out
            .table
            .lines()
            .filter(|l| l.starts_with(&format!("{mode} ")))
            .count();
        assert_eq!(rows, 2, "{mode}: one row per workload:\n{}", out.table);
    }
    let doc = serde_json::to_value(&out.results).unwrap();
    assert_eq!(doc["command"], "demo");
    assert!(doc["memory"].is_null(), "{doc}");
    check_runs(&doc, 12);
}

#[test]
fn the_quick_bench_has_its_memory_rows_and_its_plot() {
    if !testkit::require_kvm() {
        return;
    }
    let out = harness::bench::bench(&BenchOptions {
        plot: true,
        quick: true,
        repeats: None,
        modes: Mode::MAIN.to_vec(),
        window: Duration::from_millis(250),
        progress: false,
        command: "bench --quick".into(),
        sources: Source::ALL.to_vec(),
        prefetch: PREFETCH_ALL.to_vec(),
        sources_latencies: vec![Duration::from_millis(1)],
        sources_modes: vec![Mode::Off, Mode::ApfV1, Mode::ApfV2],
    })
    .unwrap();
    assert!(out.problems.is_empty(), "{:?}\n{}", out.problems, out.table);
    let doc = serde_json::to_value(&out.results).unwrap();
    // 2 latencies × 3 setups (mixed with 1 and 4 tasks, concurrent with 4) × 5 modes.
    check_runs(&doc, 30);
    let runs = doc["runs"].as_array().unwrap();
    let rows = |source: &str, prefetch: &str| -> Vec<&serde_json::Value> {
        runs.iter()
            .filter(|r| r["source"] == source && r["prefetch"] == prefetch)
            .collect()
    };
    assert_eq!(rows("file", "none").len(), 30, "{doc}");
    assert_eq!(
        rows("file", "none")
            .iter()
            .filter(|r| r["shape"] == "concurrent")
            .count(),
        10,
        "{doc}"
    );
    // The memory rows: at 1 ms, for off, apf-v1 and apf-v2, each setup.
    for prefetch in ["readahead", "fill"] {
        assert_eq!(rows("file", prefetch).len(), 9, "{doc}");
    }
    if harness::qemu_nbd::available() {
        for prefetch in ["none", "readahead", "fill"] {
            let nbd = rows("nbd", prefetch);
            assert_eq!(nbd.len(), 9, "{doc}");
            for r in nbd {
                assert_eq!(r["fetch_latency_us"], 1000, "{r}");
                if prefetch == "none" {
                    // Every chunk of every scan came over NBD through a fault.
                    assert!(r["faults"].as_u64().unwrap() >= 32, "{r}");
                    if r["mode"] != "off" {
                        assert!(r["apf_injected"].as_u64().unwrap() > 0, "{r}");
                    }
                }
                if prefetch == "fill" {
                    assert!(r["prefetched_pages"].as_u64().unwrap() > 0, "{r}");
                }
            }
        }
        assert!(
            out.nbd_skipped.is_none() && doc["memory"]["nbd_skipped"].is_null(),
            "{doc}"
        );
    } else {
        println!("qemu-nbd not installed: checking that bench skipped its NBD rows");
        assert!(
            out.nbd_skipped
                .as_deref()
                .is_some_and(|s| s.contains("qemu-nbd not found"))
        );
        assert!(rows("nbd", "none").is_empty(), "{doc}");
    }
    assert_eq!(
        out.table.contains("nbd+fill"),
        harness::qemu_nbd::available(),
        "{}",
        out.table
    );
    let svg = out.svg.unwrap();
    assert!(svg.contains("<svg") && svg.contains("apf-v2"), "{svg}");
}

#[test]
fn a_demo_that_cannot_be_built_says_which_option() {
    let e = harness::demo::demo(&DemoOptions {
        fetch_latency: Duration::ZERO,
        repeats: 1,
        tasks_per_vcpu: 0,
        vcpus: 1,
        modes: Mode::ALL.to_vec(),
        window: Duration::from_millis(100),
        scan_per_task: 2 << 20,
        progress: false,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--tasks-per-vcpu 0"), "{e}");
}
