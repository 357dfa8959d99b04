//! A short soak through the library: every iteration passes and is counted, the counts add
//! up, every APF token the engine injected was answered, the JSON has its fields. Prints
//! exactly `SKIPPED: no /dev/kvm` where KVM is absent. (`apfvm soak` through the binary,
//! its exit statuses and Ctrl-C are tested in crates/apfvm/tests.)

use std::time::Duration;

use harness::soak::{SoakEvent, SoakOptions, Verdict};

#[test]
fn a_short_soak_passes_and_counts_what_it_ran() {
    if !testkit::require_kvm() {
        return;
    }
    let mut lines = Vec::new();
    let report = harness::soak::soak(
        &SoakOptions {
            duration: Duration::from_secs(4),
            seed: 5,
            restore_timeout: Duration::from_mins(1),
            command: "soak test".into(),
        },
        |e| match e {
            SoakEvent::Started(line) => lines.push(line.to_string()),
            SoakEvent::Iteration(it) => lines.push(it.line()),
        },
    )
    .unwrap();
    let s = &report.summary;
    let text = s.text();
    println!("{}\n{text}", lines.join("\n"));
    assert_eq!(
        (s.result, s.passed, s.interrupted),
        (Verdict::Pass, true, false),
        "{text}"
    );
    let c = &s.counts;
    assert!(c.iterations >= 1);
    assert_eq!(report.iterations.len() as u64, c.iterations);
    assert_eq!(lines.len() as u64, c.iterations + 1);
    assert_eq!((c.passed, c.failed), (c.iterations, 0));
    assert_eq!(c.by_mode.values().sum::<u64>(), c.iterations);
    assert_eq!(
        (
            c.lost_wakeups,
            c.stuck_tasks,
            c.checksum_mismatches,
            c.vmm_errors,
            c.panics,
            c.guest_ready_after_wake_all
        ),
        (0, 0, 0, 0, 0, 0)
    );
    for it in &report.iterations {
        assert!(it.passed(), "{}", it.line());
        assert_eq!(
            it.engine_injected,
            it.page_ready_delivered + it.tokens_covered_by_wake_all,
            "{}",
            it.line()
        );
    }
    assert!(text.contains("result: PASS"), "{text}");
    let doc = serde_json::to_value(&report).unwrap();
    assert_eq!(doc["summary"]["seed"], 5);
    assert_eq!(doc["summary"]["result"], "pass");
    assert!(doc["summary"]["machine"]["cpus"].as_u64().unwrap() > 0);
    let it = &doc["iterations"][0];
    assert!(it["mode"].is_string() && it["workload"].is_string(), "{it}");
    assert!(it["failures"].as_array().unwrap().is_empty(), "{it}");
}
