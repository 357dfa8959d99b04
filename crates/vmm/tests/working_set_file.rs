//! The working-set file without KVM: what is written reads back, and every kind of bad
//! file (corrupt, truncated, another snapshot's, an older version, a page outside RAM, an
//! unknown touch) is refused naming its problem. What a restore does with a refused file
//! (a warning, memory on demand, a correct run) is `working_set.rs`.

use vmm::working_set::{Entry, Touch, WorkingSet, WorkingSetError, snapshot_id};

fn memory(mem: u64) -> vmm::snapshot::memory_file::MemoryInfo {
    let mut m = testkit::manifest::example(mem).memory;
    m.crc32 = (0..u32::try_from(m.crc32.len()).unwrap()).collect();
    m
}

fn sample(id: u64) -> WorkingSet {
    WorkingSet {
        snapshot_id: id,
        entries: vec![
            Entry {
                gpa: 0x7000,
                t_us: 0,
                touch: Touch::Vmm,
            },
            Entry {
                gpa: 0x100_0000,
                t_us: 15,
                touch: Touch::User,
            },
            Entry {
                gpa: 0x20_0000,
                t_us: 99,
                touch: Touch::Kernel,
            },
        ],
    }
}

/// Recomputes the trailing checksum after an edit (a consistent file with bad content).
fn reseal(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 4;
    let crc = crc32fast::hash(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn a_working_set_reads_back_as_written_and_only_for_its_snapshot() {
    let m = memory(64 << 20);
    let ws = sample(snapshot_id(&m));
    assert_eq!(WorkingSet::decode(&ws.encode(), &m).unwrap(), ws);
    // Another snapshot's memory (one chunk differs) has another id.
    let mut other = m.clone();
    other.crc32[3] ^= 1;
    assert_ne!(snapshot_id(&other), snapshot_id(&m));
    let e = WorkingSet::decode(&ws.encode(), &other).unwrap_err();
    assert!(matches!(e, WorkingSetError::OtherSnapshot { .. }), "{e}");
    assert!(e.to_string().contains("another snapshot"), "{e}");
    // Written atomically into a directory, read back; none there is not an error.
    let dir = testkit::scratch("wsfile", "rw");
    assert!(WorkingSet::read(&dir, &m).unwrap().is_none());
    ws.write(&dir).unwrap();
    assert_eq!(WorkingSet::read(&dir, &m).unwrap(), Some(ws));
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
}

#[test]
fn every_kind_of_bad_file_is_refused_naming_its_problem() {
    let m = memory(64 << 20);
    let good = sample(snapshot_id(&m)).encode();
    let check = |bytes: &[u8], what: &str, ok: fn(&WorkingSetError) -> bool| {
        let e = WorkingSet::decode(bytes, &m).expect_err(what);
        assert!(ok(&e), "{what}: {e:?}");
        e.to_string()
    };
    // Corrupt: one byte of an entry flipped.
    let mut corrupt = good.clone();
    corrupt[40] ^= 0x10;
    let t = check(&corrupt, "corrupt", |e| {
        matches!(e, WorkingSetError::Checksum { .. })
    });
    assert!(t.contains("corrupt"), "{t}");
    // Truncated: in the entries, and inside the header.
    let t = check(&good[..good.len() - 10], "truncated", |e| {
        matches!(e, WorkingSetError::Truncated { .. })
    });
    assert!(t.contains("truncated"), "{t}");
    check(&good[..20], "header cut", |e| {
        matches!(e, WorkingSetError::Truncated { .. })
    });
    // Trailing garbage: the checksum no longer covers the file.
    let mut long = good.clone();
    long.push(0);
    check(&long, "longer", |e| {
        matches!(e, WorkingSetError::Checksum { .. })
    });
    // An older version (0), checksum consistent.
    let mut old = good.clone();
    old[8..12].copy_from_slice(&0u32.to_le_bytes());
    let t = check(&reseal(old), "older version", |e| {
        matches!(e, WorkingSetError::Version { found: 0, .. })
    });
    assert!(t.contains("version 0"), "{t}");
    // Not a working-set file.
    let mut magic = good.clone();
    magic[0] = b'X';
    check(&magic, "magic", |e| matches!(e, WorkingSetError::BadMagic));
    // A page outside RAM (the MMIO hole of a bigger guest, past the end of this one), an
    // unaligned one, an unknown touch.
    for (gpa, touch) in [(3 << 30, 3u8), (64 << 20, 3), (0x100_0010, 3), (0x1000, 9)] {
        let mut b = good.clone();
        b[48..56].copy_from_slice(&u64::to_le_bytes(gpa));
        b[60] = touch;
        let t = check(&reseal(b), "bad entry", |e| {
            matches!(e, WorkingSetError::BadEntry { index: 1, .. })
        });
        assert!(t.contains("entry 1"), "{t}");
    }
}
