//! The OCI distribution vocabulary, pure and without I/O, so each part is fuzzed on its own:
//! content digests (`digest`), the pull API's paths (`api_path`), the `Range` header
//! (`range`) and host names (`host`).
//!
//! May import nothing else in the crate.
pub mod api_path;
pub mod digest;
pub mod host;
pub mod range;
pub mod repo_key;
