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
