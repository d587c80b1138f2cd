//! Everything that can go wrong in `tls`, as one error type.
use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// The CA directory exists but is damaged. We never silently re-create the CA: a new one would
    /// invalidate the old one everywhere it is already trusted.
    #[error(
        "CA {path} is unusable: {reason}; not creating a new CA, since that would break trust on this node \
         (restore the file, or remove {dir} and re-install the new CA into the trust bundle)"
    )]
    CorruptCa {
        path: PathBuf,
        dir: PathBuf,
        reason: String,
    },
    #[error("generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("invalid registry name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("the CA certificate to install is not PEM: {reason}")]
    InvalidCaPem { reason: String },
    #[error("{path}: {reason}")]
    InvalidPem { path: PathBuf, reason: String },
    #[error("{path} contains no PEM certificates")]
    NoCerts { path: PathBuf },
    #[error("{path}: certificate not usable as a trust root: {source}")]
    BadRoot {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("no trust roots for upstream connections (system roots: {errors})")]
    NoRoots { errors: String },
    #[error("build TLS config: {source}")]
    Config { source: rustls::Error },
    /// Writing a file in place of the link would leave the node's containerd with eddy's
    /// CA as its only root.
    #[error(
        "{path} is a symlink to {target}, which does not exist here (a host path mounted without \
         its target?); not writing through it: pass the link's target as --bundle"
    )]
    DanglingBundleLink { path: PathBuf, target: PathBuf },
}
