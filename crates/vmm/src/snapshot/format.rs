//! The on-disk snapshot: a directory holding `manifest.json` and `memory.raw`.
//!
//! ```text
//! DIR/manifest.json   versioned JSON (serde): format, config, per-vCPU and VM state, the
//!                     apf-host engine's saved MSRs, and one CRC-32 per memory chunk
//! DIR/memory.raw      guest RAM region by region, back to back (the MMIO hole is not
//!                     stored), raw: see [`super::memory_file`]
//! ```
//!
//! Written atomically ([`super::write::write_atomically`]); a leftover `*.tmp-*` is never
//! read. [`Snapshot::open`] refuses anything it cannot vouch for: missing
//! or unparsable manifest, another magic or format version, a memory file of the wrong size,
//! a chunk table that does not cover the memory, regions that are not the guest's RAM.
//! A format 1 manifest (one region `[0, mem_size)`, no `regions` field) is read as the
//! format 2 manifest it implies. Chunk contents are checked when read
//! (eager restore: all before the guest starts; lazy restore: each chunk before its first page
//! is served).

use std::fs;
use std::path::{Path, PathBuf};

use apf_host::SavedState;
use guest_abi::TaskSpec;
use kvm_bindings::{kvm_irqchip, kvm_lapic_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs};
use serde::{Deserialize, Serialize};

use crate::config::{ApfMode, HaltMode};

pub use super::memory_file::{ChunkHasher, MemoryInfo, MemoryRegion};

/// `manifest.json`'s `magic`.
pub const MAGIC: &str = "apfvm-snapshot";
/// The format this build writes. Bump on any change. 2: the memory file holds RAM regions
/// back to back (`memory.regions`), so guests above the MMIO hole can be saved.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build reads: 1, a memory file of `[0, mem_size)`.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Bytes covered by one checksum: 64 KiB (16 pages), small enough that a lazy restore
/// verifies little more than the page it serves.
pub const CHUNK_SIZE: u64 = 64 << 10;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The memory file's name.
pub const MEMORY: &str = "memory.raw";

/// Why a snapshot is refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O error on a named file.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
    /// The manifest is missing, unparsable or inconsistent.
    #[error("{path}: not a valid apfvm snapshot manifest: {why}")]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A format this build does not read.
    #[error(
        "{path}: snapshot format version {found}, this apfvm reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
    )]
    Version {
        /// The manifest.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The memory file's size is not the manifest's.
    #[error(
        "{path}: memory file is {found} bytes, the manifest says {expected} (truncated or foreign file)"
    )]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Bytes found.
        found: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// Writing was interrupted (SIGINT, SIGTERM): the temporary directory is removed.
    #[error("{path}: interrupted while writing; nothing was left behind")]
    Interrupted {
        /// The snapshot directory that was not written.
        path: PathBuf,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// One task of the saved workload (guest-abi `TaskSpec`, serializable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTask {
    /// `TaskKind` as u32.
    pub kind: u32,
    /// vCPU.
    pub cpu: u32,
    /// Flags.
    pub flags: u32,
    /// Arguments.
    pub arg0: u64,
    /// Arguments.
    pub arg1: u64,
    /// Arguments.
    pub arg2: u64,
}

impl From<&TaskSpec> for SavedTask {
    fn from(t: &TaskSpec) -> SavedTask {
        SavedTask {
            kind: t.kind,
            cpu: t.cpu,
            flags: t.flags,
            arg0: t.arg0,
            arg1: t.arg1,
            arg2: t.arg2,
        }
    }
}

impl From<&SavedTask> for TaskSpec {
    fn from(t: &SavedTask) -> TaskSpec {
        TaskSpec {
            kind: t.kind,
            cpu: t.cpu,
            flags: t.flags,
            reserved: 0,
            arg0: t.arg0,
            arg1: t.arg1,
            arg2: t.arg2,
        }
    }
}

/// The machine the guest booted on: what a restore must recreate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes of RAM.
    pub mem_size: u64,
    /// The APF protocol offered at boot (CPUID); a restore offers the same.
    pub apf: ApfMode,
    /// `hlt` handling at boot (informative: a restore picks its own).
    pub halt: HaltMode,
    /// Scheduler quantum given to the guest.
    pub quantum_us: u32,
    /// The workload, as booted (for the report's checksum verification).
    pub tasks: Vec<SavedTask>,
    /// TSC frequency the guest was told (kHz).
    pub tsc_khz: u32,
}

/// One MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMsr {
    /// Index.
    pub index: u32,
    /// Value.
    pub value: u64,
}

/// The state of one vCPU, as KVM reports it after every pending instruction completed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVcpuState {
    /// vCPU index (= APIC id).
    pub index: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers (EFER, APIC base, CR0..4, CR8).
    pub sregs: kvm_sregs,
    /// FPU/SSE/extended state: `kvm_xsave.region` (the guest uses none, but it is cheap).
    pub xsave: Option<Vec<u32>>,
    /// XCR0.
    pub xcrs: Option<kvm_xcrs>,
    /// Pending/injected exceptions, interrupts, NMI, shadow (with exception payload).
    pub events: kvm_vcpu_events,
    /// The in-kernel LAPIC's registers.
    pub lapic: kvm_lapic_state,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// MSRs KVM handles itself ([`crate::kvm::vcpu_setup::SAVED_MSRS`], those KVM could read).
    pub msrs: Vec<SavedMsr>,
}

/// VM-wide device state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVmState {
    /// `KVM_GET_IRQCHIP` of the PIC master, PIC slave and IOAPIC, from snapshots of builds
    /// that emulated them in the kernel; empty since the VM uses the split irqchip (LAPICs
    /// in the kernel, no PIC, IOAPIC or PIT; the LAPICs travel with their vCPUs). Read and
    /// ignored on restore: the guest uses neither.
    pub irqchips: Vec<kvm_irqchip>,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// What asked for the snapshot: `guest tag N`, `--at`, `SIGUSR1`.
    pub trigger: String,
    /// The machine.
    pub config: SavedConfig,
    /// Per vCPU, in index order.
    pub vcpus: Vec<SavedVcpuState>,
    /// Devices.
    pub vm: SavedVmState,
    /// The APF MSRs per vCPU (apf-host `Engine::save`); in-flight faults are not saved.
    pub engine: SavedState,
    /// Guest RAM.
    pub memory: MemoryInfo,
}

impl Manifest {
    /// Parses and checks the bytes of a `manifest.json` exactly as [`Snapshot::open_manifest`]
    /// does (magic, format version, schema, consistency); errors name the file
    /// `manifest.json`. The fuzz target `fuzz/fuzz_targets/manifest.rs` feeds it arbitrary
    /// bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
        Manifest::parse(bytes, Path::new(MANIFEST))
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<Manifest, SnapshotError> {
        let bad = |why: String| SnapshotError::BadManifest {
            path: path.to_path_buf(),
            why,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if value.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
            return Err(bad(format!("magic is not {MAGIC:?}")));
        }
        let found = value
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&found) {
            return Err(SnapshotError::Version {
                path: path.to_path_buf(),
                found,
            });
        }
        check_state_sizes(&value).map_err(bad)?;
        let mut manifest: Manifest =
            serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if found == 1 {
            // Format 1: guest RAM [0, mem_size) is the whole file; read as format 2.
            if !manifest.memory.regions.is_empty() {
                return Err(bad(
                    "memory.regions in a format 1 manifest (a format 2 field)".into(),
                ));
            }
            manifest.memory.regions = vec![MemoryRegion {
                gpa: 0,
                size: manifest.memory.size,
                file_offset: 0,
            }];
            manifest.format = FORMAT_VERSION;
        }
        manifest.check().map_err(bad)?;
        Ok(manifest)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.config.vcpus == 0 || self.vcpus.len() != self.config.vcpus as usize {
            return Err(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.config.vcpus
            ));
        }
        if self.engine.vcpus.len() != self.vcpus.len() {
            return Err("engine state does not match the vCPU count".into());
        }
        // Restore creates vCPU `index` and indexes its per-vCPU tables with it (a fuzz find:
        // an index past the count panicked the vCPU thread).
        let misplaced = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, s)| s.index as usize != *i);
        if let Some((i, s)) = misplaced {
            return Err(format!(
                "vCPU state {i} has index {} (states are saved in index order)",
                s.index
            ));
        }
        self.memory.check(self.config.mem_size)?;
        if !matches!(self.vm.irqchips.len(), 0 | 3) {
            return Err(format!(
                "{} irqchip states: none (split irqchip) or PIC master, PIC slave and IOAPIC",
                self.vm.irqchips.len()
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            runnable(v).map_err(|why| format!("vCPU {i}: {why}"))?;
        }
        Ok(())
    }
}

/// KVM's state structures travel as byte arrays (kvm-bindings' serde), and a short array is
/// zero-padded when read: a `lapic` of no bytes would load a LAPIC of zeros (a guest that
/// then waits forever), registers cut short would run the guest into a crash. Every array
/// must hold exactly its structure's bytes.
fn check_state_sizes(value: &serde_json::Value) -> Result<(), String> {
    fn len_of(v: &serde_json::Value) -> Option<usize> {
        v.as_array().map(Vec::len)
    }
    let fields: [(&str, usize, bool); 5] = [
        ("regs", size_of::<kvm_regs>(), true),
        ("sregs", size_of::<kvm_sregs>(), true),
        ("events", size_of::<kvm_vcpu_events>(), true),
        ("lapic", size_of::<kvm_lapic_state>(), true),
        ("xcrs", size_of::<kvm_xcrs>(), false),
    ];
    for (i, v) in value
        .get("vcpus")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        for (name, size, required) in fields {
            match v.get(name) {
                None | Some(serde_json::Value::Null) if !required => {}
                Some(field) if len_of(field) == Some(size) => {}
                Some(field) if len_of(field).is_some() => {
                    return Err(format!(
                        "vCPU {i}: {name} holds {} bytes, KVM's structure has {size}",
                        len_of(field).unwrap_or(0)
                    ));
                }
                _ => return Err(format!("vCPU {i}: {name} is missing or not a byte array")),
            }
        }
    }
    let chips = value
        .pointer("/vm/irqchips")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten();
    for (i, chip) in chips.enumerate() {
        let size = size_of::<kvm_irqchip>();
        if len_of(chip) != Some(size) {
            return Err(format!(
                "irqchip {i} holds {} bytes, KVM's structure has {size}",
                len_of(chip).unwrap_or(0)
            ));
        }
    }
    Ok(())
}

/// A vCPU state a restore can run: runnable, or halted with interrupts enabled (an interrupt
/// can wake it). Any other MP state (an AP waiting for INIT/SIPI, a vCPU halted with IF = 0)
/// would never run again.
fn runnable(v: &SavedVcpuState) -> Result<(), String> {
    use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};
    let interrupts_enabled = v.regs.rflags & (1 << 9) != 0;
    match v.mp_state {
        KVM_MP_STATE_RUNNABLE => Ok(()),
        KVM_MP_STATE_HALTED if interrupts_enabled => Ok(()),
        KVM_MP_STATE_HALTED => Err("halted with interrupts disabled: nothing could wake it".into()),
        other => Err(format!(
            "MP state {other} (a restore runs only RUNNABLE (0) or HALTED (3) vCPUs)"
        )),
    }
}

/// A snapshot directory that passed [`Snapshot::open`]'s checks.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Snapshot {
    /// Opens and checks `dir` (manifest, version, memory file size). Memory contents are
    /// verified as they are read.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let snap = Self::open_manifest(dir)?;
        let mem = snap.memory_path();
        let found = fs::metadata(&mem).map_err(io(&mem))?.len();
        if found != snap.manifest.memory.size {
            return Err(SnapshotError::MemorySize {
                path: mem,
                found,
                expected: snap.manifest.memory.size,
            });
        }
        Ok(snap)
    }

    /// Like [`Snapshot::open`] without the memory file (its memory is served by another
    /// source, e.g. an NBD server: `restore --memory-source`).
    pub fn open_manifest(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let manifest = Manifest::parse(text.as_bytes(), &path)?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.memory.file)
    }
}
