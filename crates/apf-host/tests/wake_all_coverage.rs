//! Issue 15: a wake-all covers the tokens outstanding when it is delivered, not when it was
//! queued. The scenario that found it (a lazy restore of a v1 guest whose first faults reach
//! the engine before the restore's wake-all), run through the coupled guest of `common`, and
//! the two checks the property and model tests rely on, shown to fail when they should.

mod common;

use apf_abi::{Token, Version};
use apf_guest::WaitOutcome;
use apf_guest::reason::Ready;
use common::Event::{Arrive, Enter, Irq, Restore, Touch, Window};
use common::{Flavor, World};

fn restored(version: Version) -> World {
    // One task on vCPU 0 touching page 0, one touching page 1.
    let tasks = [(0, vec![0]), (0, vec![1])];
    let mut w = World::new(version, 1, 2, &tasks);
    w.enable(0, false).unwrap();
    for ev in [
        Window(0, Flavor::User),
        Enter(0),
        Irq(0),
        common::Event::Ack(0),
    ] {
        w.apply(ev).unwrap();
    }
    // Snapshot and restore: a fresh engine whose enable path queued a wake-all.
    w.apply(Restore).unwrap();
    assert!(w.engine.wake_all_pending(0));
    w
}

#[test]
fn first_faults_after_a_restore_are_covered_by_its_wake_all() {
    for version in [Version::V1, Version::V2] {
        let mut w = restored(version);
        // Both tasks fault before the wake-all goes out; both sleep.
        for ev in [
            Touch(0, Flavor::User),
            Enter(0),
            Touch(0, Flavor::User),
            Enter(0),
        ] {
            assert!(w.apply(ev).unwrap(), "{version:?} {ev:?}");
        }
        assert_eq!(w.guest.table.sleepers(), 2, "{version:?}");
        // Page 0 arrives first: its token is ready when the wake-all goes out.
        w.apply(Arrive(0)).unwrap();
        w.apply(Window(0, Flavor::User)).unwrap();
        assert_eq!(w.stats.covered, 2, "{version:?}");
        assert_eq!(w.engine.counters().dropped.wake_all, 2, "{version:?}");
        for ev in [Enter(0), Irq(0), Arrive(1)] {
            w.apply(ev).unwrap();
        }
        assert_eq!(
            w.guest.table.sleepers(),
            0,
            "{version:?}: the wake-all woke both"
        );
        assert!(
            !w.engine.pending_delivery(0),
            "{version:?}: no individual ready"
        );
        w.complete().unwrap();
        assert_eq!(w.stats.readies, 0, "{version:?}");
    }
}

#[test]
fn the_checker_refuses_a_ready_for_a_covered_token() {
    let mut w = World::new(Version::V1, 2, 1, &[(0, vec![0])]);
    w.outstanding.insert(0x1000, 0);
    w.outstanding.insert(0x1001, 1);
    w.retire_ready(0xffff_ffff, 0).unwrap();
    let err = w.retire_ready(0x1000, 0).unwrap_err();
    assert!(err.contains("both a covering wake-all"), "{err}");
    // vCPU 1's token was not covered by vCPU 0's wake-all.
    w.retire_ready(0x1001, 1).unwrap();
}

#[test]
fn the_checker_refuses_a_ready_for_a_token_whose_task_a_wake_all_woke() {
    let mut w = World::new(Version::V2, 2, 1, &[(0, vec![0]), (1, vec![0])]);
    let t = Token::new(0x1000).unwrap();
    assert_eq!(w.guest.table.wait(t, 0), WaitOutcome::Sleep);
    w.outstanding.insert(0x1000, 0);
    // vCPU 1's wake-all wakes task 0 too, but task 0 is vCPU 0's: its ready is still due.
    let mut other = w.clone();
    other.ready(1, Ready::WakeAll).unwrap();
    other.retire_ready(0x1000, 0).unwrap();
    // A later wake-all of vCPU 0 that covers the token settles it.
    let mut covered = w.clone();
    covered.ready(0, Ready::WakeAll).unwrap();
    covered.retire_ready(0xffff_ffff, 0).unwrap();
    assert!(covered.outstanding.is_empty() && covered.woken_by_wake_all.is_empty());
    // vCPU 0's wake-all woke its own task; the host then sends 0x1000 its ready too.
    w.ready(0, Ready::WakeAll).unwrap();
    let err = w.retire_ready(0x1000, 0).unwrap_err();
    assert!(err.contains("woke its task"), "{err}");
}
