//! The host eddy runs on: thin syscall wrappers (`sys`), replacing files durably (`durable`), which
//! containerd runs it and how (`distro`), and restarting that containerd once (`restart`). Also the
//! two helpers every subsystem shares, at the bottom so that all may import them: the
//! poison-tolerant mutex lock (`sync`) and the boxed error (`error`).
//!
//! May import nothing else in the crate: everything else may import it.
pub mod distro;
pub mod durable;
pub mod error;
pub mod restart;
pub mod sync;
pub mod sys;
