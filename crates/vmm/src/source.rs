//! Where a snapshot's guest memory is read from: its memory file, or an NBD export of it.
//! Either way every chunk is verified against the manifest's checksum before it reaches
//! guest RAM.

use std::sync::Arc;
use std::time::Duration;

use pager::{
    FileSource, NbdSource, NbdSourceConfig, NbdUrl, PageSource, PagerConfig, VerifiedSource,
};

use crate::error::{Result, VmmError};
use crate::snapshot::format::Snapshot;

/// Where guest memory comes from (`restore --memory-source`, `--source-deadline`).
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// An NBD export of the snapshot's memory file; `None`: the snapshot's own memory file.
    pub nbd: Option<NbdUrl>,
    /// A server unreachable this long ends the VM with an error.
    pub deadline: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            nbd: None,
            deadline: Duration::from_secs(10),
        }
    }
}

/// The snapshot's memory as a page source, every chunk verified against the manifest: its
/// memory file, or the NBD export `opts.nbd` (whose size must be the snapshot's memory size).
pub fn open(snapshot: &Snapshot, opts: &SourceOptions) -> Result<Arc<dyn PageSource>> {
    let m = &snapshot.manifest.memory;
    let chunk = usize::try_from(m.chunk_size).unwrap_or(0);
    let inner: Box<dyn PageSource> = match &opts.nbd {
        None => {
            let path = snapshot.memory_path();
            Box::new(
                FileSource::open(&path)
                    .map_err(|e| VmmError::source(path.display().to_string(), e))?,
            )
        }
        Some(url) => {
            let mut cfg = NbdSourceConfig {
                deadline: opts.deadline,
                max_connections: PagerConfig::DEFAULT_FETCH_THREADS,
                ..NbdSourceConfig::default()
            };
            // A server that stops answering counts as gone after this long (then reconnects).
            cfg.client.io_timeout =
                Some((opts.deadline / 2).clamp(Duration::from_millis(100), Duration::from_secs(2)));
            let nbd = NbdSource::connect(url.clone(), cfg)
                .map_err(|e| VmmError::source(url.to_string(), e))?;
            if nbd.size() != m.size {
                return Err(VmmError::source(
                    url.to_string(),
                    format!(
                        "the export has {} bytes, the snapshot's memory {} (another file is served?)",
                        nbd.size(),
                        m.size
                    ),
                ));
            }
            Box::new(nbd)
        }
    };
    let name = inner.describe();
    Ok(Arc::new(
        VerifiedSource::new(inner, chunk, m.crc32.clone())
            .map_err(|e| VmmError::source(name, e))?,
    ))
}
