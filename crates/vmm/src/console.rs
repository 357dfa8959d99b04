//! The guest console (port 0xe9): every byte is kept for the report, and whole lines are
//! echoed to stdout as they complete (per vCPU, so vCPUs do not interleave mid-line).

use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// Console output of the whole VM.
#[derive(Debug, Default)]
pub struct Console {
    echo: bool,
    all: Mutex<Vec<u8>>,
}

impl Console {
    /// A console; `echo` copies lines to stdout.
    pub fn new(echo: bool) -> Console {
        Console {
            echo,
            all: Mutex::new(Vec::new()),
        }
    }

    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.all.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    fn emit(&self, line: &[u8]) {
        self.all
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(line);
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line);
            let _ = out.flush();
        }
    }
}

/// One vCPU's pending partial line.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// Adds bytes; complete lines go to `console`.
    pub fn push(&mut self, console: &Console, bytes: &[u8]) {
        for &b in bytes {
            self.buf.push(b);
            if b == b'\n' || self.buf.len() >= 4096 {
                console.emit(&self.buf);
                self.buf.clear();
            }
        }
    }

    /// Emits a trailing partial line.
    pub fn flush(&mut self, console: &Console) {
        if !self.buf.is_empty() {
            console.emit(&self.buf);
            self.buf.clear();
        }
    }
}
