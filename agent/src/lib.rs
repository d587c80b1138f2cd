//! eddy: a node agent that makes container image pulls fast and resilient without node
//! configuration. Data flows one way through these modules:
//!
//! `bpf` (redirect containerd's connects) → `proxy` (accept, recover the original
//! destination, `peek` at the first bytes) → route: passthrough via `upstream`, or TLS
//! termination (`tls`) → `registry` (OCI distribution API) → `store` + `catalog`, else
//! `upstream`.
pub mod admin;
pub mod api_path;
pub mod app;
pub mod bpf;
pub mod catalog;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod digest;
pub mod metrics;
pub mod peek;
pub mod proxy;
pub mod range;
pub mod registry;
pub mod splice;
pub mod status;
pub mod store;
pub mod sys;
pub mod tls;
pub mod upstream;
