//! The `apfvm` binary end to end: `run`, `snapshot`, `restore`, their reports and errors.
//! Prints exactly `SKIPPED: no /dev/kvm` where KVM is absent.

mod common;

use common::{apfvm, scratch, texts};

#[test]
fn help_explains_the_options() {
    let out = apfvm().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--vcpus",
        "--mem",
        "--apf",
        "--workload",
        "--guest",
        "--json",
        "--quantum-us",
        "msr-selftest",
        "Exit status",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}

#[test]
fn run_prints_console_and_counters_writes_json_and_exits_with_the_guest_status() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("cli-run");
    let json = dir.join("run.json");
    let out = apfvm()
        .args([
            "run",
            "--apf",
            "v2",
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--scan-size",
            "4M",
            "--timeout",
            "30",
        ])
        .args(["--workload", "compute:2,scan:1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("guest exit status 0"), "{stdout}");
    assert!(stdout.contains("engine:"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["exit_status"], 0);
    assert_eq!(report["protocol"], "v2");
    assert_eq!(report["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(report["tasks"][2]["kind"], "scan");
    assert_eq!(report["tasks"][2]["checksum_ok"], true);
    assert_eq!(report["cpus"].as_array().unwrap().len(), 2);
    assert!(
        report["apf"]["engine"]["en_writes"].as_u64().unwrap() >= 2,
        "{report}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_are_clear_and_exit_125() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("cli-errors");
    let bad = dir.join("bad.elf");
    std::fs::write(&bad, b"#!/bin/sh\n").unwrap();
    let dies = dir.join("ud2.elf");
    // nop; ud2 with no IDT: triple fault.
    std::fs::write(
        &dies,
        vmm::loader::build_tiny_elf(guest_abi::KERNEL_MIN_GPA, &[0x90, 0x0f, 0x0b]),
    )
    .unwrap();
    let cases: [(&[&str], &str); 9] = [
        (&["--guest", bad.to_str().unwrap()], "not an ELF"),
        (
            &["--guest", dies.to_str().unwrap()],
            "KVM_EXIT_SHUTDOWN (triple fault: an exception the guest could not handle) at RIP 0x200001",
        ),
        (
            &["--guest", "/nonexistent/kernel"],
            "cannot read guest image",
        ),
        (
            &["--mem", "17M"],
            "memory size 17 MiB is not a multiple of 2 MiB",
        ),
        (&["--mem", "10M"], "memory size 10 MiB is too small"),
        (
            &["--mem", "65G"],
            "memory size 65 GiB is too large: at most 64 GiB",
        ),
        (
            &["--mem", "64M", "--scan-at", "4G"],
            "--scan-at 0x100000000 is not in guest RAM (RAM of 64 MiB: 0x0..0x4000000)",
        ),
        (
            &["--mem", "4G", "--scan-at", "3G"],
            "--scan-at 0xc0000000 is not in guest RAM (RAM of 4 GiB: 0x0..0xc0000000, 0x100000000..0x140000000)",
        ),
        (&["--workload", "dance:2"], "unknown task kind"),
    ];
    for (args, what) in cases {
        let out = apfvm().arg("run").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(stderr.contains(what), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snapshot_then_lazy_restore_from_the_command_line() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = scratch("cli-snap");
    let snap = dir.join("snap");
    let out = apfvm()
        .args(["snapshot", "--out"])
        .arg(&snap)
        .args([
            "--apf",
            "v2",
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--scan-size",
            "1M",
            "--timeout",
            "30",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("snapshot written to"), "{stdout}");
    // The one qemu-nbd command line, and its URL.
    let sock = snap.join("nbd.sock");
    assert!(
        stdout.contains(&format!("--export-name=mem --socket={}", sock.display()))
            && stdout.contains(&format!("'nbd+unix:///mem?socket={}'", sock.display())),
        "{stdout}"
    );
    let json = dir.join("r.json");
    let out = apfvm()
        .arg("restore")
        .arg(&snap)
        .args([
            "--lazy",
            "--fetch-latency",
            "5ms",
            "--timeout",
            "30s",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for needle in [
        "restore: Lazy",
        "uffd message → APF injected",
        "all tasks done",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(
        report["apf"]["engine"]["injected"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["restore"]["mode"], "lazy");
    // A refused snapshot: status 125 and the reason.
    std::fs::write(snap.join("manifest.json"), "{}").unwrap();
    let out = apfvm().arg("restore").arg(&snap).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid apfvm snapshot manifest"));
    std::fs::remove_dir_all(&dir).unwrap();
}
