//! An upstream redirect's `Location` header (`upstream::resolve_location`): whatever eddy
//! follows is an absolute URI.
#![no_main]
use agent::upstream::client::resolve_location;
use http::Uri;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(location) = std::str::from_utf8(data) else {
        return;
    };
    let base: Uri = "https://registry.test/v2/library/a/blobs/sha256:00"
        .parse()
        .unwrap();
    if let Some(uri) = resolve_location(&base, location) {
        assert!(
            uri.scheme().is_some() && uri.authority().is_some(),
            "{location:?} -> {uri}"
        );
    }
});
