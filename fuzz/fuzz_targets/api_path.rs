//! Request paths of the registry API (`api_path::parse_path`) and the references in them
//! (`Digest::from_str`).
#![no_main]
use agent::{
    oci::api_path::{parse_path, Api},
    oci::digest::Digest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let (repo, reference) = match parse_path(path) {
        Api::Manifest { repo, reference } => (repo, reference),
        Api::Blob { repo, digest } => (repo, digest),
        Api::Base | Api::Other => return,
    };
    assert!(!repo.is_empty() && !reference.is_empty() && !reference.contains('/'));
    // Nothing eddy caches under can climb out of its repository.
    assert!(agent::oci::api_path::valid_repository(repo), "{repo:?}");
    assert!(repo.split('/').all(|c| c != ".." && c != "."), "{repo:?}");
    assert!(path.contains(repo) && path.ends_with(reference));
    if let Ok(digest) = reference.parse::<Digest>() {
        // One spelling per digest: what parses prints back identically.
        assert_eq!(digest.to_string(), reference);
        assert_eq!(digest.hex().len(), 64);
    }
});
