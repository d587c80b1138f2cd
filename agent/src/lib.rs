//! eddy: a node agent that makes container image pulls fast and resilient without node
//! configuration. The folders follow the data flow (docs/architecture.md has the picture):
//!
//! `hook` (redirect containerd's connects) → `listener` (accept, recover the original
//! destination, classify the first bytes) → passthrough, or TLS termination (`tls`, for
//! clients the `trust` gate finds trusting eddy's CA) → `registry` (the OCI pull API) →
//! `store` (bytes on disk), else `sources` (containerd, `peers`), else `upstream`.
//! `oci` is the pure vocabulary they share, `node` the host, `ops` what operators touch and
//! `app` the wiring. Imports point down the flow, never back up (`cargo xtask circles`).
pub mod app;
pub mod hook;
pub mod listener;
pub mod node;
pub mod oci;
pub mod ops;
pub mod peers;
pub mod registry;
pub mod sources;
pub mod store;
pub mod tls;
pub mod trust;
pub mod upstream;
