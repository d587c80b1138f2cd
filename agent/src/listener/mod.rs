//! Accepting redirected connections: recover the original destination, classify the first
//! bytes without consuming them (`peek`), pick a route (`proxy`), and splice passthroughs
//! (`splice`).
//!
//! May import `hook`, `trust`, `tls`, `registry`, `oci`, `node` and `ops::metrics`' types
//! it is handed.
pub mod peek;
pub mod proxy;
pub mod splice;
