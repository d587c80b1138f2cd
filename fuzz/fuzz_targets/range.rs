//! The `Range` header against a content length (`range::parse_range`).
#![no_main]
use agent::oci::range::{parse_range, RangeSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, &[u8])| {
    let (len, spec) = input;
    let Ok(spec) = std::str::from_utf8(spec) else {
        return;
    };
    for len in [len, len % 4096, 0, u64::MAX] {
        if let RangeSpec::Satisfiable(start, end) = parse_range(spec, len) {
            // A served range is never empty and never reaches past the content.
            assert!(
                start < end && end <= len,
                "{spec:?} len {len} -> {start}..{end}"
            );
        }
    }
});
