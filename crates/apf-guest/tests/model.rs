//! The sleeper table against a plain model built on std collections, over random operations.

use std::collections::BTreeMap;

use apf_abi::Token;
use apf_guest::{Entry, SleeperTable, WaitOutcome, WakeAllOutcome, WakeOutcome};
use proptest::prelude::*;

const CAP: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Op {
    Wait(u32, u8),
    Wake(u32),
    WakeAll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelEntry {
    Sleeper(u8),
    Dummy,
}

/// The rules, written the obvious way.
#[derive(Default)]
struct Model {
    entries: BTreeMap<Token, ModelEntry>,
}

impl Model {
    fn wait(&mut self, token: Token, task: u8) -> WaitOutcome {
        if token.is_wake_all() {
            return WaitOutcome::Broadcast;
        }
        match self.entries.get(&token) {
            Some(ModelEntry::Dummy) => {
                self.entries.remove(&token);
                WaitOutcome::Retry
            }
            Some(ModelEntry::Sleeper(_)) => WaitOutcome::DuplicateToken,
            None if self.entries.len() >= CAP => WaitOutcome::Full,
            None => {
                self.entries.insert(token, ModelEntry::Sleeper(task));
                WaitOutcome::Sleep
            }
        }
    }

    fn wake(&mut self, token: Token) -> WakeOutcome<u8> {
        if token.is_wake_all() {
            return WakeOutcome::Broadcast;
        }
        match self.entries.get(&token) {
            Some(ModelEntry::Sleeper(task)) => {
                let task = *task;
                self.entries.remove(&token);
                WakeOutcome::Woken(task)
            }
            Some(ModelEntry::Dummy) => WakeOutcome::AlreadyRecorded,
            None if self.entries.len() >= CAP => WakeOutcome::DummyDropped,
            None => {
                self.entries.insert(token, ModelEntry::Dummy);
                WakeOutcome::DummyRecorded
            }
        }
    }

    fn wake_all(&mut self) -> (Vec<u8>, WakeAllOutcome) {
        let mut woken: Vec<u8> = Vec::new();
        let mut out = WakeAllOutcome::default();
        for e in std::mem::take(&mut self.entries).into_values() {
            match e {
                ModelEntry::Sleeper(task) => {
                    woken.push(task);
                    out.woken += 1;
                }
                ModelEntry::Dummy => out.dummies_cleared += 1,
            }
        }
        woken.sort_unstable();
        (woken, out)
    }
}

fn token_raw() -> impl Strategy<Value = u32> {
    // A small token space, so tokens collide, plus the broadcast now and then.
    prop_oneof![12 => 1..=8u32, 1 => Just(u32::MAX)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (token_raw(), 0..6u8).prop_map(|(t, k)| Op::Wait(t, k)),
        8 => token_raw().prop_map(Op::Wake),
        1 => Just(Op::WakeAll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn table_matches_the_model(ops in proptest::collection::vec(op(), 1..200)) {
        let mut table: SleeperTable<u8, CAP> = SleeperTable::new();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Wait(raw, task) => {
                    let token = Token::new(raw).unwrap();
                    prop_assert_eq!(table.wait(token, task), model.wait(token, task), "{:?}", op);
                }
                Op::Wake(raw) => {
                    let token = Token::new(raw).unwrap();
                    prop_assert_eq!(table.wake(token), model.wake(token), "{:?}", op);
                }
                Op::WakeAll => {
                    let mut woken = Vec::new();
                    let out = table.wake_all(|t| woken.push(t));
                    woken.sort_unstable();
                    prop_assert_eq!((woken, out), model.wake_all());
                }
            }
            // The whole contents agree after every step, as do the counters.
            let mut entries: Vec<(Token, ModelEntry)> = table
                .iter()
                .map(|e| match e {
                    Entry::Sleeper { token, task } => (token, ModelEntry::Sleeper(task)),
                    Entry::Dummy(token) => (token, ModelEntry::Dummy),
                })
                .collect();
            entries.sort_unstable_by_key(|(t, _)| *t);
            let expected: Vec<_> = model.entries.iter().map(|(t, e)| (*t, *e)).collect();
            prop_assert_eq!(&entries, &expected);
            let dummies = expected.iter().filter(|(_, e)| *e == ModelEntry::Dummy).count();
            prop_assert_eq!(table.len(), expected.len());
            prop_assert_eq!(table.dummies(), dummies);
            prop_assert_eq!(table.sleepers(), expected.len() - dummies);
            prop_assert_eq!(table.is_full(), expected.len() == CAP);
            for raw in 1..=8 {
                let token = Token::new(raw).unwrap();
                let want = model.entries.get(&token).map(|e| match e {
                    ModelEntry::Sleeper(task) => Entry::Sleeper { token, task: *task },
                    ModelEntry::Dummy => Entry::Dummy(token),
                });
                prop_assert_eq!(table.get(token), want);
            }
            for task in 0..6u8 {
                let sleeping = expected.iter().any(|(_, e)| *e == ModelEntry::Sleeper(task));
                prop_assert_eq!(table.is_sleeping(task), sleeping);
            }
        }
    }
}
