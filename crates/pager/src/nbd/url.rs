//! NBD URLs (the NBD URI spec's forms): `nbd://HOST[:PORT][/EXPORT]` (TCP, port 10809 by
//! default) and `nbd+unix:///EXPORT?socket=PATH` (a unix socket). `%XX` escapes are decoded
//! in the export name and the socket path.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The IANA port of NBD.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP: host name or address (IPv6 without brackets) and port.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URL: a server address and an export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// The server.
    pub addr: NbdAddr,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

/// An NBD URL that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad NBD URL {url:?}: {why} (expected nbd://HOST[:PORT]/EXPORT or \
     nbd+unix:///EXPORT?socket=PATH)"
)]
pub struct ParseNbdUrlError {
    url: String,
    why: String,
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl FromStr for NbdUrl {
    type Err = ParseNbdUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| ParseNbdUrlError {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| err("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| err("bad %-escape in the export"))?;
        match scheme {
            "nbd" => {
                if query.is_some() {
                    return Err(err("nbd:// takes no query"));
                }
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (h, after) = v6.split_once(']').ok_or_else(|| err("unclosed '['"))?;
                    (h, after.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(err("no host"));
                }
                let port = match port {
                    Some(p) => p.parse().map_err(|_| err("bad port"))?,
                    None => NBD_DEFAULT_PORT,
                };
                Ok(NbdUrl {
                    addr: NbdAddr::Tcp {
                        host: host.to_string(),
                        port,
                    },
                    export,
                })
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(err(
                        "nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                let socket = query
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .ok_or_else(|| err("no socket=PATH"))?;
                let socket = percent_decode(socket).ok_or_else(|| err("bad %-escape"))?;
                if socket.is_empty() {
                    return Err(err("empty socket path"));
                }
                Ok(NbdUrl {
                    addr: NbdAddr::Unix(PathBuf::from(socket)),
                    export,
                })
            }
            _ => Err(err("the scheme is not nbd or nbd+unix")),
        }
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_forms() {
        let u: NbdUrl = "nbd://127.0.0.1:10900/mem".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "mem");
        assert_eq!(u.to_string(), "nbd://127.0.0.1:10900/mem");

        let u: NbdUrl = "nbd://localhost".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "localhost".into(),
                port: NBD_DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");

        let u: NbdUrl = "nbd://[::1]:999/a%20b".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 999
            }
        );
        assert_eq!(u.export, "a b");
        assert_eq!(u.to_string(), "nbd://[::1]:999/a b");

        let u: NbdUrl = "nbd+unix:///mem?socket=/tmp/s%2Fx.sock".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/s/x.sock".into()));
        assert_eq!(u.export, "mem");
        let u: NbdUrl = "nbd+unix://?socket=/tmp/n.sock".parse().unwrap();
        assert_eq!(u.export, "");
    }

    #[test]
    fn refuses_bad_urls() {
        for bad in [
            "/tmp/x",
            "http://h/x",
            "nbd://:10/x",
            "nbd://h:port/x",
            "nbd+unix:///mem",
            "nbd+unix://host/mem?socket=/x",
            "nbd://h/%zz",
        ] {
            let e = bad.parse::<NbdUrl>().unwrap_err();
            assert!(e.to_string().contains("bad NBD URL"), "{bad}: {e}");
        }
    }
}
