//! The working-set file, `working-set.bin` in a snapshot directory: the pages a restored
//! guest touched first, in order, with when and how.
//!
//! ```text
//! offset  size        field (little-endian)
//! 0       8           magic "APFVMWS\0"
//! 8       4           format version (1)
//! 12      4           bytes per entry (16)
//! 16      8           snapshot id: snapshot_id() of the manifest's memory it was recorded on
//! 24      8           entry count N
//! 32      16 × N      entries: gpa u64 (page aligned), t_us u32 (since the first
//!                     instruction), touch u8 (Touch), 3 zero bytes
//! 32+16N  4           CRC-32 (crc32fast) of every byte before it
//! ```
//! Written atomically (temporary file, fsync, rename, fsync of the directory). Reading checks
//! the length, magic, version, checksum, snapshot id and every entry (page aligned, in guest
//! RAM, a known touch), and says which check failed ([`WorkingSetError`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::snapshot::memory_file::MemoryInfo;

/// The file's name in a snapshot directory.
pub const FILE_NAME: &str = "working-set.bin";
/// First bytes of the file.
pub const MAGIC: [u8; 8] = *b"APFVMWS\0";
/// The format version written and read.
pub const VERSION: u32 = 1;
const HEADER: usize = 32;
const ENTRY: usize = 16;
const ENTRY_U32: u32 = 16;
const TRAILER: usize = 4;
const PAGE: u64 = 4096;

/// How a page was first touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Touch {
    /// By the VMM itself (a thread that is no vCPU: the APF area, boot data): needed before
    /// the first instruction.
    Vmm = 0,
    /// By a vCPU that had not run at CPL 3 since the restore (the CPL of the access itself
    /// was not learned).
    BeforeUser = 1,
    /// By a vCPU at CPL 0: such a fault cannot become an APF.
    Kernel = 2,
    /// By a vCPU at CPL 3: it can become an APF.
    User = 3,
    /// By a vCPU already seen at CPL 3, the CPL of this access not learned (the page arrived
    /// before the vCPU could be asked): streamed like a CPL 3 page.
    Unknown = 4,
}

impl Touch {
    /// Loaded before the first instruction on replay.
    pub fn must_have(self) -> bool {
        matches!(self, Touch::Vmm | Touch::BeforeUser | Touch::Kernel)
    }

    fn from_u8(b: u8) -> Option<Touch> {
        Some(match b {
            0 => Touch::Vmm,
            1 => Touch::BeforeUser,
            2 => Touch::Kernel,
            3 => Touch::User,
            4 => Touch::Unknown,
            _ => return None,
        })
    }
}

/// One page of the working set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its first guest-physical byte.
    pub gpa: u64,
    /// First touched this long after the first instruction, µs.
    pub t_us: u32,
    /// How.
    pub touch: Touch,
}

/// A working set: the ordered first touches of a restored guest, for one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingSet {
    /// [`snapshot_id`] of the snapshot it belongs to.
    pub snapshot_id: u64,
    /// In the order the pages were first touched.
    pub entries: Vec<Entry>,
}

/// Why a working-set file was not used.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// It could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        err: std::io::Error,
    },
    /// Shorter than its header and checksum, or than its entry count says.
    #[error("truncated: {len} bytes, {need} expected")]
    Truncated {
        /// Bytes found.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a working-set file.
    #[error("not a working-set file (bad magic)")]
    BadMagic,
    /// Another format version.
    #[error(
        "format version {found} (entries of {entry} bytes); this apfvm reads version {VERSION}"
    )]
    Version {
        /// The version in the file.
        found: u32,
        /// Its entry size.
        entry: u32,
    },
    /// The checksum does not match: the file is corrupt.
    #[error("corrupt: checksum {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// In the file.
        stored: u32,
        /// Of its bytes.
        computed: u32,
    },
    /// Recorded on another snapshot.
    #[error("recorded for another snapshot (id {file:#018x}, this snapshot's {snapshot:#018x})")]
    OtherSnapshot {
        /// The id in the file.
        file: u64,
        /// This snapshot's.
        snapshot: u64,
    },
    /// An entry names a page outside guest RAM (or not page aligned, or an unknown touch).
    #[error("entry {index}: {why}")]
    BadEntry {
        /// Its index.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
}

/// The identity of a snapshot's memory: FNV-1a (64 bits) over its size, chunk size, RAM
/// regions and every chunk's CRC-32. Two snapshots with the same memory contents and layout
/// have the same id (a working set fits both).
pub fn snapshot_id(memory: &MemoryInfo) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(memory.size);
    eat(memory.chunk_size);
    for r in &memory.regions {
        eat(r.gpa);
        eat(r.size);
        eat(r.file_offset);
    }
    for &c in &memory.crc32 {
        eat(u64::from(c));
    }
    h
}

/// True when `[gpa, gpa + 4096)` lies in one of `memory`'s RAM regions.
fn in_ram(memory: &MemoryInfo, gpa: u64) -> bool {
    memory
        .regions
        .iter()
        .any(|r| gpa >= r.gpa && gpa.saturating_add(PAGE) <= r.gpa + r.size)
}

impl WorkingSet {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + ENTRY * self.entries.len() + TRAILER);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&ENTRY_U32.to_le_bytes());
        b.extend_from_slice(&self.snapshot_id.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.gpa.to_le_bytes());
            b.extend_from_slice(&e.t_us.to_le_bytes());
            b.extend_from_slice(&[e.touch as u8, 0, 0, 0]);
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks `bytes` against the snapshot whose memory is `memory`.
    pub fn decode(bytes: &[u8], memory: &MemoryInfo) -> Result<WorkingSet, WorkingSetError> {
        let truncated = |need| WorkingSetError::Truncated {
            len: bytes.len(),
            need,
        };
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(if bytes.len() < MAGIC.len() {
                truncated(HEADER + TRAILER)
            } else {
                WorkingSetError::BadMagic
            });
        }
        if bytes.len() < HEADER + TRAILER {
            return Err(truncated(HEADER + TRAILER));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        let (version, entry) = (u32_at(8), u32_at(12));
        if version != VERSION || entry as usize != ENTRY {
            return Err(WorkingSetError::Version {
                found: version,
                entry,
            });
        }
        let count = usize::try_from(u64_at(24)).unwrap_or(usize::MAX);
        let need = count
            .checked_mul(ENTRY)
            .and_then(|n| n.checked_add(HEADER + TRAILER))
            .unwrap_or(usize::MAX);
        if bytes.len() < need {
            return Err(truncated(need));
        }
        let body = &bytes[..need - TRAILER];
        let stored = u32_at(need - TRAILER);
        let computed = crc32fast::hash(body);
        if stored != computed || bytes.len() != need {
            return Err(WorkingSetError::Checksum { stored, computed });
        }
        let id = u64_at(16);
        let snapshot = snapshot_id(memory);
        if id != snapshot {
            return Err(WorkingSetError::OtherSnapshot { file: id, snapshot });
        }
        let entries = (0..count)
            .map(|index| {
                let o = HEADER + index * ENTRY;
                let (gpa, t_us, touch) = (u64_at(o), u32_at(o + 8), bytes[o + 12]);
                let bad = |why: String| WorkingSetError::BadEntry { index, why };
                let touch = Touch::from_u8(touch).ok_or_else(|| bad(format!("touch {touch}")))?;
                if gpa % PAGE != 0 || !in_ram(memory, gpa) {
                    return Err(bad(format!("page {gpa:#x} is not a page of guest RAM")));
                }
                Ok(Entry { gpa, t_us, touch })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WorkingSet {
            snapshot_id: id,
            entries,
        })
    }

    /// Reads the working set of the snapshot in `dir` whose memory is `memory`: `Ok(None)`
    /// when it has none.
    pub fn read(dir: &Path, memory: &MemoryInfo) -> Result<Option<WorkingSet>, WorkingSetError> {
        let path = dir.join(FILE_NAME);
        match fs::read(&path) {
            Ok(bytes) => WorkingSet::decode(&bytes, memory).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(WorkingSetError::Io { path, err }),
        }
    }

    /// Writes it into `dir` atomically (replacing one there).
    pub fn write(&self, dir: &Path) -> Result<(), WorkingSetError> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!(".{FILE_NAME}.tmp-{}", std::process::id()));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |err| WorkingSetError::Io { path: p, err }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let written = f.write_all(&self.encode()).and_then(|()| f.sync_all());
        drop(f);
        if let Err(err) = written.and_then(|()| fs::rename(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            return Err(WorkingSetError::Io { path, err });
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    }

    /// Checks that `dir` takes a new file (a working set can be recorded into it): creates
    /// and removes a probe file.
    pub fn check_writable(dir: &Path) -> Result<(), WorkingSetError> {
        let probe = dir.join(format!(".{FILE_NAME}.probe-{}", std::process::id()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map_err(|err| WorkingSetError::Io {
                path: dir.to_path_buf(),
                err,
            })?;
        fs::remove_file(&probe).map_err(|err| WorkingSetError::Io { path: probe, err })
    }
}
