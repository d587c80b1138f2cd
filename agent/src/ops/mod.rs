//! What operators touch: the admin HTTP endpoint (`admin`), the Prometheus encoding
//! (`metrics`), `eddy status`, `eddy doctor` and `eddy gc`.
//!
//! May import any subsystem below `app`; only `app` imports `ops`.
pub mod admin;
pub mod doctor;
pub mod gc;
pub mod metrics;
pub mod status;
