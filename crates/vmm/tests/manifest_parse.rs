//! The snapshot manifest parser (`Manifest::from_json`, what `Snapshot::open` runs on
//! `manifest.json`) on hostile input: regression tests for what the `manifest` fuzz target
//! (`fuzz/`, docs/reliability.md "Fuzzing") found. Each input here was accepted and then made
//! `apfvm restore` crash; each must now be refused with a clear error. No KVM needed.

use vmm::snapshot::{Manifest, SnapshotError};

const MEM: u64 = 64 << 20;

/// A manifest like the one `apfvm snapshot --vcpus 2 --mem 64M` writes, as JSON.
fn valid() -> serde_json::Value {
    serde_json::to_value(testkit::manifest::example(MEM)).unwrap()
}

fn parse(v: &serde_json::Value) -> Result<Manifest, SnapshotError> {
    Manifest::from_json(&serde_json::to_vec(v).unwrap())
}

fn refused(v: &serde_json::Value, why: &str) {
    match parse(v) {
        Err(SnapshotError::BadManifest { path, why: got }) => {
            assert!(got.contains(why), "refused for {got:?}, expected {why:?}");
            assert!(path.ends_with("manifest.json"));
        }
        Err(other) => panic!("refused with {other}, expected BadManifest {why:?}"),
        Ok(_) => panic!("accepted; expected BadManifest {why:?}"),
    }
}

#[test]
fn a_valid_manifest_parses_and_round_trips() {
    let m = parse(&valid()).expect("valid");
    assert_eq!(m.vcpus.len(), 2);
    let again = Manifest::from_json(&serde_json::to_vec(&m).unwrap()).expect("round trip");
    assert_eq!(again.memory, m.memory);
}

/// Fuzz find: a vCPU state whose `index` is not its position (here 5 of 2) was accepted;
/// restore then created vCPU 5 and its thread indexed the 2-entry per-vCPU tables with it:
/// "index out of bounds: the len is 2 but the index is 5" in `vcpu_loop.rs`, and the VMM
/// hung with the vCPU thread gone.
#[test]
fn a_vcpu_index_that_is_not_its_position_is_refused() {
    for (pos, index) in [(1, 5u32), (0, 1), (1, 0), (1, u32::MAX)] {
        let mut v = valid();
        v["vcpus"][pos]["index"] = index.into();
        refused(&v, &format!("vCPU state {pos} has index {index}"));
    }
}

/// Fuzz find: a checksum chunk larger than the memory (here 1 TiB, with the one checksum
/// that `div_ceil` then asks for) was accepted; restore then allocated a 1 TiB read buffer
/// and aborted: "memory allocation of 1099511627776 bytes failed".
#[test]
fn a_checksum_chunk_larger_than_the_memory_is_refused() {
    for chunk in [1u64 << 40, MEM * 2, 1 << 62, u64::MAX - 4095] {
        let mut v = valid();
        v["memory"]["chunk_size"] = chunk.into();
        v["memory"]["crc32"] = serde_json::json!([0]);
        refused(&v, "larger than the memory");
    }
    // One chunk covering all of the memory is still a valid manifest.
    let mut v = valid();
    v["memory"]["chunk_size"] = MEM.into();
    v["memory"]["crc32"] = serde_json::json!([0]);
    parse(&v).expect("one chunk of the memory's size");
}

/// Issue 14: KVM's state structures travel as byte arrays and a short one used to be
/// zero-padded and accepted (`lapic: []` restored eagerly with exit 0 and hung a lazy
/// restore; registers cut short crashed the guest). Each is refused, naming the field.
#[test]
fn short_or_missing_state_arrays_are_refused_naming_the_field() {
    for (field, keep) in [
        ("lapic", 0),
        ("lapic", 1023),
        ("regs", 100),
        ("sregs", 8),
        ("events", 63),
        ("xcrs", 4),
    ] {
        let mut v = valid();
        v["vcpus"][1][field] = serde_json::json!(vec![0u8; keep]);
        refused(&v, &format!("vCPU 1: {field} holds {keep} bytes"));
    }
    let mut v = valid();
    v["vcpus"][0]["lapic"] = serde_json::json!(vec![0u8; 1025]);
    assert!(parse(&v).is_err(), "a long array is refused too");
    let mut v = valid();
    v["vcpus"][0].as_object_mut().unwrap().remove("regs");
    refused(&v, "vCPU 0: regs is missing");
    let mut v = valid();
    v["vm"]["irqchips"][2] = serde_json::json!(vec![0u8; 10]);
    refused(&v, "irqchip 2 holds 10 bytes");
    // xcrs may be absent (a host without XSAVE), never short.
    let mut v = valid();
    v["vcpus"][0]["xcrs"] = serde_json::Value::Null;
    parse(&v).expect("no xcrs");
}

/// Issue 14: an MP state a restore cannot run is refused: an AP waiting for INIT/SIPI, or a
/// vCPU halted with interrupts disabled (nothing could wake it).
#[test]
fn mp_states_that_could_never_run_are_refused() {
    let mut v = valid();
    v["vcpus"][1]["mp_state"] = 7.into();
    refused(&v, "vCPU 1: MP state 7");
    let mut m = testkit::manifest::example(MEM);
    m.vcpus[0].mp_state = kvm_bindings::KVM_MP_STATE_HALTED;
    m.vcpus[0].regs.rflags = 0x2;
    refused(
        &serde_json::to_value(&m).unwrap(),
        "vCPU 0: halted with interrupts disabled",
    );
    m.vcpus[0].regs.rflags = 0x202;
    parse(&serde_json::to_value(&m).unwrap()).expect("halted with IF = 1 wakes on an interrupt");
}

/// Issue 12 item 4: the memory file holds RAM regions back to back (format 2). Regions that
/// overlap, lie in the MMIO hole, do not cover the memory file, or let a chunk cross a
/// region's boundary are refused, naming `memory.regions`.
#[test]
fn inconsistent_memory_regions_are_refused_naming_the_field() {
    const BIG: u64 = 4 << 30;
    let big = || serde_json::to_value(testkit::manifest::example(BIG)).unwrap();
    parse(&big()).expect("a 4 GiB manifest: [0, 3 GiB) and [4 GiB, 5 GiB)");
    let cases: [(&str, serde_json::Value, &str); 6] = [
        (
            "overlap",
            serde_json::json!([
                {"gpa": 0, "size": 3u64 << 30, "file_offset": 0},
                {"gpa": 1u64 << 30, "size": 1u64 << 30, "file_offset": 3u64 << 30},
            ]),
            "memory.regions[0] and memory.regions[1] overlap",
        ),
        (
            "in the hole",
            serde_json::json!([
                {"gpa": 0, "size": 3u64 << 30, "file_offset": 0},
                {"gpa": 0xc000_0000u64, "size": 1u64 << 30, "file_offset": 3u64 << 30},
            ]),
            "memory.regions[1] (0xc0000000..0x100000000) lies in the MMIO hole",
        ),
        (
            "a gap in the file",
            serde_json::json!([
                {"gpa": 0, "size": 3u64 << 30, "file_offset": 0},
                {"gpa": 4u64 << 30, "size": 1u64 << 30, "file_offset": (3u64 << 30) + (1 << 20)},
            ]),
            "memory.regions[1] starts at file offset 0xc0100000, expected 0xc0000000",
        ),
        (
            "not covering the file",
            serde_json::json!([{"gpa": 0, "size": 3u64 << 30, "file_offset": 0}]),
            "memory.regions cover 3221225472 bytes, not the memory file's 4294967296",
        ),
        (
            "a chunk across a boundary",
            serde_json::json!([
                {"gpa": 0, "size": (3u64 << 30) - 4096, "file_offset": 0},
                {"gpa": 4u64 << 30, "size": (1u64 << 30) + 4096, "file_offset": (3u64 << 30) - 4096},
            ]),
            "memory.regions[0] (gpa 0x0, size 0xbffff000, file_offset 0x0): a chunk of 65536 bytes would cross its boundary",
        ),
        ("none", serde_json::json!([]), "memory.regions is empty"),
    ];
    for (what, regions, why) in cases {
        let mut v = big();
        v["memory"]["regions"] = regions;
        match parse(&v) {
            Err(SnapshotError::BadManifest { why: got, .. }) => {
                assert!(
                    got.contains(why),
                    "{what}: refused for {got:?}, expected {why:?}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // A region above the end of a small guest's RAM: not the RAM the restore creates.
    let mut v = valid();
    v["memory"]["regions"][0]["gpa"] = (4u64 << 30).into();
    refused(&v, "memory.regions [");
    // Format 2 needs the field.
    let mut v = valid();
    v["memory"].as_object_mut().unwrap().remove("regions");
    refused(&v, "memory.regions is empty");
}

/// A format 1 manifest (before RAM regions: the memory file is guest RAM `[0, mem_size)`)
/// is read as the format 2 manifest it implies; one that carries format 2's field is
/// refused; another version is refused naming both.
#[test]
fn a_format_1_manifest_reads_as_one_region_at_offset_0() {
    let mut v = valid();
    v["format"] = 1.into();
    v["memory"].as_object_mut().unwrap().remove("regions");
    let m = parse(&v).expect("format 1");
    assert_eq!(m.format, vmm::snapshot::format::FORMAT_VERSION);
    assert_eq!(
        m.memory.regions,
        [vmm::snapshot::format::MemoryRegion {
            gpa: 0,
            size: MEM,
            file_offset: 0
        }]
    );
    let again = Manifest::from_json(&serde_json::to_vec(&m).unwrap()).expect("round trip");
    assert_eq!(again.memory, m.memory);
    let mut v = valid();
    v["format"] = 1.into();
    refused(&v, "memory.regions in a format 1 manifest");
    let mut v = valid();
    v["format"] = 3.into();
    let e = parse(&v).unwrap_err().to_string();
    assert!(
        e.contains("format version 3, this apfvm reads versions 1 to 2"),
        "{e}"
    );
}
