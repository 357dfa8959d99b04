#![allow(clippy::cast_possible_truncation)]
//! A small fake NBD server on a unix socket, for the client's unit tests: fixed newstyle,
//! `NBD_OPT_GO` (or not), simple replies, optionally answering each batch of requests in
//! reverse order, optionally dropping connections after some requests.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Copy, Default)]
pub struct FakeOptions {
    /// Answer NBD_OPT_GO with NBD_REP_ERR_UNSUP (old server).
    pub no_go: bool,
    /// Read this many requests before answering them, last first.
    pub reverse_batch: usize,
    /// Close each connection after this many requests (0: never).
    pub drop_after: u64,
}

pub struct FakeServer {
    pub socket: PathBuf,
    pub stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    pub fn start(data: Vec<u8>, export: &str, opts: FakeOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let data = Arc::new(data);
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, export) = (Arc::clone(&stop), export.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { return };
                let (data, export) = (Arc::clone(&data), export.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &data, &export, opts);
                });
            }
        });
        Self {
            socket,
            stop,
            _dir: dir,
        }
    }

    pub fn url(&self, export: &str) -> super::NbdUrl {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
            .parse()
            .unwrap()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&self.socket);
    }
}

fn rd<const N: usize>(s: &mut UnixStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn opt_reply(s: &mut UnixStream, opt: u32, rtype: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

fn serve(mut s: UnixStream, data: &[u8], export: &str, o: FakeOptions) -> std::io::Result<()> {
    s.write_all(b"NBDMAGICIHAVEOPT")?;
    s.write_all(&3u16.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let cflags = u32::from_be_bytes(rd::<4>(&mut s)?);
    let size = data.len() as u64;
    let tflags: u16 = 1 | 2; // HAS_FLAGS | READ_ONLY
    loop {
        let magic = u64::from_be_bytes(rd::<8>(&mut s)?);
        assert_eq!(magic, 0x4948_4156_454f_5054);
        let opt = u32::from_be_bytes(rd::<4>(&mut s)?);
        let len = u32::from_be_bytes(rd::<4>(&mut s)?) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
        match opt {
            1 => {
                if payload != export.as_bytes() {
                    return Ok(()); // unknown export: close
                }
                s.write_all(&size.to_be_bytes())?;
                s.write_all(&tflags.to_be_bytes())?;
                if cflags & 2 == 0 {
                    s.write_all(&[0u8; 124])?;
                }
                break;
            }
            7 if o.no_go => opt_reply(&mut s, opt, (1 << 31) | 1, b"")?,
            7 => {
                let n = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
                if &payload[4..4 + n] != export.as_bytes() {
                    opt_reply(&mut s, opt, (1 << 31) | 6, b"no such export")?;
                    continue;
                }
                let mut info = vec![0u8, 0];
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(&mut s, opt, 3, &info)?;
                let mut bs = vec![0u8, 3];
                for v in [1u32, 4096, 1 << 20] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                opt_reply(&mut s, opt, 3, &bs)?;
                opt_reply(&mut s, opt, 1, b"")?;
                break;
            }
            _ => opt_reply(&mut s, opt, (1 << 31) | 1, b"")?,
        }
    }
    let mut served = 0u64;
    loop {
        let mut batch = Vec::new();
        for _ in 0..o.reverse_batch.max(1) {
            let r = rd::<28>(&mut s)?;
            let kind = u16::from_be_bytes([r[6], r[7]]);
            if kind == 2 {
                return Ok(());
            }
            let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
            let off = u64::from_be_bytes(r[16..24].try_into().unwrap());
            let len = u64::from(u32::from_be_bytes(r[24..28].try_into().unwrap()));
            batch.push((handle, off, len));
        }
        for &(handle, off, len) in batch.iter().rev() {
            served += 1;
            if o.drop_after > 0 && served > o.drop_after {
                return Ok(());
            }
            let mut m = Vec::new();
            m.extend_from_slice(&0x6744_6698u32.to_be_bytes());
            let bad = off + len > size;
            m.extend_from_slice(&(if bad { 22u32 } else { 0 }).to_be_bytes());
            m.extend_from_slice(&handle.to_be_bytes());
            if !bad {
                m.extend_from_slice(&data[off as usize..(off + len) as usize]);
            }
            s.write_all(&m)?;
        }
    }
}
