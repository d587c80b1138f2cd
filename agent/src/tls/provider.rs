//! What every rustls config of eddy's shares: the crypto provider, and the ALPN offered to clients.
use std::sync::Arc;

/// ALPN offered to clients, most preferred first (rustls servers pick by their own order).
/// containerd's Go client offers both; HTTP/1.1 is preferred because eddy serves a layer over
/// it faster (measured by `cargo xtask bench`: 1.5-1.8 GB/s against about 1.0 GB/s over
/// HTTP/2), and containerd opens a connection per layer anyway.
const ALPN: [&[u8]; 2] = [b"http/1.1", b"h2"];

pub(super) fn alpn_protocols() -> Vec<Vec<u8>> {
    ALPN.iter().map(|p| p.to_vec()).collect()
}

/// Our one crypto provider, passed explicitly so that nothing depends on a process-global default.
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
