//! Links the kernel at fixed physical addresses with `linker.ld`, as a non-PIE executable.
//!
//! Done here rather than only in `.cargo/config.toml` so that it also applies when the kernel
//! is built from another directory (`cargo build --manifest-path guest/Cargo.toml`).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if target == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        // x86_64-unknown-none links static-pie by default; the VMM loads PT_LOAD segments
        // at their physical addresses and applies no relocations, so link a plain ET_EXEC.
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
        println!("cargo:rustc-link-arg-bins=-znorelro");
        println!("cargo:rustc-link-arg-bins=--build-id=none");
    }
}
