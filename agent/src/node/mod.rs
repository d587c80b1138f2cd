//! The host eddy runs on: thin syscall wrappers (`sys`), replacing files durably (`durable`), which
//! containerd runs it and how (`distro`), and restarting that containerd once (`restart`).
//!
//! May import nothing else in the crate: everything else may import it.
pub mod distro;
pub mod durable;
pub mod restart;
pub mod sys;
