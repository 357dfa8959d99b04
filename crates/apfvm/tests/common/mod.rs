//! What the tests of the apfvm binary share.
#![allow(dead_code)] // each test file uses a part of it

/// The `apfvm` binary of this build.
pub fn apfvm() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_apfvm"))
}

/// A fresh, empty scratch directory for one test.
pub fn scratch(name: &str) -> std::path::PathBuf {
    testkit::scratch("cli", name)
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn texts(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
