//! The sleeper table: tasks asleep on a token, and dummies for page-readies that came first.
//!
//! Storage is a fixed array kept compact: `slots[..len]` hold the live entries in no
//! particular order, the rest are free. Every operation is one scan of the live prefix (no
//! hashing, no allocation, no floating point), and removal swaps the last live entry into the
//! hole. Invariant: a token appears at most once among the live entries, as a sleeper or as a
//! dummy, never both; so `wake` returns at most one task.

use apf_abi::Token;

/// One live entry, as [`SleeperTable::get`] and [`SleeperTable::iter`] report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry<T> {
    /// `task` sleeps until "page ready" for `token`.
    Sleeper {
        /// The token from the "page not present".
        token: Token,
        /// The guest's handle for the sleeping task.
        task: T,
    },
    /// "Page ready" for this token came before its task slept (§5: the wake-before-wait race);
    /// the task's [`SleeperTable::wait`] will consume it and not sleep.
    Dummy(Token),
}

impl<T> Entry<T> {
    /// The token of this entry.
    pub const fn token(&self) -> Token {
        match self {
            Entry::Sleeper { token, .. } | Entry::Dummy(token) => *token,
        }
    }
}

/// The answer to [`SleeperTable::wait`]: what the #PF handler does with the current task.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaitOutcome {
    /// Registered: put the task to sleep and run another; a `wake` or `wake_all` returns it.
    Sleep,
    /// A dummy for this token was waiting (its page-ready came first) and is now consumed:
    /// do not sleep, return from the #PF so the task retries the access now.
    Retry,
    /// No free entry. The table is unchanged and the task must not sleep here: fall back,
    /// e.g. return from the #PF so the task retries the access (the host then sees a second
    /// fault on an in-flight page and waits or issues a new token). Never happens with a
    /// correct host when the capacity is at least the number of tasks that can fault.
    Full,
    /// The token already has a sleeper. The table is unchanged; fall back as for `Full`.
    /// Not only a host bug: after a restore, the host may hand out a token that a task left
    /// asleep from before still holds, ahead of the enable path's wake-all. Either way the
    /// next page-ready for the token (or the wake-all) wakes the old sleeper, which retries.
    DuplicateToken,
    /// [`Token::WAKE_ALL`] never names a fault; refused, table unchanged. Treat as a host bug.
    Broadcast,
}

/// The answer to [`SleeperTable::wake`], for an individual page-ready.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WakeOutcome<T> {
    /// This task slept on the token and is removed: make it runnable; it retries the access.
    Woken(T),
    /// Nobody slept on the token yet: a dummy is recorded for the task that will.
    DummyRecorded,
    /// A dummy for the token was already recorded (a second page-ready for it before anyone
    /// waited: a host bug). Nothing changed; the one dummy still covers the next waiter.
    AlreadyRecorded,
    /// Nobody slept on the token and the table is full, so no dummy could be recorded. If a
    /// task still has to `wait` on this token, that wakeup is lost: the task will sleep until
    /// a wake-all. Never happens with a correct host when the capacity is at least the number
    /// of tasks that can fault; a kernel that sees it should count it loudly.
    DummyDropped,
    /// [`Token::WAKE_ALL`] is the broadcast: refused, table unchanged. Call
    /// [`SleeperTable::wake_all`] (or route through [`crate::reason::Ready`]).
    Broadcast,
}

/// The answer to [`SleeperTable::wake_all`].
#[must_use]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WakeAllOutcome {
    /// Sleepers handed to the callback.
    pub woken: usize,
    /// Dummies discarded.
    pub dummies_cleared: usize,
}

#[derive(Clone, Copy, Debug)]
enum Slot<T> {
    Free,
    Sleeper(Token, T),
    Dummy(Token),
}

impl<T: Copy> Slot<T> {
    fn token(&self) -> Option<Token> {
        match self {
            Slot::Free => None,
            Slot::Sleeper(token, _) | Slot::Dummy(token) => Some(*token),
        }
    }

    fn entry(&self) -> Option<Entry<T>> {
        match *self {
            Slot::Free => None,
            Slot::Sleeper(token, task) => Some(Entry::Sleeper { token, task }),
            Slot::Dummy(token) => Some(Entry::Dummy(token)),
        }
    }
}

/// A fixed-capacity table of tasks sleeping on APF tokens, with wake-before-wait dummies.
///
/// `T` is the guest's handle for a task (an index, a pointer-sized id); `N` the capacity,
/// shared by sleepers and dummies. See the crate documentation for the rules.
#[derive(Clone, Debug)]
pub struct SleeperTable<T, const N: usize> {
    /// `slots[..len]` are live (never `Free`); `slots[len..]` are `Free`.
    slots: [Slot<T>; N],
    len: usize,
}

impl<T: Copy, const N: usize> Default for SleeperTable<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy, const N: usize> SleeperTable<T, N> {
    /// The capacity, shared by sleepers and dummies.
    pub const CAPACITY: usize = N;

    /// An empty table (usable in a `static`).
    pub const fn new() -> Self {
        SleeperTable {
            slots: [Slot::Free; N],
            len: 0,
        }
    }

    /// Live entries: sleepers plus dummies.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// No sleeper and no dummy.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// No free entry: `wait` would answer `Full`, a new dummy would be dropped.
    pub const fn is_full(&self) -> bool {
        self.len >= N
    }

    /// Number of sleeping tasks.
    pub fn sleepers(&self) -> usize {
        self.len - self.dummies()
    }

    /// Number of dummies (page-readies waiting for their task).
    pub fn dummies(&self) -> usize {
        self.live()
            .iter()
            .filter(|s| matches!(s, Slot::Dummy(_)))
            .count()
    }

    /// The entry for `token`, if any.
    pub fn get(&self, token: Token) -> Option<Entry<T>> {
        self.live()
            .iter()
            .find(|s| s.token() == Some(token))
            .and_then(Slot::entry)
    }

    /// Every live entry, in no particular order (for debugging and tests).
    pub fn iter(&self) -> impl Iterator<Item = Entry<T>> + '_ {
        self.live().iter().filter_map(Slot::entry)
    }

    /// Every sleeper as `(token, task)`, in no particular order.
    pub fn iter_sleepers(&self) -> impl Iterator<Item = (Token, T)> + '_ {
        self.live().iter().filter_map(|s| match *s {
            Slot::Sleeper(token, task) => Some((token, task)),
            _ => None,
        })
    }

    /// A "page not present" with `token` arrived for `task` (the current task): should it
    /// sleep? See [`WaitOutcome`] for each answer; only `Sleep` changes nothing but adding
    /// the sleeper, only `Retry` removes an entry (the dummy).
    pub fn wait(&mut self, token: Token, task: T) -> WaitOutcome {
        if token.is_wake_all() {
            return WaitOutcome::Broadcast;
        }
        match self.position(token) {
            // §5: "when the task then goes to sleep on T it finds the dummy, removes it and
            // does not sleep".
            Some((i, Slot::Dummy(_))) => {
                self.remove(i);
                WaitOutcome::Retry
            }
            Some(_) => WaitOutcome::DuplicateToken,
            None => match self.slots.get_mut(self.len) {
                Some(slot) => {
                    *slot = Slot::Sleeper(token, task);
                    self.len += 1;
                    WaitOutcome::Sleep
                }
                None => WaitOutcome::Full,
            },
        }
    }

    /// An individual "page ready" for `token`: wake its sleeper, or record a dummy (§5: "if
    /// page ready for token T arrives before the faulting task slept on T, the guest records
    /// a dummy entry for T"). See [`WakeOutcome`] for each answer.
    pub fn wake(&mut self, token: Token) -> WakeOutcome<T> {
        if token.is_wake_all() {
            return WakeOutcome::Broadcast;
        }
        match self.position(token) {
            Some((i, Slot::Sleeper(_, task))) => {
                self.remove(i);
                WakeOutcome::Woken(task)
            }
            Some(_) => WakeOutcome::AlreadyRecorded,
            None => match self.slots.get_mut(self.len) {
                Some(slot) => {
                    *slot = Slot::Dummy(token);
                    self.len += 1;
                    WakeOutcome::DummyRecorded
                }
                None => WakeOutcome::DummyDropped,
            },
        }
    }

    /// The broadcast (token 0xffffffff): "wake up every task waiting for any APF" (§2).
    ///
    /// Hands every sleeper to `wake` and clears every dummy, leaving the table empty, as
    /// Linux's `apf_task_wake_all` does: the broadcast says the host's earlier tokens are void
    /// ("no individual type 2 APFs will be sent for those"). Also the call for the guest's own
    /// use when it disables APF or is reset, so nobody sleeps on a token that will never come.
    pub fn wake_all(&mut self, mut wake: impl FnMut(T)) -> WakeAllOutcome {
        let mut out = WakeAllOutcome::default();
        for slot in self.slots.iter_mut().take(self.len) {
            match core::mem::replace(slot, Slot::Free) {
                Slot::Sleeper(_, task) => {
                    out.woken += 1;
                    wake(task);
                }
                Slot::Dummy(_) => out.dummies_cleared += 1,
                Slot::Free => {}
            }
        }
        self.len = 0;
        out
    }

    fn live(&self) -> &[Slot<T>] {
        self.slots.get(..self.len).unwrap_or_default()
    }

    fn position(&self, token: Token) -> Option<(usize, Slot<T>)> {
        self.live()
            .iter()
            .enumerate()
            .find(|(_, s)| s.token() == Some(token))
            .map(|(i, s)| (i, *s))
    }

    /// Removes live entry `i`, moving the last live entry into its place.
    fn remove(&mut self, i: usize) {
        let Some(last) = self.len.checked_sub(1) else {
            return;
        };
        if i > last {
            return;
        }
        if let Some(live) = self.slots.get_mut(..=last) {
            live.swap(i, last);
            if let Some(slot) = live.last_mut() {
                *slot = Slot::Free;
            }
            self.len = last;
        }
    }
}

impl<T: Copy + PartialEq, const N: usize> SleeperTable<T, N> {
    /// True if `task` sleeps on some token.
    pub fn is_sleeping(&self, task: T) -> bool {
        self.iter_sleepers().any(|(_, t)| t == task)
    }
}
