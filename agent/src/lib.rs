//! eddy: a node agent that makes container image pulls fast and resilient without node
//! configuration. Data flows one way through these modules:
//!
//! `bpf` (redirect containerd's connects) → `proxy` (accept, recover the original
//! destination, `peek` at the first bytes) → route: passthrough via `upstream`, or TLS
//! termination (`tls`, for clients the `trust` gate finds trusting eddy's CA) → `registry` (OCI
//! distribution API; `visibility`, `credentials` and `token` for upstream's auth) → `store` +
//! `catalog`, else `upstream`.
pub mod admin;
pub mod api_path;
pub mod app;
pub mod bpf;
pub mod bpf_log;
pub mod catalog;
pub mod cgroup;
pub mod chain;
pub mod challenge;
pub mod cli;
pub mod config;
pub mod containerd;
pub mod credentials;
pub mod datadir_lock;
pub mod digest;
pub mod distro;
pub mod doctor;
pub mod failover;
pub mod gc;
pub mod lifecycle;
pub mod metrics;
pub mod p2p;
pub mod peek;
pub mod peers;
pub mod proxy;
pub mod range;
pub mod registry;
pub mod restart;
pub mod resume;
pub mod share;
pub mod source;
pub mod sources;
pub mod splice;
pub mod status;
pub mod store;
pub mod sys;
pub mod talos;
pub mod tls;
pub mod token;
pub mod trust;
pub mod upstream;
pub mod visibility;
