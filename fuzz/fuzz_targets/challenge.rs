//! `WWW-Authenticate` challenges from upstream registries (`challenge::parse`).
#![no_main]
use agent::upstream::challenge::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    // Whatever upstream sends: an answer or None, never a panic.
    let first = parse(value);
    // Deterministic: the same header gives the same answer.
    assert_eq!(first, parse(value));
});
