//! eddy: a node agent that makes container image pulls fast and resilient without node
//! configuration. Data flows one way through these modules:
//!
//! `bpf` (redirect containerd's connects) → `proxy` (accept, recover the original
//! destination) → route: passthrough via `upstream`.
pub mod admin;
pub mod app;
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod status;
pub mod sys;
pub mod upstream;
