//! The catalog's JSON sidecars on disk (`catalog::ContentMeta`, `catalog::TagRecord`): a
//! damaged file is read as absent, and what is read writes back to the same value.
#![no_main]
use agent::store::catalog::{ContentMeta, TagRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = serde_json::from_slice::<ContentMeta>(data) {
        let again = serde_json::to_vec(&meta).unwrap();
        assert_eq!(serde_json::from_slice::<ContentMeta>(&again).unwrap(), meta);
    }
    if let Ok(tag) = serde_json::from_slice::<TagRecord>(data) {
        let again = serde_json::to_vec(&tag).unwrap();
        assert_eq!(serde_json::from_slice::<TagRecord>(&again).unwrap(), tag);
    }
});
