//! Taking a snapshot of a paused VM: every vCPU has left `KVM_RUN` with its last instruction
//! completed ([`crate::vcpu_loop::VcpuEnd::Paused`]), so registers, events, LAPICs, the
//! interrupt controllers and memory are one consistent picture.

use std::io::Write;
use std::path::Path;

use kvm_ioctls::VmFd;

use crate::config::VmConfig;
use crate::error::{Result, VmmError};
use crate::kvm::vcpu::Vcpu;
use crate::kvm::vm;
use crate::memory::GuestRam;
use crate::snapshot::format::{
    self, CHUNK_SIZE, ChunkHasher, FORMAT_VERSION, MAGIC, Manifest, MemoryInfo, SavedConfig,
    SavedTask, SavedVmState, SnapshotError,
};
use crate::vcpu_loop::Shared;

impl From<SnapshotError> for VmmError {
    fn from(e: SnapshotError) -> VmmError {
        VmmError::Snapshot(Box::new(e))
    }
}

/// Reads guest memory for a snapshot in place of `GuestRam::read` (a lazy restore reads the
/// pages it never fetched from its own snapshot file instead of faulting them in).
pub type CaptureHook = Box<dyn Fn(u64, &mut [u8]) -> Result<()>>;

/// Bytes copied per read of guest memory while writing the memory file.
const COPY_BLOCK: usize = 1 << 20;

/// Writes the snapshot of the paused VM into `out` (atomically). Returns the memory bytes
/// written.
#[allow(clippy::too_many_arguments)]
pub fn take(
    out: &Path,
    cfg: &VmConfig,
    tsc_khz: u32,
    trigger: &str,
    vcpus: &[Vcpu],
    vm_fd: &VmFd,
    ram: &GuestRam,
    shared: &Shared,
    capture: Option<&CaptureHook>,
) -> Result<u64> {
    let states = vcpus
        .iter()
        .map(Vcpu::save_state)
        .collect::<Result<Vec<_>>>()?;
    let irqchips = vm::get_irqchips(vm_fd)?;
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
        vm: SavedVmState { irqchips },
        engine: shared.apf.save(),
        memory: MemoryInfo {
            file: format::MEMORY.into(),
            size: ram.size(),
            chunk_size: CHUNK_SIZE,
            crc32: Vec::new(),
        },
    };
    let size = ram.size();
    format::write_atomically(out, manifest, |file| {
        let mut hasher = ChunkHasher::new(CHUNK_SIZE);
        let mut buf = vec![0u8; COPY_BLOCK];
        let mut gpa = 0u64;
        while gpa < size {
            let n = usize::try_from((size - gpa).min(COPY_BLOCK as u64)).unwrap_or(0);
            let read = match capture {
                Some(c) => c(gpa, &mut buf[..n]),
                None => ram.read(gpa, &mut buf[..n]),
            };
            read.map_err(|e| SnapshotError::Io {
                path: out.to_path_buf(),
                err: std::io::Error::other(e.to_string()),
            })?;
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(|err| SnapshotError::Io {
                path: out.join(format::MEMORY),
                err,
            })?;
            gpa += n as u64;
        }
        Ok(hasher.finish())
    })?;
    tracing::info!(dir = %out.display(), trigger, "snapshot written");
    Ok(size)
}
