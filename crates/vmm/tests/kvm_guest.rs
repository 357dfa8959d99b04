//! The real guest on `/dev/kvm`, through the library API. Each test prints exactly
//! `SKIPPED: no /dev/kvm` and passes where KVM is absent.

use std::time::Duration;

use guest_abi::{KERNEL_MIN_GPA, TaskKind};
use vmm::loader::{LoadError, build_tiny_elf};
use vmm::report::TaskState;
use vmm::workload::{self, WorkloadParams};
use vmm::{ApfMode, HaltMode, RunOptions, RunReport, VmConfig, VmmError, guest_image};

const MEM: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

fn config(apf: ApfMode, vcpus: u32, spec: &str) -> VmConfig {
    let tasks = workload::build(
        spec,
        WorkloadParams {
            vcpus,
            mem_size: MEM,
            scan_at: None,
            scan_bytes: Some(4 << 20),
            scan_passes: 1,
            compute_ms: 0,
        },
    )
    .unwrap();
    VmConfig {
        vcpus,
        mem_size: MEM,
        apf,
        guest_image: guest_image::BUNDLED.to_vec(),
        tasks,
        quantum_us: 10_000,
        halt: HaltMode::InKernel,
    }
}

fn run(cfg: &VmConfig) -> vmm::Result<RunReport> {
    vmm::boot_and_run(
        cfg,
        &RunOptions {
            timeout: Some(TIMEOUT),
            ..RunOptions::default()
        },
    )
}

fn run_ok(cfg: &VmConfig) -> RunReport {
    run(cfg).unwrap_or_else(|e| panic!("run failed: {e}"))
}

fn assert_all_tasks_passed(r: &RunReport) {
    assert_eq!(r.exit_status, 0, "console:\n{}", r.console);
    assert!(r.guest_counters_valid, "guest counters page missing");
    assert!(!r.tasks.is_empty());
    for t in &r.tasks {
        assert_eq!(
            (t.state, t.exit_code),
            (TaskState::Done, 0),
            "task {t:?}\nconsole:\n{}",
            r.console
        );
    }
}

#[test]
fn boots_and_exits_0_in_every_apf_mode() {
    if !testkit::require_kvm() {
        return;
    }
    for apf in [ApfMode::Off, ApfMode::V1, ApfMode::V2] {
        let r = run_ok(&config(apf, 1, "compute:2,scan:1"));
        assert_all_tasks_passed(&r);
        let scan = r
            .tasks
            .iter()
            .find(|t| t.kind == Some(TaskKind::Scan))
            .unwrap();
        assert_eq!(scan.work, 1024, "a 4 MiB scan walks 1024 pages");
        assert_eq!(
            scan.checksum_ok,
            Some(true),
            "scan checksum differs from the fill pattern's"
        );
    }
}

#[test]
fn apf_off_guest_sees_no_feature_and_never_writes_the_msrs() {
    if !testkit::require_kvm() {
        return;
    }
    let r = run_ok(&config(ApfMode::Off, 2, "compute:2,scan:1"));
    assert_all_tasks_passed(&r);
    assert_eq!(r.apf.driver.msr_exits, 0, "the guest touched an APF MSR");
    assert_eq!(
        (
            r.apf.engine.en_writes,
            r.apf.engine.int_writes,
            r.apf.engine.acks
        ),
        (0, 0, 0)
    );
    assert!(r.apf.enables.is_empty());
    assert!(r.apf.active.iter().all(Option::is_none));
    assert!(r.cpus.iter().all(|c| c.apf_version == 0), "{:?}", r.cpus);
}

fn check_enabled(apf: ApfMode, version: u8) {
    let vcpus = 2;
    let r = run_ok(&config(apf, vcpus, "compute:2,scan:1"));
    assert_all_tasks_passed(&r);
    assert_eq!(
        r.apf.engine.gp.total(),
        0,
        "no #GP expected: {:?}",
        r.apf.engine.gp
    );
    let mut areas = Vec::new();
    for cpu in 0..vcpus as usize {
        let rec = r
            .apf
            .enables
            .iter()
            .find(|e| e.vcpu == cpu && e.version == Some(version))
            .unwrap_or_else(|| panic!("no v{version} enable on vCPU {cpu}: {:?}", r.apf.enables));
        assert_eq!(rec.area_gpa % 64, 0, "area not 64-aligned");
        assert!(rec.area_gpa + 64 <= MEM, "area outside RAM");
        let active = r.apf.active[cpu].expect("APF still active at exit");
        assert_eq!((active.version, active.area_gpa), (version, rec.area_gpa));
        assert_eq!(
            r.cpus[cpu].apf_version,
            u32::from(version),
            "guest's own record"
        );
        areas.push(rec.area_gpa);
    }
    areas.dedup();
    assert_eq!(areas.len(), vcpus as usize, "each vCPU has its own area");
    // The enable queued a wake-all per vCPU, and it was delivered.
    assert_eq!(r.apf.engine.wake_all_queued, u64::from(vcpus));
    assert_eq!(r.apf.engine.wake_all_delivered, u64::from(vcpus));
    assert_eq!(
        r.cpus.iter().map(|c| c.wake_all).sum::<u64>(),
        u64::from(vcpus)
    );
}

#[test]
fn v1_enable_is_recorded_with_its_area_and_version() {
    if !testkit::require_kvm() {
        return;
    }
    check_enabled(ApfMode::V1, 1);
}

#[test]
fn v2_enable_is_recorded_with_its_area_and_version() {
    if !testkit::require_kvm() {
        return;
    }
    check_enabled(ApfMode::V2, 2);
}

#[test]
fn msr_selftest_passes_in_seed_and_modern_mode() {
    if !testkit::require_kvm() {
        return;
    }
    for apf in [ApfMode::V1, ApfMode::V2, ApfMode::Off] {
        let r = run_ok(&config(apf, 1, "msr-selftest"));
        assert_all_tasks_passed(&r);
        assert_eq!(r.tasks[0].kind, Some(TaskKind::MsrSelftest));
        assert!(
            r.apf.driver.msr_exits > 0,
            "{apf:?}: the self-test wrote no MSR"
        );
        assert!(
            r.apf.engine.gp.total() > 0,
            "{apf:?}: no invalid value answered with #GP"
        );
        if apf != ApfMode::Off {
            assert!(
                r.apf.engine.en_writes > 0,
                "{apf:?}: no valid _EN write accepted"
            );
        }
    }
}

#[test]
fn broken_images_are_refused_with_clear_errors() {
    if !testkit::require_kvm() {
        return;
    }
    let mut cfg = config(ApfMode::V2, 1, "compute:1");
    cfg.guest_image = b"this is not an ELF file".to_vec();
    let err = run(&cfg).unwrap_err();
    assert!(matches!(err, VmmError::Image(LoadError::NotElf)), "{err}");
    assert!(err.to_string().contains("not an ELF"), "{err}");

    let bundled = guest_image::BUNDLED;
    for cut in [16, 64, bundled.len() / 2] {
        cfg.guest_image = bundled[..cut].to_vec();
        let err = run(&cfg).unwrap_err();
        assert!(matches!(err, VmmError::Image(_)), "cut at {cut}: {err}");
    }

    cfg.guest_image = build_tiny_elf(0x1000, &[0xf4]);
    let err = run(&cfg).unwrap_err();
    assert!(
        err.to_string().contains("outside the kernel region"),
        "{err}"
    );
}

#[test]
fn a_fatal_guest_fault_reports_rip_and_reason() {
    if !testkit::require_kvm() {
        return;
    }
    let mut cfg = config(ApfMode::V2, 1, "compute:1");
    // nop; ud2 — with no IDT the #UD becomes a triple fault.
    cfg.guest_image = build_tiny_elf(KERNEL_MIN_GPA, &[0x90, 0x0f, 0x0b]);
    let err = run(&cfg).unwrap_err();
    let VmmError::GuestFault(fault) = &err else {
        panic!("not a guest fault: {err}")
    };
    assert_eq!(fault.vcpu, 0);
    assert_eq!(fault.rip, Some(KERNEL_MIN_GPA + 1), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("KVM_EXIT_SHUTDOWN") && msg.contains("0x200001"),
        "{msg}"
    );
}

#[test]
fn bad_configurations_are_refused() {
    if !testkit::require_kvm() {
        return;
    }
    let mut cfg = config(ApfMode::V2, 1, "compute:1");
    for (mem, what) in [
        (17 << 20, "multiple of 2 MiB"),
        (2 << 20, "too small"),
        (1 << 40, "too large"),
    ] {
        cfg.mem_size = mem;
        let err = run(&cfg).unwrap_err();
        assert!(err.to_string().contains(what), "{mem}: {err}");
    }
    let mut cfg = config(ApfMode::V2, 1, "compute:1");
    cfg.vcpus = 0;
    assert!(run(&cfg).is_err());
    cfg.vcpus = 9;
    assert!(run(&cfg).is_err());
}

#[test]
fn tasks_run_round_robin_on_several_vcpus() {
    if !testkit::require_kvm() {
        return;
    }
    let r = run_ok(&config(ApfMode::V2, 3, "compute:3,scan:2"));
    assert_all_tasks_passed(&r);
    assert_eq!(
        r.tasks.iter().map(|t| t.cpu).collect::<Vec<_>>(),
        [0, 1, 2, 0, 1]
    );
    assert_eq!(
        r.tasks
            .iter()
            .filter(|t| t.kind == Some(TaskKind::Scan))
            .count(),
        2
    );
    assert_eq!(r.tasks[0].kind, Some(TaskKind::Compute));
}

#[test]
fn halt_without_exits_also_boots() {
    if !testkit::require_kvm() {
        return;
    }
    let mut cfg = config(ApfMode::V2, 2, "compute:2,scan:1");
    cfg.halt = HaltMode::NoExit;
    assert_all_tasks_passed(&run_ok(&cfg));
}
