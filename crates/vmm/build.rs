//! Builds the project's guest kernel (`guest/`, package `guest-kernel`) for
//! `x86_64-unknown-none` and hands its ELF to the crate as `APFVM_GUEST_ELF`, which
//! `src/guest_image.rs` embeds with `include_bytes!`.
//!
//! The guest is its own workspace: it is built by a nested `cargo build` run in `guest/`, with
//! its own target directory under `OUT_DIR` and with the outer cargo's `CARGO_*` variables and
//! flags scrubbed, so an outer `RUSTFLAGS`, `--target` or target dir never leaks into it.
//! A fresh machine lacks the `x86_64-unknown-none` standard library and the environment sets
//! `RUSTUP_AUTO_INSTALL=0`, so the target is added with `rustup target add` when missing.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-none";
const GUEST_BIN: &str = "guest-kernel";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/vmm sits two levels below the workspace root")
        .to_path_buf();
    let guest_dir = root.join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=APFVM_SKIP_GUEST_BUILD");
    for dep in ["crates/apf-abi", "crates/apf-guest", "crates/guest-abi"] {
        rerun_if_changed_tree(&root.join(dep));
    }
    rerun_if_changed_tree(&guest_dir);

    assert!(
        guest_dir.join("Cargo.toml").exists(),
        "guest kernel sources not found at {}: apfvm embeds the guest built from guest/",
        guest_dir.display()
    );

    ensure_target_installed();

    let guest_target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target", GUEST_TARGET])
        .arg("--target-dir")
        .arg(&guest_target_dir);
    scrub_env(&mut cmd);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run {} to build the guest: {e}",
            cargo.to_string_lossy()
        )
    });
    assert!(
        status.success(),
        "building the guest kernel in {} failed ({status})",
        guest_dir.display()
    );

    let elf = guest_target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN);
    let embedded = out_dir.join("guest-kernel.elf");
    fs::copy(&elf, &embedded).unwrap_or_else(|e| {
        panic!(
            "guest kernel ELF {} missing after build: {e}",
            elf.display()
        )
    });
    println!("cargo:rustc-env=APFVM_GUEST_ELF={}", embedded.display());
}

/// Removes everything of the outer build that would change how the guest is built: every
/// `CARGO_*` variable except those that only say where and how to fetch crates
/// (`CARGO_HOME`, `CARGO_NET_*`, `CARGO_HTTP_*`, `CARGO_REGISTRIES_*`), and the compiler
/// flags and wrappers. `RUSTC` stays when it is set: it names the outer build's toolchain,
/// which is the one we want.
fn scrub_env(cmd: &mut Command) {
    const KEEP: [&str; 4] = [
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
    ];
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let scrub = (key.starts_with("CARGO_") && !KEEP.iter().any(|k| key.starts_with(k)))
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "RUSTC_LINKER"
            );
        if scrub {
            cmd.env_remove(key);
        }
    }
}

/// Adds the guest's target to the toolchain when its standard library is not installed.
fn ensure_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(sysroot) = &sysroot
        && sysroot.join("lib/rustlib").join(GUEST_TARGET).exists()
    {
        return;
    }
    println!(
        "cargo:warning=adding the {GUEST_TARGET} target with rustup (needed for the guest kernel)"
    );
    // RUSTUP_TOOLCHAIN, set by rustup's proxy for the outer build, is inherited: the target is
    // added to the toolchain building us.
    let status = Command::new("rustup")
        .args(["target", "add", GUEST_TARGET])
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`rustup target add {GUEST_TARGET}` failed ({s}); run it by hand"),
        Err(e) => panic!(
            "the {GUEST_TARGET} target is not installed and rustup cannot be run ({e}); \
             install the target for this toolchain"
        ),
    }
}

/// Emits `rerun-if-changed` for a source tree, skipping build output directories.
fn rerun_if_changed_tree(dir: &Path) {
    // A directory named here is scanned recursively by cargo, so name the entries one by one
    // and leave out build output (`target/`) and dot files.
    let Ok(entries) = fs::read_dir(dir) else {
        println!("cargo:rerun-if-changed={}", dir.display());
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') && name != ".cargo" {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}
