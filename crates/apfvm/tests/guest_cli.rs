//! Guest workloads through the command line: hostile cases and their exit statuses, the
//! outstanding-APF limit lowered from the command line, and the qemu-nbd command
//! `apfvm snapshot` prints serving a `restore --memory-source`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pager::nbd::{NbdClient, NbdClientConfig};

fn apfvm(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_apfvm"))
        .args(args)
        .output()
        .expect("run apfvm")
}

#[test]
fn the_cli_runs_hostile_workloads_and_exits_with_the_guests_status() {
    if !testkit::require_kvm() {
        return;
    }
    let common = ["--vcpus", "2", "--mem", "64M", "--apf", "v2"];
    let out = apfvm(&[&["run"][..], &common, &["--workload", "hostile:no-ack"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("hostile: no-ack: PASS"), "{text}");
    let out = apfvm(&[&["run"][..], &common, &["--workload", "hostile:dance"]].concat());
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown hostile case"),
        "{out:?}"
    );

    // The flood, with the engine's limit lowered from the command line.
    let dir = testkit::scratch("guest-cli", "flood");
    let snap = dir.join("snap");
    let snap_s = snap.to_str().unwrap();
    let out = apfvm(
        &[
            &["snapshot", "--out", snap_s, "--quiet"][..],
            &common,
            &["--workload", "hostile:flood"],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{out:?}");
    let json = dir.join("r.json");
    let out = apfvm(&[
        "restore",
        snap_s,
        "--lazy",
        "--quiet",
        "--fetch-latency",
        "5ms",
        "--apf-max-outstanding",
        "2",
        "--timeout",
        "60",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(&json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let limit = v["apf"]["engine"]["fallback"]["outstanding_limit"]
        .as_u64()
        .unwrap();
    assert!(limit > 0, "{}", v["apf"]["engine"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The command line end to end: `apfvm snapshot` prints the qemu-nbd command that serves
/// the snapshot; run as printed, it serves a `restore --memory-source --prefetch` that exits
/// 0 with the NBD source and the policy in its JSON report.
#[test]
fn the_printed_qemu_nbd_command_serves_a_cli_restore() {
    if !testkit::require_kvm() || !testkit::require_qemu_nbd() {
        return;
    }
    let dir = testkit::scratch("guest-cli", "nbd");
    let snap = dir.join("snap");
    let out = Command::new(env!("CARGO_BIN_EXE_apfvm"))
        .args(["snapshot", "--out"])
        .arg(&snap)
        .args([
            "--apf",
            "v2",
            "--mem",
            "64M",
            "--workload",
            "compute:1,scan:1",
            "--scan-size",
            "2M",
            "--quiet",
            "--timeout",
            "60",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let serve = stdout
        .lines()
        .find_map(|l| l.strip_prefix("apfvm: serve its memory over NBD with: "))
        .unwrap_or_else(|| panic!("no qemu-nbd line in:\n{stdout}"));
    let url = stdout
        .lines()
        .find_map(|l| {
            l.split_once("--memory-source '")
                .map(|(_, u)| u.trim_end_matches('\''))
        })
        .unwrap_or_else(|| panic!("no URL in:\n{stdout}"))
        .to_string();
    let mut argv = serve.split_whitespace();
    assert_eq!(argv.next(), Some("qemu-nbd"));
    let mut child = Command::new("qemu-nbd")
        .args(argv)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let parsed = url.parse().unwrap();
    let t0 = Instant::now();
    while NbdClient::connect(&parsed, &NbdClientConfig::default()).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let json = dir.join("r.json");
    let status = Command::new(env!("CARGO_BIN_EXE_apfvm"))
        .arg("restore")
        .arg(&snap)
        .args(["--lazy", "--memory-source", &url, "--prefetch", "readahead"])
        .args([
            "--source-deadline",
            "5s",
            "--quiet",
            "--timeout",
            "60",
            "--json",
        ])
        .arg(&json)
        .status()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.success(), "{status:?}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let l = &r["lazy"];
    assert_eq!(l["prefetch"], "readahead", "{l}");
    assert!(
        l["source"]
            .as_str()
            .unwrap()
            .starts_with("NBD nbd+unix:///mem"),
        "{l}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
