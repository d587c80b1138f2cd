//! Accepting redirected connections: recover the original destination, classify the first
//! bytes without consuming them (`peek`), pick a route (`proxy`) for the configured
//! registries (`registries`), splice passthroughs (`splice`), and count it all (`metrics`).
//!
//! May import `hook`, `trust`, `tls`, `registry`, `upstream`, `oci` and `node`.
pub mod metrics;
pub mod peek;
pub mod proxy;
pub mod registries;
pub mod splice;
