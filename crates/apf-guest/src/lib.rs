//! The guest side of KVM's asynchronous page fault (APF) protocol (`docs/protocol.md`).
//!
//! `no_std`, no allocation, no floating point, no panics on what the host sends: the
//! project's guest kernel runs this at CPL 0, and the host engine's property tests couple
//! with it. Two pieces, both pure — the kernel reads and writes the area and schedules tasks:
//!
//! - [`reason`]: what a #PF means and what the v2 page-ready slot holds.
//! - [`SleeperTable`]: tasks asleep on tokens, with the wake-before-wait dummy (§5).
//!
//! # Public API
//! ```text
//! reason::classify(version: Version, reason_word: u32, cr2: u64) -> PfKind
//!     PfKind { Normal, NotPresent(Token), Ready(Ready), Invalid { reason: u32, cr2: u64 } }
//! reason::take_ready_token(slot: u32) -> Option<Ready>        // v2, None = slot free
//!     Ready { Page(Token), WakeAll };  Ready::from_token(Token) -> Ready
//! reason::SLOT_FREE: u32 = 0
//!
//! SleeperTable<T: Copy, const N: usize>
//!     const fn new() -> Self;  Default;  CAPACITY: usize = N
//!     fn wait(&mut self, token: Token, task: T) -> WaitOutcome
//!         WaitOutcome { Sleep, Retry, Full, DuplicateToken, Broadcast }
//!     fn wake(&mut self, token: Token) -> WakeOutcome<T>
//!         WakeOutcome<T> { Woken(T), DummyRecorded, AlreadyRecorded, DummyDropped, Broadcast }
//!     fn wake_all(&mut self, wake: impl FnMut(T)) -> WakeAllOutcome { woken, dummies_cleared }
//!     fn len / is_empty / is_full / sleepers / dummies
//!     fn get(&self, Token) -> Option<Entry<T>>     Entry<T> { Sleeper { token, task }, Dummy(Token) }
//!     fn iter(&self) -> impl Iterator<Item = Entry<T>>
//!     fn iter_sleepers(&self) -> impl Iterator<Item = (Token, T)>
//!     fn is_sleeping(&self, task: T) -> bool       // T: PartialEq
//! ```
//!
//! # How a kernel uses it
//! ```
//! use apf_abi::{Token, Version};
//! use apf_guest::reason::{self, PfKind, Ready};
//! use apf_guest::{SleeperTable, WaitOutcome, WakeOutcome};
//!
//! let mut table: SleeperTable<u16, 64> = SleeperTable::new();
//! let current_task = 7u16;
//! // #PF handler: reason word already read and reset to 0, CR2 read.
//! match reason::classify(Version::V1, 1, 0x1001) {
//!     PfKind::NotPresent(token) => match table.wait(token, current_task) {
//!         WaitOutcome::Sleep => { /* block current_task, schedule another */ }
//!         _ => { /* do not sleep: return, the task retries the access */ }
//!     },
//!     PfKind::Ready(Ready::Page(token)) => match table.wake(token) {
//!         WakeOutcome::Woken(task) => { /* make task runnable */ }
//!         _ => { /* dummy recorded, or a count for the rare answers */ }
//!     },
//!     PfKind::Ready(Ready::WakeAll) => { let _ = table.wake_all(|task| { /* runnable */ }); }
//!     PfKind::Normal => { /* an ordinary page fault */ }
//!     PfKind::Invalid { .. } => { /* host bug: count it */ }
//! }
//! assert!(table.is_sleeping(7));
//! assert_eq!(table.wake(Token::new(0x1001).unwrap()), WakeOutcome::Woken(7));
//! ```
//!
//! # Decisions
//! - **One entry per token.** A token is a sleeper or a dummy, never both, never twice.
//!   `wait` on a token that already has a sleeper answers `DuplicateToken` and changes
//!   nothing (the new task does not sleep: it retries the access); so `wake` wakes at most one.
//! - **Full.** Sleepers and dummies share the `N` entries. `wait` answers `Full` (the task
//!   must not sleep here; retrying the access is the simple fallback) and `wake` answers
//!   `DummyDropped` (that token's wakeup is lost until a wake-all). Neither can happen with a
//!   correct host if `N` is at least the number of tasks that can take an APF: each task holds
//!   at most one entry at a time — its sleeper, or the dummy for its one pending token.
//! - **Broadcast.** [`Token::WAKE_ALL`](apf_abi::Token::WAKE_ALL) is refused by `wait` and
//!   `wake` (`Broadcast`, table unchanged); [`reason::Ready`] routes it to `wake_all`, which
//!   wakes every sleeper and clears every dummy (as Linux's `apf_task_wake_all`, but for
//!   the whole table, not only the current CPU's entries: waking too many is safe, each
//!   woken task just retries its access).
//! - **Stale dummies are harmless, lost ones are not.** A dummy left for a token the host
//!   later reuses only makes that waiter retry its access once (it faults again and gets a
//!   fresh token); every answer other than `Sleep` ends in such a retry, so the table errs on
//!   the side of spurious retries, never of sleeping forever — with one exception the kernel
//!   must prevent: a wake-all that runs between a task's "not present" and its `wait` clears
//!   a dummy that task needed (or finds nothing to wake). Call `wait` in the #PF handler
//!   itself, with IF = 0 as the interrupt gate leaves it, under the table's lock.
//! - **Cost.** Each call scans the live entries once (`O(len)`, no hashing); removal moves
//!   the last entry into the hole. Meant for `N` of 64–256.
#![no_std]

pub mod reason;
mod sleepers;

pub use sleepers::{Entry, SleeperTable, WaitOutcome, WakeAllOutcome, WakeOutcome};
