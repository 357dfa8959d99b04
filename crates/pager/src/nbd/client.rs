//! A small, complete, blocking NBD client: the fixed-newstyle handshake (`NBD_OPT_GO`, with
//! a fall-back to `NBD_OPT_EXPORT_NAME` for servers that do not know it) and reads in the
//! transmission phase, several requests in flight on one connection (replies matched by
//! handle, in any order; simple replies only: structured replies are never negotiated).
//!
//! Facts from the NBD protocol specification (NetworkBlockDevice/nbd, doc/proto.md); the code
//! is this project's own.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::url::{NbdAddr, NbdUrl};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253; // oldstyle
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;

// Option replies.
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;

// NBD_REP_INFO types.
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;

/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: several connections to the export see the same data.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// The largest read the client asks in one request when the server gives no maximum (the
/// spec says servers SHOULD accept 32 MiB; qemu-nbd does).
const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

/// Largest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// What can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The server could not be reached.
    #[error("connecting to {url} failed: {source}")]
    Connect {
        /// The server.
        url: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The connection failed (reset, closed) during the handshake or a request.
    #[error("connection to the NBD server failed: {0}")]
    Io(io::Error),
    /// The server did not answer within the I/O timeout: it accepted the connection and
    /// then went silent (frozen, overloaded, or a network that drops packets).
    #[error("the NBD server did not answer within the I/O timeout")]
    Silent,
    /// The server broke the protocol (bad magic, unknown handle, structured reply...).
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server speaks only the oldstyle handshake, which this client does not.
    #[error("the NBD server uses the oldstyle handshake (unsupported)")]
    Oldstyle,
    /// The server does not know the export.
    #[error("the NBD server has no export named {name:?}{}", msg(.message))]
    UnknownExport {
        /// The export name asked for.
        name: String,
        /// The server's message, if any.
        message: String,
    },
    /// An option was refused.
    #[error("the NBD server refused option {option} (reply {reply:#x}){}", msg(.message))]
    OptionRefused {
        /// The option.
        option: u32,
        /// The reply type (bit 31 set).
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a read with an error (its errno value).
    #[error("the NBD server failed a read of {len} bytes at offset {offset:#x}: error {errno}")]
    Read {
        /// Offset of the read.
        offset: u64,
        /// Length.
        len: u32,
        /// The server's error (an errno value, e.g. 5 = EIO).
        errno: u32,
    },
    /// A read beyond the end of the export.
    #[error("read of {len} bytes at offset {offset:#x} is beyond the export's end ({size} bytes)")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Export size.
        size: u64,
    },
}

fn msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

impl NbdError {
    /// True when the connection itself failed (reset, closed, timed out, refused) and a new
    /// connection may succeed; false when the server answered something a retry on a new
    /// connection would get again (unknown export, protocol error, refused read).
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            NbdError::Connect { .. } | NbdError::Io(_) | NbdError::Silent
        )
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> NbdError {
        // A socket read timeout reports EAGAIN (WouldBlock) or ETIMEDOUT.
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdError::Silent,
            _ => NbdError::Io(e),
        }
    }
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)?;
                s.set_nodelay(true)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct NbdClientConfig {
    /// Socket read/write timeout (a server that stops answering is a failed connection,
    /// never a hang). `None`: wait forever.
    pub io_timeout: Option<Duration>,
    /// Timeout of a TCP connect.
    pub connect_timeout: Duration,
    /// Largest single read request (smaller than the server's maximum is fine; larger reads
    /// are split into several requests sent back to back).
    pub max_request: u32,
}

impl Default for NbdClientConfig {
    fn default() -> Self {
        Self {
            io_timeout: Some(Duration::from_secs(2)),
            connect_timeout: Duration::from_secs(2),
            max_request: 4 << 20,
        }
    }
}

/// One connection to an NBD export, in the transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    stream: Stream,
    size: u64,
    flags: u16,
    max_request: u32,
    next_handle: u64,
    /// Request headers, batched into one write.
    out: Vec<u8>,
    broken: bool,
}

impl NbdClient {
    /// Connects to `url` and negotiates its export (fixed newstyle: `NBD_OPT_GO`, or
    /// `NBD_OPT_EXPORT_NAME` when the server does not know `NBD_OPT_GO`).
    pub fn connect(url: &NbdUrl, cfg: &NbdClientConfig) -> Result<Self, NbdError> {
        let connect_err = |source| NbdError::Connect {
            url: url.to_string(),
            source,
        };
        let stream = match &url.addr {
            NbdAddr::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(connect_err)?),
            NbdAddr::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for a in (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(connect_err)?
                {
                    match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Stream::Tcp(found.ok_or_else(|| connect_err(last))?)
            }
        };
        stream.set_timeouts(cfg.io_timeout)?;
        Self::handshake(stream, &url.export, cfg)
    }

    fn handshake(mut s: Stream, export: &str, cfg: &NbdClientConfig) -> Result<Self, NbdError> {
        if read_u64(&mut s)? != NBDMAGIC {
            return Err(NbdError::Protocol("no NBDMAGIC: not an NBD server".into()));
        }
        match read_u64(&mut s)? {
            IHAVEOPT => {}
            CLISERV_MAGIC => return Err(NbdError::Oldstyle),
            m => {
                return Err(NbdError::Protocol(format!(
                    "unknown handshake magic {m:#x}"
                )));
            }
        }
        let hflags = read_u16(&mut s)?;
        let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let mut cflags = 0;
        if fixed {
            cflags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;

        let name = export.as_bytes();
        let name_len = u32::try_from(name.len())
            .ok()
            .filter(|&n| n <= 4096)
            .ok_or_else(|| NbdError::Protocol("export name longer than 4096 bytes".into()))?;
        let mut negotiated = None;
        if fixed {
            // NBD_OPT_GO: name, then the information requests (block size: we honour it).
            let mut data = Vec::with_capacity(name.len() + 8);
            data.extend_from_slice(&name_len.to_be_bytes());
            data.extend_from_slice(name);
            data.extend_from_slice(&1u16.to_be_bytes());
            data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            send_option(&mut s, OPT_GO, &data)?;
            negotiated = Self::go_replies(&mut s, export)?;
        }
        #[allow(clippy::single_match_else)]
        let (size, flags, max_payload) = match negotiated {
            Some(n) => n,
            None => {
                // NBD_OPT_EXPORT_NAME: no reply header; an unknown export closes the
                // connection.
                send_option(&mut s, OPT_EXPORT_NAME, name)?;
                let size = read_u64(&mut s).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        NbdError::UnknownExport {
                            name: export.to_string(),
                            message: "the server closed the connection".into(),
                        }
                    } else {
                        NbdError::from(e)
                    }
                })?;
                let flags = read_u16(&mut s)?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z)?;
                }
                (size, flags, None)
            }
        };
        let max_request = cfg
            .max_request
            .min(max_payload.unwrap_or(DEFAULT_MAX_REQUEST))
            .max(4096);
        Ok(Self {
            stream: s,
            size,
            flags,
            max_request,
            next_handle: 1,
            out: Vec::new(),
            broken: false,
        })
    }

    /// Reads the replies to `NBD_OPT_GO` up to its ACK. `None`: the server does not know GO.
    #[allow(clippy::type_complexity)]
    fn go_replies(
        s: &mut Stream,
        export: &str,
    ) -> Result<Option<(u64, u16, Option<u32>)>, NbdError> {
        let mut export_info = None;
        let mut max_payload = None;
        loop {
            if read_u64(s)? != OPT_REPLY_MAGIC {
                return Err(NbdError::Protocol("bad option reply magic".into()));
            }
            let option = read_u32(s)?;
            let rtype = read_u32(s)?;
            let len = read_u32(s)?;
            if option != OPT_GO {
                return Err(NbdError::Protocol(format!(
                    "reply for option {option} while negotiating NBD_OPT_GO"
                )));
            }
            if len > MAX_OPTION_REPLY {
                return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match rtype {
                REP_ACK => {
                    let (size, flags) = export_info.ok_or_else(|| {
                        NbdError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
                    })?;
                    return Ok(Some((size, flags, max_payload)));
                }
                REP_INFO if data.len() >= 2 => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    match info {
                        INFO_EXPORT if data.len() >= 12 => {
                            let size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            export_info = Some((size, flags));
                        }
                        INFO_BLOCK_SIZE if data.len() >= 14 => {
                            let max = u32::from_be_bytes(data[10..14].try_into().expect("4"));
                            max_payload = Some(max);
                        }
                        _ => {} // other information: ignored, as the spec allows
                    }
                }
                REP_ERR_UNSUP => return Ok(None),
                REP_ERR_UNKNOWN => {
                    return Err(NbdError::UnknownExport {
                        name: export.to_string(),
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                t if t & REP_ERR_BIT != 0 => {
                    return Err(NbdError::OptionRefused {
                        option,
                        reply: t,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                _ => {} // an unknown non-error reply: skip it
            }
        }
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The largest request this connection sends.
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    /// True once an error left the connection in an unknown state: drop it.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Reads `buf.len()` bytes at `offset`, in requests of at most [`Self::max_request`]
    /// bytes sent back to back (pipelined).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
        let mut off = offset;
        for piece in buf.chunks_mut(self.max_request as usize) {
            let len = piece.len() as u64;
            pieces.push((off, piece));
            off += len;
        }
        self.read_many(&mut pieces)
    }

    /// Reads every `(offset, buffer)`: all requests are written first (several in flight),
    /// then the replies are read in whatever order the server sends them, matched by handle.
    /// Each buffer must be at most [`Self::max_request`] bytes.
    pub fn read_many(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection already failed",
            )));
        }
        let r = self.read_many_inner(reads);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn read_many_inner(&mut self, reads: &mut [(u64, &mut [u8])]) -> Result<(), NbdError> {
        if reads.is_empty() {
            return Ok(());
        }
        let base = self.next_handle;
        self.out.clear();
        for (offset, buf) in reads.iter() {
            let len = buf.len() as u64;
            if offset.checked_add(len).is_none_or(|end| end > self.size) {
                return Err(NbdError::OutOfRange {
                    offset: *offset,
                    len,
                    size: self.size,
                });
            }
            let len = u32::try_from(len)
                .ok()
                .filter(|&l| l <= self.max_request)
                .ok_or_else(|| NbdError::Protocol(format!("read of {len} bytes is too large")))?;
            let handle = self.next_handle;
            self.next_handle = self.next_handle.wrapping_add(1);
            self.out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            self.out.extend_from_slice(&0u16.to_be_bytes()); // command flags
            self.out.extend_from_slice(&CMD_READ.to_be_bytes());
            self.out.extend_from_slice(&handle.to_be_bytes());
            self.out.extend_from_slice(&offset.to_be_bytes());
            self.out.extend_from_slice(&len.to_be_bytes());
        }
        self.stream.write_all(&self.out)?;
        let mut done = vec![false; reads.len()];
        for _ in 0..reads.len() {
            let mut hdr = [0u8; 16];
            self.stream.read_exact(&mut hdr)?;
            let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4"));
            let error = u32::from_be_bytes(hdr[4..8].try_into().expect("4"));
            let handle = u64::from_be_bytes(hdr[8..16].try_into().expect("8"));
            if magic == STRUCTURED_REPLY_MAGIC {
                return Err(NbdError::Protocol(
                    "structured reply, never negotiated".into(),
                ));
            }
            if magic != SIMPLE_REPLY_MAGIC {
                return Err(NbdError::Protocol(format!("bad reply magic {magic:#x}")));
            }
            let i = handle.wrapping_sub(base);
            let Some(i) = usize::try_from(i)
                .ok()
                .filter(|&i| i < reads.len() && !done[i])
            else {
                return Err(NbdError::Protocol(format!(
                    "reply for unknown handle {handle}"
                )));
            };
            done[i] = true;
            let (offset, buf) = &mut reads[i];
            if error != 0 {
                // No payload follows; the other replies would keep the stream in sync, but
                // the caller drops the connection anyway.
                return Err(NbdError::Read {
                    offset: *offset,
                    len: u32::try_from(buf.len()).unwrap_or(u32::MAX),
                    errno: error,
                });
            }
            self.stream.read_exact(buf)?;
        }
        Ok(())
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`) and closes the connection.
    pub fn disconnect(mut self) {
        self.disc();
    }

    fn disc(&mut self) {
        if !self.broken {
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&CMD_DISC.to_be_bytes());
            req.extend_from_slice(&self.next_handle.to_be_bytes());
            req.extend_from_slice(&0u64.to_be_bytes());
            req.extend_from_slice(&0u32.to_be_bytes());
            let _ = self.stream.write_all(&req);
            self.broken = true;
        }
        self.stream.shutdown();
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.disc();
    }
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let len =
        u32::try_from(data.len()).map_err(|_| NbdError::Protocol("option too long".into()))?;
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)?;
    Ok(())
}
