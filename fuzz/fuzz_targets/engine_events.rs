//! `cargo fuzz run engine_events` (see scripts/fuzz). The check is [`apfvm_fuzz::engine_events::check`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| apfvm_fuzz::engine_events::check(data));
