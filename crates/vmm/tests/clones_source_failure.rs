//! The memory source of clones failing mid-restore (`qemu-nbd` killed, never back, a 1 s
//! deadline): every clone stops with the same error, and nothing is left behind — no thread
//! and no file descriptor more than before (the shared cache's memfd, the clones' KVM fds
//! and userfaultfds, the NBD connections: all closed). Alone in its test binary, so that the
//! process's threads and fds are this test's. Prints `SKIPPED: …` and passes where KVM or
//! qemu-nbd is missing.

use std::time::{Duration, Instant};

use harness::qemu_nbd::Server;
use testkit::fixture::{manifest_only, restore_options, standard_snapshot};
use vmm::clones::{CloneOptions, restore_clones};
use vmm::source::SourceOptions;
use vmm::{ApfMode, ApfPath, NoObserver};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

#[test]
fn a_source_that_fails_stops_every_clone_with_the_same_error_and_leaves_nothing() {
    if !testkit::require_kvm() || !testkit::require_qemu_nbd() {
        return;
    }
    let dir = testkit::scratch("clones-failure", "nbd");
    let snap = standard_snapshot(ApfMode::V2);
    let remote = manifest_only(snap, &dir.join("manifest-only"));
    let mut server = Server::start(&snap.join("memory.raw"), &dir.join("nbd.sock")).unwrap();
    let mut opts = CloneOptions {
        restore: restore_options(&remote, true, ApfPath::Userspace, "40ms"),
        clones: 3,
    };
    opts.restore.source = SourceOptions {
        nbd: Some(server.url().clone()),
        deadline: Duration::from_secs(1),
    };
    let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));
    let t0 = Instant::now();
    let r = std::thread::scope(|s| {
        let run = s.spawn(|| restore_clones(&opts, &|_| Box::new(NoObserver)));
        // Past the eager part, while the scans' chunks are being fetched.
        std::thread::sleep(Duration::from_millis(300));
        server.kill();
        run.join().unwrap()
    })
    .unwrap();
    let took = t0.elapsed();
    println!("{}", r.summary());
    let errors: Vec<&str> = r.clones.iter().filter_map(|c| c.error.as_deref()).collect();
    assert_eq!(errors.len(), 3, "{:?}", r.clones);
    assert!(errors.iter().all(|e| *e == errors[0]), "{errors:#?}");
    assert!(errors[0].contains("unreachable"), "{}", errors[0]);
    assert!(errors[0].contains("deadline 1s"), "{}", errors[0]);
    assert!(took < Duration::from_secs(10), "{took:?}");
    drop(server);
    assert_eq!(count("/proc/self/task"), threads, "threads left behind");
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors left open");
    let _ = std::fs::remove_dir_all(&dir);
}
