//! A valid snapshot manifest to edit: the parser's tests and the `manifest` fuzz target start
//! from it.

use apf_host::{SavedState, SavedVcpu};
use kvm_bindings::{kvm_irqchip, kvm_lapic_state, kvm_regs, kvm_sregs, kvm_vcpu_events};
use vmm::config::{ApfMode, HaltMode};
use vmm::layout::ram_regions;
use vmm::snapshot::Manifest;
use vmm::snapshot::format::{
    CHUNK_SIZE, FORMAT_VERSION, MAGIC, MEMORY, MemoryInfo, SavedConfig, SavedTask, SavedVcpuState,
    SavedVmState,
};
use vmm::snapshot::memory_file::regions_of;

/// The state of vCPU `index` as a snapshot of a just-created vCPU would hold it.
pub fn vcpu(index: u32) -> SavedVcpuState {
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

/// A task of the saved workload.
pub fn task(kind: u32, cpu: u32) -> SavedTask {
    SavedTask {
        kind,
        cpu,
        flags: 0,
        arg0: 0,
        arg1: 0,
        arg2: 0,
    }
}

/// A valid manifest of 2 vCPUs and `mem` bytes of RAM (v2 APF enabled on vCPU 0, a compute
/// task on vCPU 0 and a scan on vCPU 1, the memory file's regions those of `mem`), as
/// `apfvm snapshot` writes one.
pub fn example(mem: u64) -> Manifest {
    Manifest {
        magic: MAGIC.into(),
        format: FORMAT_VERSION,
        trigger: "test".into(),
        config: SavedConfig {
            vcpus: 2,
            mem_size: mem,
            apf: ApfMode::V2,
            halt: HaltMode::InKernel,
            quantum_us: 10_000,
            tasks: vec![task(1, 0), task(2, 1)],
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
                },
                SavedVcpu::default(),
            ],
        },
        memory: MemoryInfo {
            file: MEMORY.into(),
            size: mem,
            chunk_size: CHUNK_SIZE,
            regions: regions_of(&ram_regions(mem)),
            crc32: vec![0; usize::try_from(mem.div_ceil(CHUNK_SIZE)).unwrap_or(0)],
        },
    }
}
