//! What a measured point varies besides the guest: the restore mode (how memory arrives and
//! who turns a missing page into an APF) and the memory (its source and the prefetch policy).

use std::fmt;
use std::str::FromStr;

use pager::Prefetch;
use vmm::{ApfMode, ApfPath};

/// A name that is not one of a type's names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?}: expected one of {}", expected.join(", "))]
pub struct UnknownName {
    what: &'static str,
    value: String,
    expected: &'static [&'static str],
}

/// How memory arrives and who turns a missing page into an APF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Eager restore: every page resident before the guest runs.
    Eager,
    /// Lazy, no APF: a missing page stalls its vCPU (blocked in its own thread).
    Off,
    /// Lazy, no APF, KVM's "APF halt" (in-kernel `hlt`: interrupts get in).
    OffHalt,
    /// Lazy, userspace APF, guest booted with protocol v1.
    ApfV1,
    /// Lazy, userspace APF, guest booted with protocol v2.
    ApfV2,
    /// Lazy, KVM's own in-kernel APF (v2 guest).
    Kernel,
    /// Lazy with a recorded working set (replayed), userspace APF (v2 guest).
    #[serde(rename = "apf+ws")]
    ApfWs,
    /// Lazy with a recorded working set (replayed), no APF.
    #[serde(rename = "off+ws")]
    OffWs,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 8] = [
        Mode::Eager,
        Mode::Off,
        Mode::OffHalt,
        Mode::ApfV1,
        Mode::ApfV2,
        Mode::Kernel,
        Mode::ApfWs,
        Mode::OffWs,
    ];
    /// The modes without a working set (`demo`'s, `soak`'s).
    pub const CLASSIC: [Mode; 6] = [
        Mode::Eager,
        Mode::Off,
        Mode::OffHalt,
        Mode::ApfV1,
        Mode::ApfV2,
        Mode::Kernel,
    ];
    /// The modes the issue names (`bench`'s default).
    pub const MAIN: [Mode; 5] = [
        Mode::Eager,
        Mode::Off,
        Mode::ApfV1,
        Mode::ApfV2,
        Mode::Kernel,
    ];
    /// The names of [`Mode::ALL`], in order.
    pub const NAMES: [&'static str; 8] = [
        "eager", "off", "off-halt", "apf-v1", "apf-v2", "kernel", "apf+ws", "off+ws",
    ];

    /// Its name in tables, JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Off => "off",
            Mode::OffHalt => "off-halt",
            Mode::ApfV1 => "apf-v1",
            Mode::ApfV2 => "apf-v2",
            Mode::Kernel => "kernel",
            Mode::ApfWs => "apf+ws",
            Mode::OffWs => "off+ws",
        }
    }

    /// True for the modes whose snapshot carries a recorded working set (replayed).
    pub fn working_set(self) -> bool {
        matches!(self, Mode::ApfWs | Mode::OffWs)
    }

    /// The protocol the snapshot's guest is booted with (it picks it from CPUID at boot).
    pub fn booted(self) -> ApfMode {
        if self == Mode::ApfV1 {
            ApfMode::V1
        } else {
            ApfMode::V2
        }
    }

    /// True for the modes that inject APFs.
    pub fn is_apf(self) -> bool {
        matches!(self, Mode::ApfV1 | Mode::ApfV2 | Mode::Kernel | Mode::ApfWs)
    }

    /// Whether the restore is lazy, and who turns a missing page into an APF.
    pub fn restore_path(self) -> (bool, ApfPath) {
        match self {
            Mode::Eager => (false, ApfPath::Userspace),
            Mode::Off | Mode::OffWs => (true, ApfPath::Off),
            Mode::OffHalt => (true, ApfPath::OffHalt),
            Mode::ApfV1 | Mode::ApfV2 | Mode::ApfWs => (true, ApfPath::Userspace),
            Mode::Kernel => (true, ApfPath::Kernel),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl UnknownName {
    /// The one of `all` whose `name` is `value` (surrounding blanks ignored); the error
    /// names `what` and lists `expected`.
    fn find<T: Copy>(
        all: &[T],
        name: fn(T) -> &'static str,
        value: &str,
        what: &'static str,
        expected: &'static [&'static str],
    ) -> Result<T, UnknownName> {
        all.iter()
            .copied()
            .find(|&t| name(t) == value.trim())
            .ok_or_else(|| UnknownName {
                what,
                value: value.to_string(),
                expected,
            })
    }
}

impl FromStr for Mode {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Mode, UnknownName> {
        UnknownName::find(&Mode::ALL, Mode::name, s, "mode", &Mode::NAMES)
    }
}

/// Where a restore reads guest memory from (`bench --sources`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The snapshot's memory file.
    File,
    /// An NBD export of that file, served by `qemu-nbd` on a unix socket.
    Nbd,
}

impl Source {
    /// Both, in table order.
    pub const ALL: [Source; 2] = [Source::File, Source::Nbd];
    /// The names of [`Source::ALL`], in order.
    pub const NAMES: [&'static str; 2] = ["file", "nbd"];

    /// Its name in tables, JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Nbd => "nbd",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Source {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Source, UnknownName> {
        UnknownName::find(
            &Source::ALL,
            Source::name,
            s,
            "memory source",
            &Source::NAMES,
        )
    }
}

/// Every prefetch policy of the pager, in table order.
pub const PREFETCH_ALL: [Prefetch; 3] = [Prefetch::None, Prefetch::Readahead, Prefetch::Fill];
/// Their names, in order.
pub const PREFETCH_NAMES: [&str; 3] = ["none", "readahead", "fill"];

/// How a point's memory arrives: a source and a prefetch policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    /// The memory file or NBD.
    pub source: Source,
    /// The pager's prefetch policy.
    pub prefetch: Prefetch,
}

impl Memory {
    /// The plain rows': the memory file, no prefetch.
    pub const FILE: Memory = Memory {
        source: Source::File,
        prefetch: Prefetch::None,
    };

    /// `file`, `nbd`, `nbd+readahead`, `file+fill`, ...
    pub fn label(self) -> String {
        if self.prefetch == Prefetch::None {
            self.source.name().to_string()
        } else {
            format!("{}+{}", self.source, self.prefetch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_match_the_json() {
        for (m, name) in Mode::ALL.into_iter().zip(Mode::NAMES) {
            assert_eq!(m.name(), name);
            assert_eq!(name.parse::<Mode>(), Ok(m));
            assert_eq!(serde_json::to_value(m).unwrap(), name);
        }
        for (s, name) in Source::ALL.into_iter().zip(Source::NAMES) {
            assert_eq!(name.parse::<Source>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), name);
        }
        for (p, name) in PREFETCH_ALL.into_iter().zip(PREFETCH_NAMES) {
            assert_eq!(p.to_string(), name);
            assert_eq!(name.parse::<Prefetch>(), Ok(p));
        }
        let e = "fast".parse::<Mode>().unwrap_err().to_string();
        assert!(e.contains("\"fast\"") && e.contains("off-halt"), "{e}");
        let nbd_fill = Memory {
            source: Source::Nbd,
            prefetch: Prefetch::Fill,
        };
        assert_eq!(
            (Memory::FILE.label(), nbd_fill.label()),
            ("file".into(), "nbd+fill".into())
        );
    }
}
