//! Docker config.json files (`--upstream-auth-file`, a dockerconfigjson Secret):
//! `credentials::parse`.
#![no_main]
use agent::upstream::credentials::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Whatever the mounted file holds: credentials or a one-line error, never a panic.
    match parse(data) {
        Ok(entries) => {
            for (host, value) in &entries {
                // Hosts are looked up by lower-case authority: an upper-case or empty key
                // would never match a request.
                assert!(!host.is_empty(), "an empty host");
                assert_eq!(host, &host.to_ascii_lowercase(), "host not lower case");
                let value = value.to_str().expect("Basic credentials are ASCII");
                assert!(value.starts_with("Basic "), "not Basic: {value}");
            }
            // Docker Hub's names are one registry: all three or none.
            let hub = ["docker.io", "index.docker.io", "registry-1.docker.io"]
                .iter()
                .filter(|h| entries.contains_key(**h))
                .count();
            assert!(hub == 0 || hub == 3, "Docker Hub aliases incomplete");
            // Deterministic: the same file gives the same credentials.
            assert_eq!(parse(data).ok(), Some(entries));
        }
        Err(message) => {
            assert!(!message.is_empty());
            assert!(!message.contains('\n'), "a multi-line error: {message:?}");
        }
    }
});
