//! Taking a snapshot of a paused VM: every vCPU has left `KVM_RUN` with its last instruction
//! completed ([`super::vcpu_loop::VcpuEnd::Paused`]), so registers, events, LAPICs, the
//! interrupt controllers and memory are one consistent picture.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use apf_host::SavedState;

use crate::config::VmConfig;
use crate::error::Result;
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm::Vm;
use crate::snapshot::format::{
    self, CHUNK_SIZE, FORMAT_VERSION, MAGIC, Manifest, SavedConfig, SavedTask, SavedVmState,
    SnapshotError,
};
use crate::snapshot::memory_file::{self, ChunkHasher, MemoryInfo};
use crate::snapshot::write::write_atomically;

/// The paused VM a snapshot is taken of.
#[derive(Debug)]
pub struct Paused<'a> {
    /// What it is.
    pub config: &'a VmConfig,
    /// TSC frequency the guest was told.
    pub tsc_khz: u32,
    /// Its vCPUs, every instruction completed.
    pub vcpus: &'a [Vcpu],
    /// The VM.
    pub vm: &'a Vm,
    /// The APF MSRs of every vCPU.
    pub apf: SavedState,
}

/// Bytes copied per read of guest memory while writing the memory file.
const COPY_BLOCK: usize = 1 << 20;

/// Writes the snapshot of the paused VM into `out` (atomically); `trigger` says what asked
/// for it; guest memory is read through `read` (a lazily restored VM reads the pages it never
/// fetched from its source instead of faulting them in). `interrupted` is asked between
/// blocks: when it says yes, the snapshot is abandoned and nothing is left behind. Returns
/// the memory bytes written.
///
/// The memory file holds the RAM regions back to back ([`memory_file::regions_of`]); blocks
/// of zeros are left as holes (a big guest's untouched memory costs no disk).
pub fn take(
    out: &Path,
    trigger: &str,
    vm: &Paused<'_>,
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    interrupted: &dyn Fn() -> bool,
) -> Result<u64> {
    let cfg = vm.config;
    let tsc_khz = vm.tsc_khz;
    let states = vm
        .vcpus
        .iter()
        .map(Vcpu::save_state)
        .collect::<Result<Vec<_>>>()?;
    let ram = vm.vm.ram();
    let manifest = Manifest {
        magic: MAGIC.into(),
        format: FORMAT_VERSION,
        trigger: trigger.into(),
        config: SavedConfig {
            vcpus: cfg.vcpus,
            mem_size: cfg.mem_size,
            apf: cfg.apf,
            halt: cfg.halt,
            quantum_us: cfg.quantum_us,
            tasks: cfg.tasks.iter().map(SavedTask::from).collect(),
            tsc_khz,
        },
        vcpus: states,
        vm: SavedVmState {
            irqchips: Vec::new(),
        },
        engine: vm.apf.clone(),
        memory: MemoryInfo {
            file: format::MEMORY.into(),
            size: ram.size(),
            chunk_size: CHUNK_SIZE,
            regions: memory_file::regions_of(ram.regions()),
            crc32: Vec::new(),
        },
    };
    let io_err = |err| SnapshotError::Io {
        path: out.join(format::MEMORY),
        err,
    };
    write_atomically(out, manifest, |file| {
        let mut hasher = ChunkHasher::new(CHUNK_SIZE);
        let mut buf = vec![0u8; COPY_BLOCK];
        let mut written = 0u64;
        for region in ram.regions() {
            let mut gpa = region.start;
            while gpa < region.end {
                if interrupted() {
                    return Err(SnapshotError::Interrupted {
                        path: out.to_path_buf(),
                    });
                }
                let n = usize::try_from((region.end - gpa).min(COPY_BLOCK as u64)).unwrap_or(0);
                read(gpa, &mut buf[..n]).map_err(|e| SnapshotError::Io {
                    path: out.to_path_buf(),
                    err: std::io::Error::other(e.to_string()),
                })?;
                hasher.update(&buf[..n]);
                if crate::memory::is_zero(&buf[..n]) {
                    file.seek(SeekFrom::Current(i64::try_from(n).unwrap_or(i64::MAX)))
                        .map_err(io_err)?;
                } else {
                    file.write_all(&buf[..n]).map_err(io_err)?;
                }
                gpa += n as u64;
                written += n as u64;
            }
        }
        // A trailing hole: the file's length says where it ends.
        file.set_len(written).map_err(io_err)?;
        Ok(hasher.finish())
    })?;
    tracing::info!(dir = %out.display(), trigger, "snapshot written");
    Ok(ram.size())
}
