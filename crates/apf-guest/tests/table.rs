//! One test per rule of the sleeper table (see the crate documentation).

use apf_abi::Token;
use apf_guest::{Entry, SleeperTable, WaitOutcome, WakeAllOutcome, WakeOutcome};

fn tok(raw: u32) -> Token {
    Token::new(raw).unwrap()
}

type Table = SleeperTable<u32, 4>;

#[test]
fn wait_registers_a_sleeper_and_wake_returns_it() {
    let mut t = Table::new();
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Sleep);
    assert_eq!(
        t.get(tok(1)),
        Some(Entry::Sleeper {
            token: tok(1),
            task: 10
        })
    );
    assert!(t.is_sleeping(10));
    assert_eq!((t.len(), t.sleepers(), t.dummies()), (1, 1, 0));
    assert_eq!(t.wake(tok(1)), WakeOutcome::Woken(10));
    assert!(!t.is_sleeping(10));
    assert!(t.is_empty());
}

#[test]
fn wake_picks_the_sleeper_of_that_token_only() {
    let mut t = Table::new();
    for (raw, task) in [(1, 10), (2, 20), (3, 30)] {
        assert_eq!(t.wait(tok(raw), task), WaitOutcome::Sleep);
    }
    assert_eq!(t.wake(tok(2)), WakeOutcome::Woken(20));
    assert!(t.is_sleeping(10) && !t.is_sleeping(20) && t.is_sleeping(30));
    assert_eq!(t.wake(tok(1)), WakeOutcome::Woken(10));
    assert_eq!(t.wake(tok(3)), WakeOutcome::Woken(30));
    assert!(t.is_empty());
}

#[test]
fn wake_before_wait_records_a_dummy_that_the_wait_consumes() {
    let mut t = Table::new();
    assert_eq!(t.wake(tok(5)), WakeOutcome::DummyRecorded);
    assert_eq!(t.get(tok(5)), Some(Entry::Dummy(tok(5))));
    assert_eq!((t.sleepers(), t.dummies()), (0, 1));
    // The task must not sleep: its page is already there.
    assert_eq!(t.wait(tok(5), 50), WaitOutcome::Retry);
    assert!(!t.is_sleeping(50));
    assert!(t.is_empty());
    // The dummy was consumed: a later wait on the same token sleeps.
    assert_eq!(t.wait(tok(5), 51), WaitOutcome::Sleep);
}

#[test]
fn a_second_page_ready_before_the_wait_keeps_one_dummy() {
    let mut t = Table::new();
    assert_eq!(t.wake(tok(5)), WakeOutcome::DummyRecorded);
    assert_eq!(t.wake(tok(5)), WakeOutcome::AlreadyRecorded);
    assert_eq!((t.len(), t.dummies()), (1, 1));
    assert_eq!(t.wait(tok(5), 50), WaitOutcome::Retry);
    assert!(t.is_empty());
}

#[test]
fn duplicate_wait_on_a_sleeping_token_changes_nothing() {
    let mut t = Table::new();
    assert_eq!(t.wait(tok(7), 70), WaitOutcome::Sleep);
    assert_eq!(t.wait(tok(7), 71), WaitOutcome::DuplicateToken);
    assert!(!t.is_sleeping(71));
    assert_eq!((t.len(), t.sleepers()), (1, 1));
    // The first sleeper is still the one the page-ready wakes, and only once.
    assert_eq!(t.wake(tok(7)), WakeOutcome::Woken(70));
    assert_eq!(t.wake(tok(7)), WakeOutcome::DummyRecorded);
}

#[test]
fn the_broadcast_token_is_refused_by_wait_and_wake() {
    let mut t = Table::new();
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Sleep);
    assert_eq!(t.wait(Token::WAKE_ALL, 11), WaitOutcome::Broadcast);
    assert_eq!(t.wake(Token::WAKE_ALL), WakeOutcome::Broadcast);
    assert!(t.is_sleeping(10) && !t.is_sleeping(11));
    assert_eq!(t.len(), 1);
}

#[test]
fn wake_all_wakes_every_sleeper_and_clears_every_dummy() {
    let mut t = Table::new();
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Sleep);
    assert_eq!(t.wake(tok(2)), WakeOutcome::DummyRecorded);
    assert_eq!(t.wait(tok(3), 30), WaitOutcome::Sleep);
    let mut woken = Vec::new();
    let out = t.wake_all(|task| woken.push(task));
    woken.sort_unstable();
    assert_eq!(woken, [10, 30]);
    assert_eq!(
        out,
        WakeAllOutcome {
            woken: 2,
            dummies_cleared: 1
        }
    );
    assert!(t.is_empty());
    // The cleared dummy no longer covers its token: a wait on it sleeps.
    assert_eq!(t.wait(tok(2), 20), WaitOutcome::Sleep);
}

#[test]
fn wake_all_on_an_empty_table_does_nothing() {
    let mut t = Table::new();
    let out = t.wake_all(|_| panic!("no sleeper to wake"));
    assert_eq!(out, WakeAllOutcome::default());
}

#[test]
fn wake_of_an_unknown_token_after_wake_all_records_a_dummy() {
    let mut t = Table::new();
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Sleep);
    let _ = t.wake_all(|_| {});
    // A late individual page-ready for the token wake-all covered: no sleeper left, so it is
    // kept as a dummy; at worst a later waiter on a reused token retries once.
    assert_eq!(t.wake(tok(1)), WakeOutcome::DummyRecorded);
    assert_eq!(t.wait(tok(1), 11), WaitOutcome::Retry);
    assert!(t.is_empty());
}

#[test]
fn a_full_table_answers_full_and_stays_intact() {
    let mut t = Table::new();
    for raw in 1..=4 {
        assert_eq!(t.wait(tok(raw), raw * 10), WaitOutcome::Sleep);
    }
    assert!(t.is_full());
    assert_eq!(t.wait(tok(5), 50), WaitOutcome::Full);
    assert!(!t.is_sleeping(50));
    assert_eq!(t.len(), 4);
    for raw in 1..=4 {
        assert_eq!(
            t.get(tok(raw)),
            Some(Entry::Sleeper {
                token: tok(raw),
                task: raw * 10
            })
        );
    }
}

#[test]
fn a_full_table_still_finds_dummies_and_sleepers() {
    // Full only refuses new entries: consuming a dummy or waking a sleeper still works.
    let mut t = Table::new();
    assert_eq!(t.wake(tok(1)), WakeOutcome::DummyRecorded);
    for raw in 2..=4 {
        assert_eq!(t.wait(tok(raw), raw * 10), WaitOutcome::Sleep);
    }
    assert!(t.is_full());
    assert_eq!(t.wait(tok(3), 31), WaitOutcome::DuplicateToken);
    assert_eq!(t.wake(tok(1)), WakeOutcome::AlreadyRecorded);
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Retry);
    assert_eq!(t.wake(tok(2)), WakeOutcome::Woken(20));
    assert_eq!(t.len(), 2);
}

#[test]
fn a_full_table_drops_a_new_dummy() {
    let mut t = Table::new();
    for raw in 1..=4 {
        assert_eq!(t.wake(tok(raw)), WakeOutcome::DummyRecorded);
    }
    assert_eq!(t.wake(tok(5)), WakeOutcome::DummyDropped);
    assert_eq!(t.get(tok(5)), None);
    assert_eq!((t.len(), t.dummies()), (4, 4));
    // The consequence: that token's wakeup is lost, its waiter sleeps (once room is back)...
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Retry);
    assert_eq!(t.wait(tok(5), 50), WaitOutcome::Sleep);
    // ...until a wake-all.
    let mut woken = Vec::new();
    let _ = t.wake_all(|task| woken.push(task));
    assert_eq!(woken, [50]);
}

#[test]
fn freed_entries_are_reused() {
    let mut t = Table::new();
    for round in 0..10u32 {
        for raw in 1..=4 {
            assert_eq!(
                t.wait(tok(round * 4 + raw), raw),
                WaitOutcome::Sleep,
                "round {round}"
            );
        }
        assert!(t.is_full());
        // Remove from the middle first, to exercise the swap into the hole.
        for raw in [2, 4, 1, 3] {
            assert_eq!(t.wake(tok(round * 4 + raw)), WakeOutcome::Woken(raw));
        }
        assert!(t.is_empty());
    }
}

#[test]
fn removal_from_the_middle_keeps_every_other_entry() {
    let mut t = Table::new();
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Sleep);
    assert_eq!(t.wake(tok(2)), WakeOutcome::DummyRecorded);
    assert_eq!(t.wait(tok(3), 30), WaitOutcome::Sleep);
    assert_eq!(t.wait(tok(2), 20), WaitOutcome::Retry);
    let mut entries: Vec<_> = t.iter().collect();
    entries.sort_unstable_by_key(Entry::token);
    assert_eq!(
        entries,
        [
            Entry::Sleeper {
                token: tok(1),
                task: 10
            },
            Entry::Sleeper {
                token: tok(3),
                task: 30
            }
        ]
    );
    let mut sleepers: Vec<_> = t.iter_sleepers().collect();
    sleepers.sort_unstable();
    assert_eq!(sleepers, [(tok(1), 10), (tok(3), 30)]);
}

#[test]
fn a_zero_capacity_table_refuses_everything_without_panicking() {
    let mut t: SleeperTable<u32, 0> = SleeperTable::new();
    assert!(t.is_full() && t.is_empty());
    assert_eq!(t.wait(tok(1), 10), WaitOutcome::Full);
    assert_eq!(t.wake(tok(1)), WakeOutcome::DummyDropped);
    assert_eq!(t.wake_all(|_| {}), WakeAllOutcome::default());
}

#[test]
fn a_table_can_live_in_a_static_initialiser() {
    static EMPTY: SleeperTable<u32, 128> = SleeperTable::new();
    assert_eq!(SleeperTable::<u32, 128>::CAPACITY, 128);
    assert!(EMPTY.is_empty());
    let d: SleeperTable<u32, 2> = SleeperTable::default();
    assert_eq!(d.len(), 0);
}
