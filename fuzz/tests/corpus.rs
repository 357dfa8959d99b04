//! Replays the committed corpus (`corpus/<target>/*`) through the fuzz targets' checks as an
//! ordinary test: what `.ci/run` runs when it does not fuzz, and a quick way to re-check a
//! crash input saved under `corpus/` after a fix (`cargo test --test corpus`).
//!
//! `cargo test --test corpus -- --ignored write_seeds` rewrites the hand-made seeds (named
//! `seed-*`); inputs the fuzzers found and `cargo fuzz cmin` kept have other names.

use std::fs;
use std::path::{Path, PathBuf};

use apfvm_fuzz::engine_events::{MsrSel, Op, PageSel, Setup, StateSel, Value};
use apfvm_fuzz::{TARGETS, engine_events, manifest, msr_parse};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

#[test]
fn replay_committed_corpus() {
    for target in TARGETS {
        let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir(target))
            .unwrap_or_else(|e| panic!("corpus/{target}: {e}"))
            .map(|e| e.expect("dir entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus/{target} is empty");
        for f in &files {
            let data = fs::read(f).expect("read corpus file");
            let r = std::panic::catch_unwind(|| apfvm_fuzz::check(target, &data));
            assert!(r.is_ok(), "{target}: {} fails its check", f.display());
        }
        println!("{target}: {} corpus inputs replayed, all pass", files.len());
    }
}

/// The hand-made engine seeds do reach the protocol's paths (not only fallbacks).
#[test]
fn engine_seeds_inject_and_deliver() {
    for name in ["v1-fault-ready", "v2-fault-ready", "v2-limit-reset-restore"] {
        let data = fs::read(corpus_dir("engine_events").join(format!("seed-{name}"))).unwrap();
        let (setup, ops) = engine_events::decode(&data);
        assert_eq!(
            engine_events::encode(setup, &ops),
            data,
            "{name} round-trips"
        );
        let c = engine_events::run(setup, &ops);
        assert!(
            c.injected >= 2 && c.page_ready_delivered >= 1,
            "{name}: {c:?}"
        );
    }
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = corpus_dir(target);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

#[test]
#[ignore = "writes the seed files; run by hand"]
#[allow(clippy::too_many_lines)] // one list of seeds
fn write_seeds() {
    use msr_parse::Input;
    let seed = 1 << 4;
    let modern = seed | 1 << 14;
    let vmexit = modern | 1 << 10;
    for (name, raw, features) in [
        ("en-seed-enable", 0x7000 | 1, seed),
        ("en-seed-reserved", 0x7000 | 3, seed),
        ("en-modern-v2", 0x7000 | 9, modern),
        ("en-modern-vmexit", 0x7000 | 0b1101, vmexit),
        ("en-modern-reserved", 0x7000 | 0x19, modern),
        ("int-f3", 0xf3, modern),
        ("int-exception-14", 14, modern),
        ("int-reserved", 0x1f3, modern),
        ("ack-1", 1, modern),
        ("not-advertised", 0x7001, 0),
    ] {
        write(
            "msr_parse",
            name,
            &msr_parse::encode(Input { raw, features }),
        );
    }

    let setup = |features, vcpus| Setup {
        features,
        vcpus,
        max_outstanding: 3,
        steal: false,
    };
    let en = |v, flags| Op::Write(v, MsrSel::En, Value::OwnArea(flags));
    let int = |v| Op::Write(v, MsrSel::Int, Value::Small(0xf3));
    let ack = |v| Op::Write(v, MsrSel::Ack, Value::Small(1));
    let fault = |v, p| Op::Fault(v, PageSel::Few(p), StateSel::User);
    let window = |v| Op::Window(v, StateSel::User);
    let arrive = |p| Op::Arrive(PageSel::Few(p));
    // v1 (seed): enable, wake-all, fault, page arrives, page ready as #PF.
    let v1 = [
        en(0, 1),
        window(0),
        Op::Poll(0),
        fault(0, 0),
        Op::Poll(0),
        fault(0, 1),
        arrive(0),
        window(0),
        Op::Poll(0),
        arrive(1),
        window(0),
        Op::Poll(0),
    ];
    write(
        "engine_events",
        "v1-fault-ready",
        &engine_events::encode(setup(1, 0), &v1),
    );
    // v2 (modern): _INT, _EN, wake-all + ACK, faults on two vCPUs, page ready as interrupt.
    let v2 = [
        int(0),
        en(0, 9),
        int(1),
        en(1, 9),
        window(0),
        ack(0),
        window(1),
        ack(1),
        Op::Poll(0),
        fault(0, 2),
        Op::Poll(0),
        fault(1, 2),
        Op::Poll(0),
        arrive(2),
        window(0),
        Op::Window(1, StateSel::Area(0, 200)),
        ack(0),
        window(1),
        Op::Poll(0),
        ack(1),
    ];
    write(
        "engine_events",
        "v2-fault-ready",
        &engine_events::encode(setup(2, 1), &v2),
    );
    // The limit, a reset, a save/restore and a refused restore, with faults in flight.
    let mut limit = vec![int(0), en(0, 9), window(0), ack(0), Op::Poll(0)];
    for p in 0..5 {
        limit.push(fault(0, p));
        limit.push(Op::Poll(0));
    }
    limit.extend([
        arrive(0),
        window(0),
        Op::Poll(0),
        ack(0),
        Op::SaveRestore,
        window(0),
        Op::Poll(0),
        ack(0),
        fault(0, 3),
        Op::Reset(0),
        Op::Restore(vec![(Value::OwnArea(9), Value::Small(14), Value::Small(0))]),
        Op::Restore(vec![(
            Value::OwnArea(9),
            Value::Small(0xf3),
            Value::Small(0),
        )]),
        window(0),
        Op::Poll(1),
    ]);
    write(
        "engine_events",
        "v2-limit-reset-restore",
        &engine_events::encode(setup(2, 0), &limit),
    );
    // Hostile values: reserved bits, area outside RAM, unknown MSR and vCPU, busy area.
    let hostile = [
        Op::Write(0, MsrSel::En, Value::Raw(0x4000_0000_0001)),
        Op::Write(0, MsrSel::En, Value::OwnArea(0x3f)),
        Op::Write(0, MsrSel::Raw(0x4b56_4d01), Value::Small(1)),
        Op::Write(255, MsrSel::En, Value::OwnArea(1)),
        en(0, 1),
        Op::Fault(0, PageSel::Few(0), StateSel::Area(200, 0)),
        Op::Fault(0, PageSel::Few(0), StateSel::Kernel),
        Op::Fault(0, PageSel::Raw(u64::MAX), StateSel::Any(3, 0b1001, 0, 0)),
        Op::Window(0, StateSel::Area(130, 0)),
        Op::Read(0, MsrSel::En),
    ];
    write(
        "engine_events",
        "v1-hostile",
        &engine_events::encode(setup(1, 2), &hostile),
    );

    // Manifests: real ones written by `apfvm snapshot` are committed as
    // corpus/manifest/seed-apfvm-*.json (see docs/reliability.md); these are edits of the
    // target's base manifest that keep it valid.
    for (name, edits) in [
        ("edit-trigger", vec![("/trigger", 5u8, 2u64)]),
        (
            "edit-quantum-apf",
            vec![("/config/quantum_us", 1, 5), ("/config/apf", 5, 2)],
        ),
        (
            "edit-engine-en",
            vec![("/engine/vcpus/1/async_pf_en", 1, 0)],
        ),
    ] {
        let data = manifest::encode_edits(&edits);
        let m = vmm::snapshot::Manifest::from_json(&manifest::edit(&data));
        assert!(m.is_ok(), "{name}: {:?}", m.err());
        write("manifest", name, &data);
    }
    // The crash inputs of docs/reliability.md, kept as regression inputs (now refused).
    let chunk = manifest::encode_edits(&[("/memory/chunk_size", 2, 40), ("/memory/crc32", 7, 1)]);
    let m = vmm::snapshot::Manifest::from_json(&manifest::edit(&chunk));
    assert!(m.is_err_and(|e| e.to_string().contains("larger than the memory")));
    fs::write(
        corpus_dir("manifest").join("crash-chunk-larger-than-memory"),
        chunk,
    )
    .unwrap();
}
