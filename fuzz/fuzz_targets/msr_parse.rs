//! `cargo fuzz run msr_parse` (see scripts/fuzz). The check is [`apfvm_fuzz::msr_parse::check`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| apfvm_fuzz::msr_parse::check(data));
