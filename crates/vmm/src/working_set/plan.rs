//! What a lazy restore with a working set loads when: the must-have pages (touched by the
//! VMM, at CPL 0, or before the first CPL 3 instruction) before the first instruction, as
//! whole checksum chunks; everything else of RAM served on demand, the rest of the working
//! set streamed to it in recorded order.

use std::collections::HashSet;
use std::ops::Range;

use super::file::WorkingSet;

/// RAM split for a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Loaded before the first instruction: the chunks holding must-have pages, merged.
    pub eager: Vec<Range<u64>>,
    /// Served on demand: the rest of every RAM region.
    pub lazy: Vec<Range<u64>>,
    /// The working set's other pages, in recorded order, each once (guest-physical).
    pub stream: Vec<u64>,
    /// Distinct pages of the working set.
    pub pages: u64,
    /// Of those, must-have pages.
    pub must_have_pages: u64,
}

/// Splits RAM (`ram`, regions in address order, starting on chunks) for a replay of `ws`,
/// loading must-have pages by whole `chunk`s (the unit a source verifies).
pub fn split(ram: &[Range<u64>], chunk: u64, ws: &WorkingSet) -> Split {
    let chunk = chunk.max(4096);
    let mut seen = HashSet::new();
    let mut must = Vec::new();
    let mut stream = Vec::new();
    for e in &ws.entries {
        if !seen.insert(e.gpa) {
            continue;
        }
        if e.touch.must_have() {
            must.push(e.gpa);
        } else {
            stream.push(e.gpa);
        }
    }
    let must_have_pages = must.len() as u64;
    let mut chunks: Vec<u64> = must.iter().map(|g| g - g % chunk).collect();
    chunks.sort_unstable();
    chunks.dedup();
    let mut eager: Vec<Range<u64>> = Vec::new();
    for c in chunks {
        let Some(r) = ram.iter().find(|r| r.contains(&c)) else {
            continue;
        };
        let piece = c..(c + chunk).min(r.end);
        match eager.last_mut() {
            Some(last) if last.end == piece.start => last.end = piece.end,
            _ => eager.push(piece),
        }
    }
    let mut lazy = Vec::new();
    for r in ram {
        let mut at = r.start;
        for e in eager.iter().filter(|e| e.start < r.end && e.end > r.start) {
            if e.start > at {
                lazy.push(at..e.start);
            }
            at = at.max(e.end);
        }
        if at < r.end {
            lazy.push(at..r.end);
        }
    }
    stream.retain(|g| !eager.iter().any(|e| e.contains(g)));
    Split {
        eager,
        lazy,
        stream,
        pages: seen.len() as u64,
        must_have_pages,
    }
}

#[cfg(test)]
mod tests {
    use super::super::file::{Entry, Touch};
    use super::*;

    fn ws(entries: &[(u64, Touch)]) -> WorkingSet {
        WorkingSet {
            snapshot_id: 1,
            entries: entries
                .iter()
                .map(|&(gpa, touch)| Entry {
                    gpa,
                    t_us: 0,
                    touch,
                })
                .collect(),
        }
    }

    #[test]
    fn must_have_chunks_are_eager_the_rest_streams_in_recorded_order() {
        const K: u64 = 64 << 10;
        let ram = [0..3 << 30, 4 << 30..5 << 30];
        let w = ws(&[
            (0x20_0000, Touch::Kernel),
            (0x7000, Touch::Vmm),
            (0x9000_0000, Touch::User),
            (0x20_1000, Touch::User), // in a must-have chunk: loaded with it
            (4 << 30, Touch::BeforeUser),
            (0x8000_0000, Touch::Unknown),
            (0x9000_0000, Touch::User), // again: once
            (0x20_f000, Touch::Kernel), // same chunk as the first
            (0x21_0000, Touch::Kernel), // the next chunk: merged
        ]);
        let s = split(&ram, K, &w);
        assert_eq!(
            s.eager,
            [0..K, 0x20_0000..0x20_0000 + 2 * K, 4 << 30..(4 << 30) + K]
        );
        assert_eq!(
            s.lazy,
            [
                K..0x20_0000,
                0x20_0000 + 2 * K..3 << 30,
                (4 << 30) + K..5 << 30
            ]
        );
        assert_eq!(s.stream, [0x9000_0000, 0x8000_0000], "recorded order, once");
        assert_eq!((s.pages, s.must_have_pages), (8, 5));
        // Every byte of RAM is either eager or lazy, once.
        let total: u64 = s.eager.iter().chain(&s.lazy).map(|r| r.end - r.start).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn a_working_set_without_must_have_pages_loads_nothing_first() {
        let ram = vec![Range {
            start: 0,
            end: 64 << 20,
        }];
        let s = split(&ram, 64 << 10, &ws(&[(0x100_0000, Touch::User)]));
        assert!(s.eager.is_empty());
        assert_eq!(s.lazy, ram);
    }
}
