//! vCPU exit handling as a free function over a small, owned [`Exit`] (converted from
//! `kvm_ioctls::VcpuExit` in `kvm::vcpu`), so every case is unit-tested with fabricated exits.
//!
//! [`handle_exit`] decides; the vCPU loop carries out: it writes [`Reply`] values back into
//! `kvm_run` and acts on [`ExitAction`]. What needs the world (console, the APF engine, the
//! vCPU's registers for a report) is reached through [`ExitContext`].

use std::fmt;

use guest_abi::port;

/// A vCPU exit, owned (no borrow of `kvm_run`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `out` to `port`; `data` are the bytes written (1, 2 or 4).
    IoOut {
        /// Port.
        port: u16,
        /// Bytes written, little-endian.
        data: Vec<u8>,
    },
    /// `in` from `port` of `size` bytes.
    IoIn {
        /// Port.
        port: u16,
        /// Access size.
        size: usize,
    },
    /// MMIO access outside RAM and the in-kernel devices.
    Mmio {
        /// Guest-physical address.
        addr: u64,
        /// Write (true) or read.
        write: bool,
    },
    /// `rdmsr` of a filtered MSR.
    RdMsr {
        /// MSR index.
        index: u32,
    },
    /// `wrmsr` of a filtered MSR.
    WrMsr {
        /// MSR index.
        index: u32,
        /// Value written.
        data: u64,
    },
    /// `KVM_RUN` returned `EINTR` (a kick, or `immediate_exit`).
    Interrupted,
    /// `KVM_EXIT_IRQ_WINDOW_OPEN`: the guest can take an injection now (asked for with
    /// `request_interrupt_window`).
    WindowOpen,
    /// `hlt` exited to userspace (only without an in-kernel irqchip).
    Hlt,
    /// Triple fault or other shutdown.
    Shutdown,
    /// KVM could not run the guest (e.g. emulation failure).
    InternalError {
        /// `internal.suberror`.
        suberror: u32,
        /// `internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware reason.
        reason: u64,
    },
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent {
        /// Event type.
        kind: u32,
    },
    /// Anything else, by name.
    Other(&'static str),
}

/// A value to write back into `kvm_run` before the next `KVM_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to write.
    None,
    /// MSR exit: `error` = 1 injects #GP; `data` is a read's result.
    Msr {
        /// Inject #GP.
        error: bool,
        /// Value returned by `rdmsr`.
        data: u64,
    },
    /// `in`: the value read (truncated to the access size).
    IoIn(u32),
}

/// What the vCPU loop does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Write the reply and re-enter the guest.
    Resume(Reply),
    /// The guest wrote its exit status: stop the VM.
    Done(u32),
    /// The guest requested a snapshot with this tag (`port::SNAPSHOT`); resume afterwards.
    Snapshot(u32),
    /// The guest cannot go on.
    Fatal(GuestFault),
}

/// A fatal guest failure, with what is needed to understand it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestFault {
    /// vCPU index.
    pub vcpu: u32,
    /// The exit reason, in words.
    pub reason: String,
    /// Guest RIP at the exit, when it could be read.
    pub rip: Option<u64>,
}

impl fmt::Display for GuestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest died on vCPU {}: {}", self.vcpu, self.reason)?;
        match self.rip {
            Some(rip) => write!(f, " at RIP {rip:#x}"),
            None => f.write_str(" (RIP unavailable)"),
        }
    }
}

/// Why an MSR access was refused (answered with #GP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsrRefused(pub String);

/// What [`handle_exit`] needs from the world.
pub trait ExitContext {
    /// Index of the vCPU that exited.
    fn vcpu_index(&self) -> u32;
    /// Guest console output.
    fn console(&mut self, bytes: &[u8]);
    /// A filtered `wrmsr`; `Err` → #GP.
    fn msr_write(&mut self, index: u32, value: u64) -> Result<(), MsrRefused>;
    /// A filtered `rdmsr`; `Err` → #GP.
    fn msr_read(&mut self, index: u32) -> Result<u64, MsrRefused>;
    /// Guest RIP, for fault reports (`None` when it cannot be read).
    fn rip(&mut self) -> Option<u64>;
}

/// Decides what to do about one exit.
pub fn handle_exit(exit: Exit, ctx: &mut dyn ExitContext) -> ExitAction {
    let resume = ExitAction::Resume(Reply::None);
    match exit {
        Exit::IoOut {
            port: port::CONSOLE,
            data,
        } => {
            ctx.console(&data[..1.min(data.len())]);
            resume
        }
        Exit::IoOut {
            port: port::EXIT,
            data,
        } => ExitAction::Done(le_u32(&data)),
        Exit::IoOut {
            port: port::SNAPSHOT,
            data,
        } => ExitAction::Snapshot(le_u32(&data)),
        Exit::IoOut { port, data } => {
            tracing::debug!(port, ?data, "out to an unknown port ignored");
            resume
        }
        Exit::IoIn { port, size } => {
            tracing::debug!(port, size, "in from an unknown port reads all ones");
            ExitAction::Resume(Reply::IoIn(u32::MAX))
        }
        Exit::WrMsr { index, data } => match ctx.msr_write(index, data) {
            Ok(()) => ExitAction::Resume(Reply::Msr {
                error: false,
                data: 0,
            }),
            Err(MsrRefused(why)) => {
                tracing::debug!(msr = format_args!("{index:#x}"), value = format_args!("{data:#x}"), %why, "wrmsr → #GP");
                ExitAction::Resume(Reply::Msr {
                    error: true,
                    data: 0,
                })
            }
        },
        Exit::RdMsr { index } => match ctx.msr_read(index) {
            Ok(data) => ExitAction::Resume(Reply::Msr { error: false, data }),
            Err(MsrRefused(why)) => {
                tracing::debug!(msr = format_args!("{index:#x}"), %why, "rdmsr → #GP");
                ExitAction::Resume(Reply::Msr {
                    error: true,
                    data: 0,
                })
            }
        },
        Exit::Interrupted | Exit::WindowOpen | Exit::Hlt => resume,
        Exit::Shutdown => fatal(
            ctx,
            "KVM_EXIT_SHUTDOWN (triple fault: an exception the guest could not handle)".into(),
        ),
        Exit::InternalError { suberror, data } => {
            let what = match suberror {
                1 => " (emulation failure: an instruction KVM cannot emulate at CPL 0)",
                2 => " (simultaneous exceptions)",
                3 => " (delivery event via a non-present descriptor)",
                _ => "",
            };
            fatal(
                ctx,
                format!("KVM_EXIT_INTERNAL_ERROR suberror {suberror}{what}, data {data:x?}"),
            )
        }
        Exit::FailEntry { reason } => fatal(
            ctx,
            format!("KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}"),
        ),
        Exit::Mmio { addr, write } => fatal(
            ctx,
            format!(
                "MMIO {} at {addr:#x}, outside RAM and every device",
                if write { "write" } else { "read" }
            ),
        ),
        Exit::SystemEvent { kind } => fatal(ctx, format!("KVM_EXIT_SYSTEM_EVENT type {kind}")),
        Exit::Other(name) => fatal(ctx, format!("unexpected exit {name}")),
    }
}

fn fatal(ctx: &mut dyn ExitContext, reason: String) -> ExitAction {
    ExitAction::Fatal(GuestFault {
        vcpu: ctx.vcpu_index(),
        reason,
        rip: ctx.rip(),
    })
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        console: Vec<u8>,
        writes: Vec<(u32, u64)>,
        rip: Option<u64>,
    }

    const GOOD_MSR: u32 = 0x4b56_4d02;

    impl ExitContext for Fake {
        fn vcpu_index(&self) -> u32 {
            2
        }
        fn console(&mut self, bytes: &[u8]) {
            self.console.extend_from_slice(bytes);
        }
        fn msr_write(&mut self, index: u32, value: u64) -> Result<(), MsrRefused> {
            self.writes.push((index, value));
            if index == GOOD_MSR && value & 0x3e == 0 {
                Ok(())
            } else {
                Err(MsrRefused("reserved bits".into()))
            }
        }
        fn msr_read(&mut self, index: u32) -> Result<u64, MsrRefused> {
            if index == GOOD_MSR {
                Ok(0x7100 | 1)
            } else {
                Err(MsrRefused("no such MSR".into()))
            }
        }
        fn rip(&mut self) -> Option<u64> {
            self.rip
        }
    }

    #[test]
    fn console_bytes_go_to_the_console() {
        let mut f = Fake::default();
        for b in b"hi\n" {
            let a = handle_exit(
                Exit::IoOut {
                    port: port::CONSOLE,
                    data: vec![*b],
                },
                &mut f,
            );
            assert_eq!(a, ExitAction::Resume(Reply::None));
        }
        assert_eq!(f.console, b"hi\n");
    }

    #[test]
    fn exit_port_ends_the_run_with_the_status() {
        let mut f = Fake::default();
        let a = handle_exit(
            Exit::IoOut {
                port: port::EXIT,
                data: 3u32.to_le_bytes().to_vec(),
            },
            &mut f,
        );
        assert_eq!(a, ExitAction::Done(3));
        let a = handle_exit(
            Exit::IoOut {
                port: port::EXIT,
                data: vec![0],
            },
            &mut f,
        );
        assert_eq!(a, ExitAction::Done(0));
    }

    #[test]
    fn snapshot_port_asks_for_a_snapshot() {
        let mut f = Fake::default();
        let a = handle_exit(
            Exit::IoOut {
                port: port::SNAPSHOT,
                data: 7u32.to_le_bytes().to_vec(),
            },
            &mut f,
        );
        assert_eq!(a, ExitAction::Snapshot(7));
    }

    #[test]
    fn valid_msr_write_resumes_without_error() {
        let mut f = Fake::default();
        let a = handle_exit(
            Exit::WrMsr {
                index: GOOD_MSR,
                data: 0x7100 | 1,
            },
            &mut f,
        );
        assert_eq!(
            a,
            ExitAction::Resume(Reply::Msr {
                error: false,
                data: 0
            })
        );
        assert_eq!(f.writes, [(GOOD_MSR, 0x7101)]);
    }

    #[test]
    fn invalid_msr_write_is_answered_with_gp() {
        let mut f = Fake::default();
        let a = handle_exit(
            Exit::WrMsr {
                index: GOOD_MSR,
                data: 0x7100 | 3,
            },
            &mut f,
        );
        assert_eq!(
            a,
            ExitAction::Resume(Reply::Msr {
                error: true,
                data: 0
            })
        );
        let a = handle_exit(
            Exit::WrMsr {
                index: 0x4b56_4d06,
                data: 0xf3,
            },
            &mut f,
        );
        assert_eq!(
            a,
            ExitAction::Resume(Reply::Msr {
                error: true,
                data: 0
            })
        );
    }

    #[test]
    fn msr_read_returns_the_value_or_gp() {
        let mut f = Fake::default();
        let a = handle_exit(Exit::RdMsr { index: GOOD_MSR }, &mut f);
        assert_eq!(
            a,
            ExitAction::Resume(Reply::Msr {
                error: false,
                data: 0x7101
            })
        );
        let a = handle_exit(Exit::RdMsr { index: 0x4b56_4d07 }, &mut f);
        assert_eq!(
            a,
            ExitAction::Resume(Reply::Msr {
                error: true,
                data: 0
            })
        );
    }

    #[test]
    fn unknown_ports_are_ignored_and_read_as_ones() {
        let mut f = Fake::default();
        assert_eq!(
            handle_exit(
                Exit::IoOut {
                    port: 0x80,
                    data: vec![1]
                },
                &mut f
            ),
            ExitAction::Resume(Reply::None)
        );
        assert_eq!(
            handle_exit(
                Exit::IoIn {
                    port: 0x60,
                    size: 1
                },
                &mut f
            ),
            ExitAction::Resume(Reply::IoIn(u32::MAX))
        );
        assert!(f.console.is_empty());
    }

    #[test]
    fn interrupted_window_and_hlt_resume() {
        let mut f = Fake::default();
        assert_eq!(
            handle_exit(Exit::Interrupted, &mut f),
            ExitAction::Resume(Reply::None)
        );
        assert_eq!(
            handle_exit(Exit::WindowOpen, &mut f),
            ExitAction::Resume(Reply::None)
        );
        assert_eq!(
            handle_exit(Exit::Hlt, &mut f),
            ExitAction::Resume(Reply::None)
        );
    }

    #[test]
    fn shutdown_is_fatal_with_rip() {
        let mut f = Fake {
            rip: Some(0x20_0010),
            ..Fake::default()
        };
        let ExitAction::Fatal(fault) = handle_exit(Exit::Shutdown, &mut f) else {
            panic!("not fatal")
        };
        assert_eq!(fault.vcpu, 2);
        assert_eq!(fault.rip, Some(0x20_0010));
        let msg = fault.to_string();
        assert!(
            msg.contains("KVM_EXIT_SHUTDOWN") && msg.contains("0x200010"),
            "{msg}"
        );
    }

    #[test]
    fn internal_error_is_fatal_and_explained() {
        let mut f = Fake {
            rip: Some(0x20_1234),
            ..Fake::default()
        };
        let a = handle_exit(
            Exit::InternalError {
                suberror: 1,
                data: vec![0xcc],
            },
            &mut f,
        );
        let ExitAction::Fatal(fault) = a else {
            panic!("not fatal")
        };
        assert!(
            fault.reason.contains("emulation failure"),
            "{}",
            fault.reason
        );
        assert!(fault.to_string().contains("0x201234"));
    }

    #[test]
    fn other_exits_are_fatal_even_without_rip() {
        let mut f = Fake::default();
        for exit in [
            Exit::FailEntry { reason: 0x21 },
            Exit::Mmio {
                addr: 0xd000_0000,
                write: true,
            },
            Exit::SystemEvent { kind: 1 },
            Exit::Other("KVM_EXIT_DEBUG"),
        ] {
            let ExitAction::Fatal(fault) = handle_exit(exit, &mut f) else {
                panic!("not fatal")
            };
            assert!(fault.to_string().contains("RIP unavailable"));
        }
    }
}
