//! Writing a snapshot atomically: everything goes into a fresh `DIR.tmp-PID-N` next to
//! `DIR`, each file is fsynced, then the temporary directory is fsynced, renamed to `DIR`
//! and the parent fsynced. A crash leaves either no `DIR` or a complete one; the temporary
//! directories of writers that no longer exist are removed by the next snapshot written
//! into the same parent.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::format::{MANIFEST, MEMORY, Manifest, SnapshotError, io};

/// What a temporary snapshot directory's name holds between the snapshot's name and
/// `PID-N`.
const TMP_INFIX: &str = ".tmp-";

/// The process id in the name of a temporary snapshot directory (`NAME.tmp-PID-N`).
fn temporary_owner(file_name: &str) -> Option<u32> {
    let (_, rest) = file_name.rsplit_once(TMP_INFIX)?;
    let (pid, seq) = rest.split_once('-')?;
    seq.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Removes the temporary snapshot directories in `parent` left by processes that no longer
/// exist (killed while writing, even by SIGKILL), and says so. Only directories holding
/// nothing but a snapshot's files are touched.
fn remove_stale_temporaries(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temporary_owner(&name) else {
            continue;
        };
        let path = e.path();
        let ours = fs::read_dir(&path).is_ok_and(|d| {
            d.flatten()
                .all(|f| f.file_name() == MEMORY || f.file_name() == MANIFEST)
        });
        if !ours || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => tracing::warn!(
                "removed {}: a temporary snapshot directory left by process {pid}, which no longer exists",
                path.display()
            ),
            Err(err) => tracing::warn!(
                "cannot remove the stale temporary snapshot directory {}: {err}",
                path.display()
            ),
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes a snapshot to `dir` atomically. `write_memory` receives the open memory file and
/// returns the chunk checksums of what it wrote (a [`super::format::ChunkHasher`]'s). `dir` must not exist.
pub fn write_atomically(
    dir: &Path,
    mut manifest: Manifest,
    write_memory: impl FnOnce(&mut File) -> Result<Vec<u32>, SnapshotError>,
) -> Result<(), SnapshotError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    if dir.exists() {
        return Err(SnapshotError::Io {
            path: dir.to_path_buf(),
            err: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; apfvm never overwrites a snapshot",
            ),
        });
    }
    let name = dir
        .file_name()
        .ok_or_else(|| SnapshotError::Io {
            path: dir.to_path_buf(),
            err: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no directory name"),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    remove_stale_temporaries(&parent);
    let tmp = parent.join(format!(
        "{name}{TMP_INFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        let mem_path = tmp.join(MEMORY);
        let mut mem = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&mem_path)
            .map_err(io(&mem_path))?;
        manifest.memory.crc32 = write_memory(&mut mem)?;
        mem.sync_all().map_err(io(&mem_path))?;
        drop(mem);
        manifest.memory.file = MEMORY.into();
        manifest.check().map_err(|why| SnapshotError::BadManifest {
            path: tmp.join(MANIFEST),
            why,
        })?;
        let man_path = tmp.join(MANIFEST);
        let json = serde_json::to_vec(&manifest).map_err(|e| SnapshotError::BadManifest {
            path: man_path.clone(),
            why: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&man_path)
            .map_err(io(&man_path))?;
        f.write_all(&json).map_err(io(&man_path))?;
        f.sync_all().map_err(io(&man_path))?;
        fsync_dir(&tmp)?;
        fs::rename(&tmp, dir).map_err(io(dir))?;
        fsync_dir(&parent)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_carry_their_owner() {
        assert_eq!(temporary_owner("snap.tmp-1234-0"), Some(1234));
        assert_eq!(temporary_owner("my.tmp-dir.tmp-77-3"), Some(77));
        assert_eq!(temporary_owner("snap.tmp-x-0"), None);
        assert_eq!(temporary_owner("snap"), None);
        assert_eq!(temporary_owner("snap.tmp-12"), None);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept() {
        let parent = tempfile::tempdir().unwrap();
        // A process id that cannot exist (above the kernel's maximum).
        let dead = parent.path().join("a.tmp-4194305-0");
        let live = parent
            .path()
            .join(format!("b.tmp-{}-0", std::process::id()));
        let foreign = parent.path().join("c.tmp-4194305-1");
        for d in [&dead, &live, &foreign] {
            fs::create_dir(d).unwrap();
        }
        fs::write(dead.join(MEMORY), b"x").unwrap();
        fs::write(foreign.join("notes.txt"), b"mine").unwrap();
        remove_stale_temporaries(parent.path());
        assert!(!dead.exists(), "a dead writer's directory is removed");
        assert!(live.exists(), "a running writer's directory is kept");
        assert!(
            foreign.exists(),
            "a directory holding other files is never touched"
        );
    }
}
