//! `qemu-nbd` serving a snapshot's memory file: the one place that knows its command line,
//! the export name and the matching `--memory-source` URL. `apfvm snapshot` prints the
//! command; `bench` starts it ([`Server`]); the tests ask [`available`]. The same for
//! `nbdkit` with its file plugin ([`ServerKind::Nbdkit`]): the client is tested against
//! both, so that remote memory is not tied to one server implementation.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pager::NbdUrl;
use pager::nbd::{NbdClient, NbdClientConfig};

use crate::error::{Error, Result};

/// The export name apfvm serves a memory file as.
pub const EXPORT: &str = "mem";

/// How long [`Server::start`] waits for the first handshake.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// True if `qemu-nbd --version` runs.
pub fn available() -> bool {
    ServerKind::QemuNbd.available()
}

/// An NBD server apfvm knows how to start on a memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// `qemu-nbd` (Debian: qemu-utils).
    QemuNbd,
    /// `nbdkit` with its file plugin (Debian: nbdkit).
    Nbdkit,
}

impl ServerKind {
    /// The program's name.
    pub fn program(self) -> &'static str {
        match self {
            ServerKind::QemuNbd => "qemu-nbd",
            ServerKind::Nbdkit => "nbdkit",
        }
    }

    /// The Debian package that has it.
    pub fn package(self) -> &'static str {
        match self {
            ServerKind::QemuNbd => "qemu-utils",
            ServerKind::Nbdkit => "nbdkit",
        }
    }

    /// True if `PROGRAM --version` runs.
    pub fn available(self) -> bool {
        Command::new(self.program())
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Its arguments serving `file` read-only as [`EXPORT`] on the unix socket `socket`, in
    /// the foreground (nbdkit: exiting with its parent, so a killed test leaves no server).
    pub fn args(self, file: &Path, socket: &Path) -> Vec<String> {
        match self {
            ServerKind::QemuNbd => args(file, socket),
            ServerKind::Nbdkit => vec![
                "--foreground".into(),
                "--readonly".into(),
                "--exit-with-parent".into(),
                format!("--exportname={EXPORT}"),
                format!("--unix={}", socket.display()),
                "file".into(),
                format!("file={}", file.display()),
            ],
        }
    }
}

/// The arguments of `qemu-nbd` serving `file` read-only as [`EXPORT`] on the unix socket
/// `socket`.
pub fn args(file: &Path, socket: &Path) -> Vec<String> {
    vec![
        "--read-only".into(),
        "--persistent".into(),
        "--shared=8".into(),
        "--format=raw".into(),
        format!("--export-name={EXPORT}"),
        format!("--socket={}", socket.display()),
        file.display().to_string(),
    ]
}

/// The `--memory-source` URL of [`EXPORT`] on the unix socket `socket`.
pub fn url(socket: &Path) -> String {
    format!("nbd+unix:///{EXPORT}?socket={}", socket.display())
}

/// How to serve the memory of the snapshot in `dir`: the `qemu-nbd` command line (on the
/// socket `dir/nbd.sock`) and the matching `--memory-source` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeCommand {
    /// The shell command.
    pub command: String,
    /// `apfvm restore --memory-source` for it.
    pub url: String,
}

impl ServeCommand {
    /// For the snapshot directory `dir`.
    pub fn for_snapshot(dir: &Path) -> ServeCommand {
        let socket = dir.join("nbd.sock");
        let file = dir.join(vmm::snapshot::format::MEMORY);
        ServeCommand {
            command: format!("qemu-nbd {}", args(&file, &socket).join(" ")),
            url: url(&socket),
        }
    }
}

/// `qemu-nbd` (or nbdkit) serving a memory file on a unix socket; killed (and reaped) when
/// dropped.
#[derive(Debug)]
pub struct Server {
    kind: ServerKind,
    child: Option<Child>,
    url: NbdUrl,
    file: PathBuf,
    socket: PathBuf,
}

impl Server {
    /// Starts it and waits (up to 10 s) until it answers a handshake. Its stderr goes to
    /// `socket` with the extension `log`.
    pub fn start(file: &Path, socket: &Path) -> Result<Server> {
        Self::start_kind(ServerKind::QemuNbd, file, socket)
    }

    /// [`Server::start`] with the server `kind`.
    pub fn start_kind(kind: ServerKind, file: &Path, socket: &Path) -> Result<Server> {
        let url: NbdUrl = url(socket)
            .parse()
            .map_err(|e: pager::nbd::ParseNbdUrlError| {
                Error::QemuNbd(format!("socket {}: {e}", socket.display()))
            })?;
        let mut server = Server {
            kind,
            child: None,
            url,
            file: file.to_path_buf(),
            socket: socket.to_path_buf(),
        };
        server.restart()?;
        Ok(server)
    }

    /// Starts it again (after [`Server::kill`]) on the same file and socket, and waits until
    /// it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let log_path: PathBuf = self.socket.with_extension("log");
        let log = std::fs::File::create(&log_path)
            .map_err(Error::io(format!("creating {}", log_path.display())))?;
        let kind = self.kind;
        let child = Command::new(kind.program())
            .args(kind.args(&self.file, &self.socket))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                Error::QemuNbd(format!(
                    "starting {}: {e} (Debian: apt-get install {})",
                    kind.program(),
                    kind.package()
                ))
            })?;
        // From here on, an early return kills it (Drop).
        let child = self.child.insert(child);
        let t0 = Instant::now();
        loop {
            let Err(err) = NbdClient::connect(&self.url, &NbdClientConfig::default()) else {
                return Ok(());
            };
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || t0.elapsed() > START_TIMEOUT {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(Error::QemuNbd(format!(
                    "{} serving {} on {}: {} ({err}); its stderr: {}",
                    kind.program(),
                    self.file.display(),
                    self.socket.display(),
                    exited.map_or_else(
                        || format!("no answer within {START_TIMEOUT:?}"),
                        |s| s.to_string()
                    ),
                    log.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (a server that goes away), reaping the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its `--memory-source` URL.
    pub fn url(&self) -> &NbdUrl {
        &self.url
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_command_and_url_agree() {
        let c = ServeCommand::for_snapshot(Path::new("/tmp/snap"));
        assert_eq!(
            c.command,
            "qemu-nbd --read-only --persistent --shared=8 --format=raw --export-name=mem --socket=/tmp/snap/nbd.sock /tmp/snap/memory.raw"
        );
        assert_eq!(c.url, "nbd+unix:///mem?socket=/tmp/snap/nbd.sock");
        assert!(c.url.parse::<NbdUrl>().is_ok());
    }
}
