//! Tokens: the name of one outstanding asynchronous page fault.

use core::fmt;
use core::num::NonZeroU32;

/// The token a host hands out with a "page not present" and repeats with its "page ready".
///
/// Never 0: in v2, 0 at offset 4 of the area means "token slot free" (Linux's 2022 fix forces
/// tokens non-zero for this reason). [`Token::WAKE_ALL`] (0xffffffff) is reserved for the
/// broadcast "wake every sleeper" and is never allocated to a single fault.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(NonZeroU32);

impl Token {
    /// "Token 0xffffffff in a type 2: wake up every task waiting for any APF" (§2).
    pub const WAKE_ALL: Token = Token(NonZeroU32::MAX);

    /// A token from its raw value; `None` for 0, which is never a token.
    pub const fn new(raw: u32) -> Option<Token> {
        match NonZeroU32::new(raw) {
            Some(v) => Some(Token(v)),
            None => None,
        }
    }

    /// The value written to CR2 and to the area's token slot.
    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// True for the broadcast token.
    pub const fn is_wake_all(self) -> bool {
        self.0.get() == u32::MAX
    }

    /// True for a token a host may allocate to one fault: neither 0 nor the broadcast.
    pub const fn is_individual(self) -> bool {
        !self.is_wake_all()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_wake_all() {
            f.write_str("Token(WAKE_ALL)")
        } else {
            write!(f, "Token({:#x})", self.get())
        }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_not_a_token() {
        assert_eq!(Token::new(0), None);
    }

    #[test]
    fn wake_all_is_the_broadcast_and_not_individual() {
        let t = Token::new(0xffff_ffff).unwrap();
        assert_eq!(t, Token::WAKE_ALL);
        assert!(t.is_wake_all());
        assert!(!t.is_individual());
        let one = Token::new(0x1000).unwrap();
        assert!(one.is_individual());
        assert_eq!(one.get(), 0x1000);
    }
}
