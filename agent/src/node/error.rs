//! The crate's one boxed error: what a streamed body, a fetch or a source may fail with when the
//! caller only passes the failure on. Defined here, at the bottom, so that every subsystem can
//! name the same type (`store` and `upstream` re-export it).

/// Any error, sendable across tasks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
