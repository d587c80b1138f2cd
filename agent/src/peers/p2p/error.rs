//! Why the swarm could not start (`P2pError`), and why one fetch from a peer failed
//! (`PeerError`).
use super::{config, data};

#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error(transparent)]
    Identity(#[from] config::IdentityError),
    #[error("p2p noise keys: {0}")]
    Noise(String),
    #[error("--p2p-listen: {0}")]
    Listen(String),
    #[error("--p2p-data-port: {0}")]
    Data(#[from] data::DataError),
}

/// Why a fetch from a peer failed. [`PeerError::reason`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot open a stream to the peer: {0}")]
    Connect(String),
    #[error("the peer did not answer in time")]
    Timeout,
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error("the peer does not have it")]
    NotFound,
}

impl PeerError {
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::Connect(_) => "connect",
            PeerError::Timeout => "timeout",
            PeerError::Protocol(_) => "protocol",
            PeerError::NotFound => "not_found",
        }
    }
}
