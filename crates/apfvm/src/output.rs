//! Files apfvm writes its results to (`--json`, `--plot`): checked and opened before
//! anything runs, so that a path that cannot be written fails at once, not after the guest
//! ran; never inside a snapshot directory (one that holds a `manifest.json`, or the snapshot
//! being restored or written); an existing file is only replaced at the end, when there is
//! something to write.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use vmm::snapshot::format::MANIFEST;

/// An output file opened up front.
#[derive(Debug)]
pub struct ReportFile {
    option: &'static str,
    path: PathBuf,
    file: File,
    /// Created by [`ReportFile::create`]: removed again if nothing gets written.
    created: bool,
    written: bool,
}

/// `p` made absolute, with the part that exists resolved (symbolic links, `..`), the rest
/// appended as given.
fn resolve(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(mut found) = existing.canonicalize() {
            found.extend(rest.iter().rev());
            return found;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return abs,
        }
    }
}

impl ReportFile {
    /// Checks `path` (given as `option`) and opens it for writing without truncating it.
    /// `snapshots` are the snapshot directories this command reads or writes (they may not
    /// exist yet): nothing is written inside them.
    pub fn create(
        option: &'static str,
        path: &Path,
        snapshots: &[&Path],
    ) -> anyhow::Result<ReportFile> {
        let shown = path.display();
        let target = resolve(path);
        if target.is_dir() {
            bail!("{option} {shown}: is a directory");
        }
        for dir in snapshots {
            if target.starts_with(resolve(dir)) {
                bail!(
                    "{option} {shown}: inside the snapshot directory {}; apfvm never writes into a snapshot",
                    dir.display()
                );
            }
        }
        let parent = target.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            bail!(
                "{option} {shown}: the directory {} does not exist",
                parent.display()
            );
        }
        if parent.join(MANIFEST).exists() {
            bail!(
                "{option} {shown}: {} is a snapshot directory (it holds {MANIFEST}); apfvm never writes into a snapshot",
                parent.display()
            );
        }
        let created = !target.exists();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)
            .with_context(|| format!("{option} {shown}: cannot be written"))?;
        Ok(ReportFile {
            option,
            path: path.to_path_buf(),
            file,
            created,
            written: false,
        })
    }

    /// Where it is, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's content with `bytes`.
    pub fn write(mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let what = || format!("{} {}: writing", self.option, self.path.display());
        // A regular file is replaced; a pipe or a device (/dev/stdout) is written to.
        if self.file.metadata().with_context(what)?.is_file() {
            self.file.set_len(0).with_context(what)?;
            self.file.seek(SeekFrom::Start(0)).with_context(what)?;
        }
        self.file.write_all(bytes).with_context(what)?;
        self.file.flush().with_context(what)?;
        self.written = true;
        Ok(())
    }

    /// Writes `value` as pretty JSON and a newline.
    pub fn write_json(self, value: &impl serde::Serialize) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(value).context("serializing the results")?;
        self.write((text + "\n").as_bytes())
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(resolve(&self.path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("apfvm-output-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_snapshot_directories_and_missing_ones() {
        let d = scratch("refuse");
        std::fs::create_dir(d.join("snap")).unwrap();
        std::fs::write(d.join("snap").join(MANIFEST), "{}").unwrap();
        let err = |p: &Path, snaps: &[&Path]| {
            ReportFile::create("--json", p, snaps)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&d.join("snap/manifest.json"), &[]).contains("snapshot directory"));
        assert!(err(&d.join("snap/r.json"), &[]).contains("snapshot directory"));
        assert!(err(&d.join("snap/../snap/r.json"), &[]).contains("snapshot directory"));
        // The snapshot a command is about to write, which does not exist yet.
        assert!(
            err(&d.join("new/r.json"), &[&d.join("new")]).contains("inside the snapshot directory")
        );
        assert!(err(&d.join("new"), &[&d.join("new")]).contains("inside the snapshot directory"));
        assert!(err(&d.join("missing/r.json"), &[]).contains("does not exist"));
        assert!(err(&d, &[]).contains("is a directory"));
        assert_eq!(
            std::fs::read_to_string(d.join("snap").join(MANIFEST)).unwrap(),
            "{}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn replaces_a_file_only_when_written_and_removes_one_it_created_for_nothing() {
        let d = scratch("replace");
        let old = d.join("old.json");
        std::fs::write(&old, "previous results, longer than the new ones").unwrap();
        let f = ReportFile::create("--json", &old, &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&old).unwrap(),
            "previous results, longer than the new ones"
        );
        f.write(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "new");
        drop(ReportFile::create("--json", &old, &[]).unwrap());
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "new");
        let fresh = d.join("fresh.json");
        drop(ReportFile::create("--json", &fresh, &[]).unwrap());
        assert!(!fresh.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
