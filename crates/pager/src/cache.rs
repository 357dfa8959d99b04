//! The shared page cache of clones: one memfd (shmem file) holding guest page `p` at file
//! offset `p * 4096`, up to the end of guest RAM (sparse: a gap in RAM, such as the MMIO
//! hole, is never written and takes no memory), written once per fetched chunk.
//!
//! Each clone maps it **private** (copy on write) and registers its mapping with its own
//! userfaultfd in MISSING mode, which shmem supports: a clone's access to a page the file
//! does not hold yet raises a missing fault; once the pager has written the chunk into the
//! file (`pwrite`) and woken the clones' waiters (UFFDIO_WAKE), the retried access maps the
//! file's page — read, it is shared with every clone; written, the clone gets its own copy.
//!
//! Two ways to break that, both checked or avoided here:
//! - **Huge pages in shmem.** With shmem THP `always`/`within_size`/`force`, writing one
//!   chunk may allocate a 2 MiB folio that makes its neighbours "present" as zeros: clones
//!   would read zeros instead of faulting. [`PageCache::new`] refuses such a host.
//! - **A hole touched without the userfaultfd.** Once a clone's userfaultfd is closed, its
//!   access to a page the file lacks *allocates* a zero page in the file, for every clone.
//!   So the pager keeps every clone's userfaultfd open until it stops (after all clones).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use rustix::fs::{MemfdFlags, memfd_create};

/// Where the kernel says how shmem uses transparent huge pages.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
/// Per-size settings (`hugepages-<size>kB/shmem_enabled`) sit under this directory.
const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

/// Why a page cache cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// memfd_create or sizing it failed.
    #[error("creating the shared page cache (memfd of {len} bytes): {source}")]
    Create {
        /// Bytes asked for.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// shmem may use huge pages, which would turn a chunk's neighbours into zero pages.
    #[error(
        "the shared page cache needs shmem transparent huge pages off: {file} is {setting:?} \
         (a written chunk could make its neighbours present as zeros); set it to never or \
         advise (echo never > {file})"
    )]
    HugePages {
        /// The sysfs file.
        file: String,
        /// Its selected value.
        setting: String,
    },
}

/// The selected value of a sysfs THP setting: the bracketed word of
/// `always within_size advise [never] deny force`.
pub fn selected_setting(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

/// True when shmem THP setting `setting` (of the global file, or of a per-size file when
/// `per_size`) leaves a memfd that nobody madvises in base pages: `never`, `deny`, `advise`
/// (only VMAs with MADV_HUGEPAGE get huge pages, and writes through `pwrite` have none), and
/// for a size, `inherit` (the global setting decides, checked on its own).
pub fn thp_setting_allows_cache(setting: &str, per_size: bool) -> bool {
    matches!(setting, "never" | "deny" | "advise") || (per_size && setting == "inherit")
}

/// Checks the host's shmem THP settings (absent files: no THP, fine).
fn check_huge_pages() -> Result<(), CacheError> {
    let mut files = vec![(SHMEM_THP.to_string(), false)];
    if let Ok(dir) = std::fs::read_dir(THP_DIR) {
        for e in dir.flatten() {
            let p = e.path().join("shmem_enabled");
            if e.file_name().to_string_lossy().starts_with("hugepages-") && p.exists() {
                files.push((p.display().to_string(), true));
            }
        }
    }
    for (file, per_size) in files {
        let Ok(text) = std::fs::read_to_string(Path::new(&file)) else {
            continue;
        };
        if let Some(setting) = selected_setting(&text)
            && !thp_setting_allows_cache(setting, per_size)
        {
            return Err(CacheError::HugePages {
                file,
                setting: setting.to_string(),
            });
        }
    }
    Ok(())
}

/// The shared page cache: a memfd up to the end of guest RAM, guest page `p` at offset
/// `p * 4096`.
#[derive(Debug)]
pub struct PageCache {
    file: File,
    len: u64,
}

impl PageCache {
    /// A new, empty (sparse) cache of `len` bytes. Refused where shmem may use huge pages.
    pub fn new(len: u64) -> Result<PageCache, CacheError> {
        check_huge_pages()?;
        let create = |source: io::Error| CacheError::Create { len, source };
        let fd =
            memfd_create("apfvm-page-cache", MemfdFlags::CLOEXEC).map_err(|e| create(e.into()))?;
        let file = File::from(fd);
        file.set_len(len).map_err(create)?;
        Ok(PageCache { file, len })
    }

    /// The memfd, to map (privately) as a clone's guest RAM.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a cache of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `buf` at byte `offset` (guest-physical address = offset).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Bytes of host memory its pages take (written pages, mapped by a clone or not).
    pub fn resident_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_selected_thp_setting_and_judges_it() {
        let t = "always within_size advise [never] deny force\n";
        assert_eq!(selected_setting(t), Some("never"));
        assert_eq!(
            selected_setting("always [inherit] within_size advise never"),
            Some("inherit")
        );
        assert_eq!(selected_setting("no brackets"), None);
        for ok in ["never", "deny", "advise"] {
            assert!(thp_setting_allows_cache(ok, false), "{ok}");
        }
        for bad in ["always", "within_size", "force", "inherit"] {
            assert!(!thp_setting_allows_cache(bad, false), "{bad}");
        }
        assert!(thp_setting_allows_cache("inherit", true));
        assert!(!thp_setting_allows_cache("always", true));
    }

    #[test]
    fn a_cache_is_sparse_until_written() {
        let Ok(c) = PageCache::new(1 << 20) else {
            return; // a host with shmem huge pages: refused, tested by the error's text
        };
        assert_eq!(c.len(), 1 << 20);
        assert_eq!(c.resident_bytes().unwrap(), 0);
        c.write_at(8192, &[7u8; 4096]).unwrap();
        assert_eq!(c.resident_bytes().unwrap(), 4096);
        let mut b = [0u8; 4];
        c.file().read_exact_at(&mut b, 8192).unwrap();
        assert_eq!(b, [7; 4]);
    }
}
