//! Dialling upstream. Every socket eddy opens towards an original destination carries
//! eddy's SO_MARK, which the connect hooks recognise and leave alone: even if eddy runs
//! inside the hooked cgroup, its own connections are never redirected back to itself.
use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Connect to `addr` from a socket marked with `mark`.
pub async fn connect(addr: SocketAddr, mark: u32) -> Result<TcpStream, UpstreamError> {
    let err = |source| UpstreamError::Connect { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket2::SockRef::from(&socket).set_mark(mark).map_err(err)?;
    let stream = socket.connect(addr).await.map_err(err)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
