//! The snapshot manifest parser (`Manifest::from_json`, what `Snapshot::open` runs on
//! `manifest.json`) on hostile input: regression tests for what the `manifest` fuzz target
//! (`fuzz/`, docs/reliability.md "Fuzzing") found. Each input here was accepted and then made
//! `apfvm restore` crash; each must now be refused with a clear error. No KVM needed.

use apf_host::{SavedState, SavedVcpu};
use kvm_bindings::{kvm_irqchip, kvm_lapic_state, kvm_regs, kvm_sregs, kvm_vcpu_events};
use vmm::config::{ApfMode, HaltMode};
use vmm::snapshot::format::{
    CHUNK_SIZE, FORMAT_VERSION, MAGIC, MEMORY, MemoryInfo, SavedConfig, SavedTask, SavedVcpuState,
    SavedVmState,
};
use vmm::snapshot::{Manifest, SnapshotError};

const MEM: u64 = 64 << 20;

fn vcpu(index: u32) -> SavedVcpuState {
    SavedVcpuState {
        index,
        regs: kvm_regs::default(),
        sregs: kvm_sregs::default(),
        xsave: None,
        xcrs: None,
        events: kvm_vcpu_events::default(),
        lapic: kvm_lapic_state::default(),
        mp_state: 0,
        msrs: Vec::new(),
    }
}

/// A manifest like the one `apfvm snapshot --vcpus 2 --mem 64M` writes, as JSON.
fn valid() -> serde_json::Value {
    let m = Manifest {
        magic: MAGIC.into(),
        format: FORMAT_VERSION,
        trigger: "test".into(),
        config: SavedConfig {
            vcpus: 2,
            mem_size: MEM,
            apf: ApfMode::V2,
            halt: HaltMode::InKernel,
            quantum_us: 10_000,
            tasks: vec![SavedTask {
                kind: 1,
                cpu: 1,
                flags: 0,
                arg0: 0,
                arg1: 0,
                arg2: 0,
            }],
            tsc_khz: 2_000_000,
        },
        vcpus: vec![vcpu(0), vcpu(1)],
        vm: SavedVmState {
            irqchips: vec![kvm_irqchip::default(); 3],
        },
        engine: SavedState {
            vcpus: vec![
                SavedVcpu {
                    async_pf_en: 0x20_8009,
                    async_pf_int: 0xf3,
                    async_pf_ack: 0,
                };
                2
            ],
        },
        memory: MemoryInfo {
            file: MEMORY.into(),
            size: MEM,
            chunk_size: CHUNK_SIZE,
            crc32: vec![0; usize::try_from(MEM / CHUNK_SIZE).unwrap()],
        },
    };
    serde_json::to_value(&m).unwrap()
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
