//! Console output through port 0xe9, one `out` per byte (CPL 0 only).
//!
//! No `core::fmt` on the hot paths: formatting machinery costs thousands of emulated
//! instructions at CPL 0. `Console` implements `fmt::Write` for the panic handler only.

use core::fmt;

use guest_abi::port;

use crate::x86::outb;

/// Writes bytes to the console.
pub fn put_bytes(s: &[u8]) {
    for &b in s {
        outb(port::CONSOLE, b);
    }
}

/// Writes a string to the console.
pub fn puts(s: &str) {
    put_bytes(s.as_bytes());
}

/// Writes `v` in hexadecimal with a `0x` prefix.
pub fn put_hex(v: u64) {
    let mut buf = [0u8; 18];
    buf[0] = b'0';
    buf[1] = b'x';
    let mut n = 2;
    let mut started = false;
    for i in (0..16).rev() {
        #[allow(clippy::cast_possible_truncation)] // a nibble
        let d = ((v >> (i * 4)) & 0xf) as u8;
        if d != 0 || started || i == 0 {
            started = true;
            buf[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            n += 1;
        }
    }
    put_bytes(&buf[..n]);
}

/// Writes `v` in decimal.
pub fn put_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut n = buf.len();
    loop {
        n -= 1;
        #[allow(clippy::cast_possible_truncation)] // a digit
        let d = (v % 10) as u8;
        buf[n] = b'0' + d;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put_bytes(&buf[n..]);
}

/// `fmt::Write` over the console, for the panic handler.
#[derive(Debug)]
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        puts(s);
        Ok(())
    }
}
