//! SIGINT (Ctrl-C) and SIGTERM as a flag: an experiment stops after the run in progress, and
//! its temporary snapshots (and the `qemu-nbd` serving them) are removed on the way out. A
//! second signal while the flag is up ends the process at once (status 1).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::error::{Error, Result};

/// The flag SIGINT and SIGTERM raise (after [`catch`]), for a run to stop on
/// (`vmm::RunOptions::interrupt`).
pub fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(Arc::default)
}

/// Turns SIGINT and SIGTERM into the flag [`interrupted`] reads (once per process).
pub fn catch() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        for sig in [SIGINT, SIGTERM] {
            // The first signal raises the flag; a second one, with the flag up, exits.
            let registered =
                signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(flag()))
                    .and_then(|_| signal_hook::flag::register(sig, Arc::clone(flag())));
            if let Err(err) = registered {
                result = Err(Error::Io {
                    what: format!("catching signal {sig}"),
                    err,
                });
                return;
            }
        }
    });
    result
}

/// True once SIGINT or SIGTERM arrived (after [`catch`]).
pub fn interrupted() -> bool {
    flag().load(Ordering::SeqCst)
}

/// [`Error::Interrupted`] once a signal arrived.
pub fn check() -> Result<()> {
    if interrupted() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
