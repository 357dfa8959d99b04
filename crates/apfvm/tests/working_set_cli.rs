//! `apfvm restore --record-working-set` and `--working-set` through the binary: a recording
//! and its replay in the JSON report, and a read-only snapshot directory refused with exit
//! status 125 before the guest runs. Prints exactly `SKIPPED: no /dev/kvm` without KVM.

mod common;

use common::{apfvm, scratch, texts};
use testkit::fixture::{copy_dir, standard_snapshot};
use vmm::ApfMode;

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn record_then_replay_through_the_cli_reports_the_working_set() {
    if !testkit::require_kvm() {
        return;
    }
    let base = scratch("cli-ws");
    let dir = base.join("snap");
    copy_dir(standard_snapshot(ApfMode::V2), &dir);
    let restore = |extra: &[&str], out: &str| {
        let o = apfvm()
            .args([
                "restore",
                "--lazy",
                "--quiet",
                "--fetch-latency",
                "1ms",
                "--timeout",
                "60",
            ])
            .arg(&dir)
            .args(extra)
            .arg("--json")
            .arg(base.join(out))
            .output()
            .unwrap();
        let (stdout, stderr) = texts(&o);
        assert_eq!(o.status.code(), Some(0), "{extra:?}\n{stdout}\n{stderr}");
        json(&base.join(out))["working_set"].clone()
    };
    let rec = restore(&["--record-working-set"], "rec.json");
    assert_eq!(rec["status"], "recorded", "{rec}");
    assert!(rec["pages"].as_u64().unwrap() > 0, "{rec}");
    let used = restore(&[], "used.json");
    assert_eq!(used["status"], "used", "{used}");
    assert!(used["hits"].as_u64().unwrap() > 0, "{used}");
    for field in ["pages", "hits", "misses", "resident_us"] {
        assert!(used[field].is_u64(), "{field} in {used}");
    }
    let off = restore(&["--working-set", "off"], "off.json");
    assert_eq!(off["status"], "off", "{off}");
}

#[test]
fn recording_into_a_read_only_snapshot_directory_exits_125_before_the_guest_runs() {
    if !testkit::require_kvm() {
        return;
    }
    let base = scratch("cli-ws-ro");
    let dir = base.join("snap");
    copy_dir(standard_snapshot(ApfMode::V2), &dir);
    let Some(view) = testkit::ReadOnlyView::new(&dir, &base.join("ro")) else {
        println!("SKIPPED: no read-only view of a directory here (root without mount)");
        return;
    };
    let out = apfvm()
        .args(["restore", "--lazy", "--record-working-set"])
        .arg(view.path())
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(125), "{stdout}\n{stderr}");
    assert!(stderr.contains("working set"), "{stderr}");
    assert!(
        !stdout.contains("guest exit status"),
        "the guest never ran: {stdout}"
    );
}
