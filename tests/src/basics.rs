//! Small values every harness shares: the ports the tests use, names unique per process
//! and per test, and the tail of a log.
use std::sync::atomic::{AtomicU32, Ordering};

/// The port eddy intercepts in the tests (its default).
pub const INTERCEPTED_PORT: u16 = 443;
/// A port the upstream also serves but eddy does not intercept.
pub const OTHER_PORT: u16 = 8080;
/// Bytes in a mebibyte, for sizes given in MiB.
pub const MIB: u64 = 1 << 20;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process.
pub fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// `<pid>-<n>`: unique across concurrent test processes and within one.
pub fn unique_suffix() -> String {
    format!("{}-{}", std::process::id(), next_id())
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
