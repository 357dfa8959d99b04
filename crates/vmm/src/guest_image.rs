//! The guest kernel built from `guest/` by `build.rs`, embedded in the binary.

/// The bundled guest kernel ELF.
pub static BUNDLED: &[u8] = include_bytes!(env!("APFVM_GUEST_ELF"));
