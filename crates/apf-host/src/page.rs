//! Guest frames: faults and arrivals are keyed by the 4 KiB frame.

/// Guest page size: faults and arrivals are keyed by the 4 KiB frame.
pub const PAGE_SIZE: u64 = 4096;

/// The frame address of `gpa`.
pub const fn page_of(gpa: u64) -> u64 {
    gpa & !(PAGE_SIZE - 1)
}
