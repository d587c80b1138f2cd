//! Trust: the node CA, the leaves it mints per registry name, the host trust bundle, and the
//! client config for talking to the real registries.
//!
//! containerd must trust eddy's CA for interception to work, so the CA is created once per node and
//! kept ([`Ca::load_or_create`]); it can be name-constrained so that a leaked key cannot impersonate
//! hosts other than the configured registries.
//!
//! Owns: the CA (`ca`), the leaves it mints and the server configs that present them (`leaf`,
//! cached in `leaf_cache`), registry names (`name`), the host trust bundle (`bundle`, and
//! `talos` for read-only hosts), the upstream client config (`upstream_client`), what every
//! rustls config shares (`provider`), writing its files (`files`) and its error (`error`).
//!
//! May import `oci` and `node`. Inside, `error` is at the bottom, then `name`, `provider` and
//! `files`, then `leaf_cache`, `ca`, `leaf`, `bundle` and `upstream_client`; this file only
//! declares and re-exports them, and no file below imports from it.

mod bundle;
mod ca;
mod error;
mod files;
mod leaf;
mod leaf_cache;
mod name;
mod provider;
pub mod talos;
mod upstream_client;

pub use bundle::{install_into_bundle, remove_from_bundle};
pub use ca::Ca;
pub use error::TlsError;
pub use leaf::{server_config, server_config_for_ip};
pub use name::RegistryName;
pub use upstream_client::upstream_client_config;
