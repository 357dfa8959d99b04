//! The one fake NBD server of the workspace's tests: a unix socket speaking the fixed
//! newstyle handshake (`NBD_OPT_GO`, or only `NBD_OPT_EXPORT_NAME` for an old server) and
//! simple replies, with faults to order: replies to a batch of requests in reverse order,
//! connections dropped after some requests, EIO for reads reaching an offset, or silence
//! (a frozen server) after some requests. Dropping it closes every connection it accepted.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// How the fake server misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeOptions {
    /// Answer `NBD_OPT_GO` with `NBD_REP_ERR_UNSUP` (an old server).
    pub no_go: bool,
    /// Read this many requests before answering them, last first.
    pub reverse_batch: usize,
    /// Close each connection after this many requests (0: never).
    pub drop_after: u64,
    /// Answer errno 5 (EIO) to any read reaching this offset.
    pub eio_from: Option<u64>,
    /// Stop answering (keep the connection open, read nothing more) after this many
    /// requests on a connection: a frozen server.
    pub silent_after: Option<u64>,
}

/// A fake NBD server serving `data` as one export, until dropped.
#[derive(Debug)]
pub struct FakeNbd {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    _dir: tempfile::TempDir,
}

const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const SIMPLE_REPLY: u32 = 0x6744_6698;

impl FakeNbd {
    /// Starts serving `data` as export `export` on a socket in a new temporary directory.
    pub fn start(data: impl Into<Arc<[u8]>>, export: &str, opts: FakeOptions) -> FakeNbd {
        let dir = tempfile::tempdir().expect("a temporary directory for the fake NBD socket");
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake NBD socket");
        let data: Arc<[u8]> = data.into();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (stop2, conns2, export) = (Arc::clone(&stop), Arc::clone(&conns), export.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { return };
                if let Ok(c) = conn.try_clone() {
                    conns2
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(c);
                }
                let (data, export) = (Arc::clone(&data), export.clone());
                std::thread::spawn(move || {
                    let end = conn.try_clone();
                    let _ = serve(conn, &data, &export, opts);
                    // Closed for the peer even though the server keeps a clone of it.
                    if let Ok(c) = end {
                        let _ = c.shutdown(Shutdown::Both);
                    }
                });
            }
        });
        FakeNbd {
            socket,
            stop,
            conns,
            _dir: dir,
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `nbd+unix://` URL of export `export` on it (any name: the server refuses names
    /// other than its own as a real one does).
    pub fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for FakeNbd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so that it sees `stop`.
        let _ = UnixStream::connect(&self.socket);
    }
}

fn rd<const N: usize>(s: &mut UnixStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn opt_reply(s: &mut UnixStream, opt: u32, rtype: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// The handshake: `Ok(true)` when the transmission phase starts.
fn handshake(s: &mut UnixStream, size: u64, export: &str, o: FakeOptions) -> std::io::Result<bool> {
    s.write_all(b"NBDMAGICIHAVEOPT")?;
    s.write_all(&3u16.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let cflags = be32(&rd::<4>(s)?);
    let tflags: u16 = 1 | 2; // HAS_FLAGS | READ_ONLY
    loop {
        if be64(&rd::<8>(s)?) != OPT_MAGIC {
            return Ok(false);
        }
        let opt = be32(&rd::<4>(s)?);
        let len = be32(&rd::<4>(s)?) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
        match opt {
            // NBD_OPT_EXPORT_NAME
            1 => {
                if payload != export.as_bytes() {
                    return Ok(false); // unknown export: close
                }
                s.write_all(&size.to_be_bytes())?;
                s.write_all(&tflags.to_be_bytes())?;
                if cflags & 2 == 0 {
                    s.write_all(&[0u8; 124])?;
                }
                return Ok(true);
            }
            // NBD_OPT_GO
            7 if o.no_go => opt_reply(s, opt, (1 << 31) | 1, b"")?,
            7 => {
                let n = payload.get(..4).map_or(0, be32) as usize;
                if payload.get(4..4 + n) != Some(export.as_bytes()) {
                    opt_reply(s, opt, (1 << 31) | 6, b"no such export")?;
                    continue;
                }
                let mut info = vec![0u8, 0];
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(s, opt, 3, &info)?;
                let mut bs = vec![0u8, 3];
                for v in [1u32, 4096, 1 << 20] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                opt_reply(s, opt, 3, &bs)?;
                opt_reply(s, opt, 1, b"")?;
                return Ok(true);
            }
            _ => opt_reply(s, opt, (1 << 31) | 1, b"")?,
        }
    }
}

fn serve(
    mut conn: UnixStream,
    data: &[u8],
    export: &str,
    opts: FakeOptions,
) -> std::io::Result<()> {
    let size = data.len() as u64;
    if !handshake(&mut conn, size, export, opts)? {
        return Ok(());
    }
    let mut served = 0u64;
    loop {
        let mut batch = Vec::new();
        for _ in 0..opts.reverse_batch.max(1) {
            let req = rd::<28>(&mut conn)?;
            let kind = u16::from_be_bytes([req[6], req[7]]);
            if kind == 2 {
                return Ok(()); // NBD_CMD_DISC
            }
            batch.push((
                be64(&req[8..16]),
                be64(&req[16..24]),
                u64::from(be32(&req[24..28])),
            ));
        }
        for &(handle, off, len) in batch.iter().rev() {
            served += 1;
            if opts.drop_after > 0 && served > opts.drop_after {
                return Ok(());
            }
            if opts.silent_after.is_some_and(|n| served > n) {
                // Frozen: hold the connection open, answer nothing, until the peer or the
                // server's drop closes it.
                let mut sink = [0u8; 4096];
                while conn.read(&mut sink)? > 0 {}
                return Ok(());
            }
            let errno: u32 = if off + len > size {
                22 // EINVAL
            } else if opts.eio_from.is_some_and(|at| off + len > at) {
                5 // EIO
            } else {
                0
            };
            let mut reply = Vec::new();
            reply.extend_from_slice(&SIMPLE_REPLY.to_be_bytes());
            reply.extend_from_slice(&errno.to_be_bytes());
            reply.extend_from_slice(&handle.to_be_bytes());
            if errno == 0 {
                let (first, end) = (
                    usize::try_from(off).unwrap_or(0),
                    usize::try_from(off + len).unwrap_or(0),
                );
                reply.extend_from_slice(&data[first..end]);
            }
            conn.write_all(&reply)?;
        }
    }
}
