//! The checks behind apfvm's fuzz targets, one module per target.
//!
//! Each `check(data)` decodes arbitrary bytes into an input (with [`arbitrary::Unstructured`]:
//! every field is read as little-endian bytes, short input reads as zeros, so every byte
//! string is a valid input) and panics when the code under test breaks a rule. The fuzz
//! targets in `fuzz_targets/` are one line each; `tests/corpus.rs` replays the committed
//! corpus (`corpus/<target>/`) through the same functions as an ordinary test. Each module
//! also has an `encode` for writing seed inputs by hand.

pub mod engine_events;
pub mod manifest;
pub mod msr_parse;

use arbitrary::{Arbitrary, Unstructured};

/// Reads one field; an exhausted input reads as zero/false.
pub(crate) fn take<'a, T: Arbitrary<'a> + Default>(u: &mut Unstructured<'a>) -> T {
    u.arbitrary().unwrap_or_default()
}

/// The names of the fuzz targets, as `cargo fuzz list` prints them.
pub const TARGETS: [&str; 3] = ["msr_parse", "engine_events", "manifest"];

/// Runs target `name`'s check on `data`.
pub fn check(name: &str, data: &[u8]) {
    match name {
        "msr_parse" => msr_parse::check(data),
        "engine_events" => engine_events::check(data),
        "manifest" => manifest::check(data),
        other => panic!("no fuzz target {other}"),
    }
}
