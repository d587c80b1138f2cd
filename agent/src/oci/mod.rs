//! The OCI distribution vocabulary, pure and without I/O, so each part is fuzzed on its own:
//! content digests (`digest`), the pull API's paths (`api_path`) and the `Range` header
//! (`range`).
//!
//! May import nothing else in the crate.
pub mod api_path;
pub mod digest;
pub mod range;
