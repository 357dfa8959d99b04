//! `cargo fuzz run manifest` (see scripts/fuzz). The check is [`apfvm_fuzz::manifest::check`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| apfvm_fuzz::manifest::check(data));
