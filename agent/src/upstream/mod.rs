//! Everything eddy itself says to a registry: the HTTP client (`client`), registry chains
//! (`chain`), token-flow challenges and tokens (`challenge`, `token`), node credentials
//! (`credentials`), and whether a repository is public (`visibility`).
//!
//! May import `oci`, `tls` and `node`.
pub mod chain;
pub mod challenge;
pub mod client;
pub mod credentials;
pub mod token;
pub mod visibility;
