//! The machine the experiments ran on, and when: the metadata of every JSON result.

use std::time::SystemTime;

/// This machine, as the JSON results and the docs describe it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Host {
    /// `nproc`.
    pub cpus: usize,
    /// `/proc/cpuinfo` model name.
    pub cpu_model: String,
    /// `uname -r`.
    pub kernel: String,
}

impl Host {
    /// This machine.
    pub fn this() -> Host {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Host {
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model,
            kernel,
        }
    }
}

/// Now, UTC, to the second: `2026-11-25T15:57:00Z`.
pub fn utc_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = utc_now();
        assert_eq!(t.len(), "2026-11-25T15:57:00Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert!(Host::this().cpus > 0);
    }
}
