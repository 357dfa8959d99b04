//! `manifest`: the snapshot manifest parser (`vmm::snapshot::Manifest::from_json`, what
//! `Snapshot::open` / `open_manifest` run on `manifest.json`) never panics on arbitrary
//! bytes, and a manifest it accepts is one `apfvm restore` can use without panicking:
//!
//! - every vCPU state's `index` is its position (restore creates vCPU `index` and then
//!   indexes its per-vCPU tables, sized by the vCPU count, with it);
//! - the checksum chunk is no larger than the memory (rounded up to a page): restore reads
//!   memory one chunk-sized buffer at a time;
//! - the memory file's regions are the guest's RAM regions (none in the MMIO hole), cover
//!   the file back to back, and map every guest page of RAM to its file offset, none across
//!   a chunk boundary: restore loads and serves memory through that mapping;
//! - the pure parts of restore that follow run without panicking: the machine check
//!   (`run::validate_machine`) and restoring the saved APF MSRs into an engine of that
//!   machine (which may refuse them with an error);
//! - an accepted manifest serializes and parses back to the same manifest.
//!
//! Two kinds of input: bytes that start with `{` (or whitespace) are the manifest itself
//! (the committed seeds are real `manifest.json` files); any other bytes are a list of edits
//! to a valid manifest built here ([`base`]): each picks a JSON node and replaces it (a
//! number, a power of two, a negative, null, a string, a bool) or shrinks or grows it, so
//! that the fuzzer explores well-formed manifests with hostile values, not only JSON syntax.

use std::sync::OnceLock;

use apf_abi::PvFeatures;
use apf_host::{Engine, EngineConfig, RamMap};
use arbitrary::Unstructured;
use vmm::config::{HaltMode, VmConfig};
use vmm::snapshot::Manifest;

use crate::take;

/// Checks `data`: a manifest, or edits to [`base`] (see the module doc).
pub fn check(data: &[u8]) {
    match data.first() {
        None | Some(b'{' | b' ' | b'\n' | b'\t' | b'\r') => check_json(data),
        Some(_) => check_json(&edit(data)),
    }
}

/// A valid manifest of 2 vCPUs and the smallest RAM a restore accepts, as JSON.
pub fn base() -> serde_json::Value {
    let mut m = testkit::manifest::example(vmm::layout::MIN_RAM);
    m.trigger = "fuzz base".into();
    serde_json::to_value(&m).expect("serializes")
}

/// JSON pointers of the nodes of [`base`] that edits pick from, parents first.
fn nodes() -> &'static (serde_json::Value, Vec<String>) {
    static NODES: OnceLock<(serde_json::Value, Vec<String>)> = OnceLock::new();
    NODES.get_or_init(|| {
        fn walk(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
            out.push(at.to_owned());
            match v {
                serde_json::Value::Object(o) => {
                    for (k, x) in o {
                        walk(x, &format!("{at}/{k}"), out);
                    }
                }
                serde_json::Value::Array(a) => {
                    // The first two elements of each array (the register images and the
                    // checksum table are long arrays of numbers): edits then land on the
                    // fields restore interprets.
                    for (i, x) in a.iter().enumerate().take(2) {
                        walk(x, &format!("{at}/{i}"), out);
                    }
                }
                _ => {}
            }
        }
        let b = base();
        let mut out = Vec::new();
        walk(&b, "", &mut out);
        (b, out)
    })
}

/// Applies the edits `data` describes to [`base`]; returns the manifest bytes.
pub fn edit(data: &[u8]) -> Vec<u8> {
    use serde_json::Value;
    let (base, nodes) = nodes();
    let mut v = base.clone();
    let mut u = Unstructured::new(data);
    while !u.is_empty() {
        let at: u16 = take(&mut u);
        let op: u8 = take(&mut u);
        let x: u64 = take(&mut u);
        let Some(node) = v.pointer_mut(&nodes[usize::from(at) % nodes.len()]) else {
            continue;
        };
        match op % 10 {
            0 => *node = Value::from(x),
            1 => *node = Value::from(x % 8),
            2 => *node = Value::from(1u64 << (x % 64)),
            3 => *node = Value::from(-i64::try_from(x >> 1).unwrap_or(1)),
            4 => *node = Value::Null,
            5 => {
                *node = Value::from(match x % 4 {
                    0 => "",
                    1 => "../memory.raw",
                    2 => "v2",
                    _ => "apfvm-snapshot",
                });
            }
            6 => *node = Value::from(x.is_multiple_of(2)),
            7 => match node {
                Value::Array(a) => {
                    let keep = usize::try_from(x).unwrap_or(0) % (a.len() + 1);
                    a.truncate(keep);
                }
                Value::Object(o) => {
                    let key = o
                        .keys()
                        .nth(usize::try_from(x).unwrap_or(0) % o.len().max(1))
                        .cloned();
                    if let Some(k) = key {
                        o.remove(&k);
                    }
                }
                _ => {}
            },
            8 => {
                if let Value::Array(a) = node
                    && let Some(first) = a.first().cloned()
                {
                    for _ in 0..=x % 4 {
                        a.push(first.clone());
                    }
                }
            }
            _ => *node = Value::from(1.5),
        }
    }
    serde_json::to_vec(&v).expect("serializes")
}

/// Parses `data` as `manifest.json` and checks what restore relies on.
pub fn check_json(data: &[u8]) {
    let m = match Manifest::from_json(data) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for (i, s) in m.vcpus.iter().enumerate() {
        assert_eq!(
            usize::try_from(s.index).ok(),
            Some(i),
            "accepted a manifest whose vCPU state {i} has index {}",
            s.index
        );
    }
    let mem = &m.memory;
    assert!(
        mem.chunk_size <= mem.size.max(4096),
        "accepted a checksum chunk of {} bytes for {} bytes of memory",
        mem.chunk_size,
        mem.size
    );
    check_regions(&m);
    let cfg = VmConfig {
        vcpus: m.config.vcpus,
        mem_size: m.config.mem_size,
        apf: m.config.apf,
        guest_image: Vec::new(),
        tasks: m.config.tasks.iter().map(guest_abi_task).collect(),
        quantum_us: m.config.quantum_us,
        halt: HaltMode::NoExit,
    };
    let machine_ok = vmm::machine::validate(&cfg).is_ok();
    if machine_ok {
        let features = PvFeatures(vmm::kvm::cpuid::pv_features(m.config.apf));
        let n = usize::try_from(m.config.vcpus).expect("validated");
        let mut engine = Engine::new(EngineConfig::new(
            features,
            n,
            RamMap::new(vmm::layout::ram_regions(m.config.mem_size)),
        ));
        if engine.restore(&m.engine).is_ok() {
            engine
                .check_invariants()
                .expect("restored engine is consistent");
        }
    }
    let json = serde_json::to_vec(&m).expect("a parsed manifest serializes");
    let again = Manifest::from_json(&json)
        .unwrap_or_else(|e| panic!("an accepted manifest, written back, is refused: {e}"));
    assert_eq!(
        serde_json::to_vec(&again).expect("serializes"),
        json,
        "round trip changed the manifest"
    );
}

/// The regions of an accepted manifest are what restore relies on (see the module doc).
fn check_regions(m: &Manifest) {
    let mem = &m.memory;
    let ram = vmm::layout::ram_regions(m.config.mem_size);
    let mut got: Vec<_> = mem.regions.iter().map(|r| r.gpa..r.gpa + r.size).collect();
    got.sort_by_key(|r| r.start);
    assert_eq!(got, ram, "accepted regions that are not the guest's RAM");
    let mut end = 0;
    for r in &mem.regions {
        assert!(
            !vmm::layout::in_mmio_hole(r.gpa, r.size),
            "accepted a region in the MMIO hole: {r:?}"
        );
        assert_eq!(mem.file_offset(r.gpa, r.size), Some(r.file_offset), "{r:?}");
        assert_eq!(mem.gpa_at(r.file_offset), Some(r.gpa), "{r:?}");
        let file_end = r.file_offset + r.size;
        assert!(
            r.file_offset % mem.chunk_size == 0
                && (file_end % mem.chunk_size == 0 || file_end == mem.size),
            "accepted a region a chunk crosses: {r:?}, chunk {}",
            mem.chunk_size
        );
        end = end.max(file_end);
    }
    assert_eq!(
        end, mem.size,
        "accepted regions that do not cover the memory file"
    );
}

fn guest_abi_task(t: &vmm::snapshot::format::SavedTask) -> guest_abi::TaskSpec {
    t.into()
}

/// The bytes that make [`edit`] apply `edits` (JSON pointer into [`base`], operation,
/// argument) to the base manifest (for hand-written seeds).
pub fn encode_edits(edits: &[(&str, u8, u64)]) -> Vec<u8> {
    let (_, nodes) = nodes();
    let mut b = Vec::new();
    for &(pointer, op, x) in edits {
        let at = nodes
            .iter()
            .position(|n| n == pointer)
            .unwrap_or_else(|| panic!("no node {pointer}"));
        b.extend_from_slice(&u16::try_from(at).expect("few nodes").to_le_bytes());
        b.push(op);
        b.extend_from_slice(&x.to_le_bytes());
    }
    assert!(
        !matches!(b.first(), Some(b'{' | b' ' | b'\n' | b'\t' | b'\r')),
        "would read as JSON"
    );
    b
}

/// How many nodes of [`base`] the edits pick from.
pub fn node_count() -> usize {
    nodes().1.len()
}
