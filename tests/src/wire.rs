//! What `eddy-probe` says on the wire and on stdout. Both the probe binary and the harness
//! use these types, so the two cannot drift apart.
//!
//! Wire protocol (client speaks first, so a proxy that peeks at the first bytes before it
//! dials upstream still works):
//! 1. client → server: 1 mode byte (`E` echo, `D` download), then a u64 length, big endian.
//! 2. server → client: one line `eddy-probe local=ADDR peer=ADDR\n`: the address the
//!    connection arrived at (the original destination) and the peer it came from.
//! 3. echo: the client sends `length` bytes and the server echoes exactly those back;
//!    download: the server sends `length` bytes. Then the server closes.
//!
//! Lengths are explicit so that neither side depends on half-close support in the proxy.
use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

pub const HEADER_LEN: usize = 9;
/// The server line never gets near this; it bounds what the client reads looking for `\n`.
pub const MAX_LINE: usize = 256;
const LINE_PREFIX: &str = "eddy-probe ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Download,
}

pub fn encode_header(mode: Mode, len: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0] = match mode {
        Mode::Echo => b'E',
        Mode::Download => b'D',
    };
    header[1..].copy_from_slice(&len.to_be_bytes());
    header
}

pub fn decode_header(header: &[u8; HEADER_LEN]) -> Option<(Mode, u64)> {
    let mode = match header[0] {
        b'E' => Mode::Echo,
        b'D' => Mode::Download,
        _ => return None,
    };
    let len = u64::from_be_bytes(header[1..].try_into().ok()?);
    Some((mode, len))
}

pub fn server_line(local: SocketAddr, peer: SocketAddr) -> String {
    format!("{LINE_PREFIX}local={local} peer={peer}\n")
}

/// Parse the server line (without its `\n`) into (local, peer).
pub fn parse_server_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix(LINE_PREFIX)?;
    let (local, peer) = rest.split_once(' ')?;
    let local = local.strip_prefix("local=")?.parse().ok()?;
    let peer = peer.strip_prefix("peer=")?.parse().ok()?;
    Some((local, peer))
}

/// `eddy-probe echo`: one checksummed round trip.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EchoReport {
    pub ok: bool,
    pub error: Option<String>,
    /// The address dialled.
    pub target: Option<SocketAddr>,
    /// getpeername() of the client socket: the proxy's address when eddy redirected it.
    pub peer: Option<SocketAddr>,
    /// getsockname() of the client socket.
    pub local: Option<SocketAddr>,
    /// Microseconds spent in connect().
    pub connect_us: u64,
    /// Where the server saw the connection arrive (the original destination).
    pub server_local: Option<SocketAddr>,
    /// Who the server saw connecting (eddy's upstream socket when proxied).
    pub server_peer: Option<SocketAddr>,
    pub bytes: u64,
    pub sha256_match: bool,
}

/// `eddy-probe many`: concurrent checksummed echoes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ManyReport {
    pub conns: u64,
    pub ok: u64,
    /// Connections that failed (connect error, timeout, short read).
    pub failed: u64,
    /// Connections that completed but whose echoed bytes differ from what was sent.
    pub mismatched: u64,
    /// getpeername() results and how many connections saw each.
    pub peers: BTreeMap<String, u64>,
    /// A few distinct error messages, for diagnosis.
    pub errors: Vec<String>,
    pub elapsed_ms: u64,
}

/// `eddy-probe hold`: connections held open (idle clients, slowloris).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HoldReport {
    pub conns: u64,
    pub failed_connect: u64,
    /// Closed by the server before the hold ended.
    pub closed_by_peer: u64,
    pub open_at_end: u64,
    pub errors: Vec<String>,
}

/// `eddy-probe connect-latency`: sequential connect() timings.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencyReport {
    pub count: u64,
    pub ok: u64,
    pub failed: u64,
    pub median_us: u64,
    pub p90_us: u64,
    pub min_us: u64,
    pub max_us: u64,
    /// getpeername() of the last successful connection.
    pub peer: Option<SocketAddr>,
    pub errors: Vec<String>,
}

/// `eddy-probe download`: one bulk transfer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DownloadReport {
    pub ok: bool,
    pub error: Option<String>,
    pub peer: Option<SocketAddr>,
    pub bytes: u64,
    /// From the start of connect() to the last byte.
    pub elapsed_us: u64,
    pub mib_per_s: f64,
}

/// `eddy-probe https-get`: one GET over TLS, the body read and discarded.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HttpsGetReport {
    pub ok: bool,
    pub error: Option<String>,
    pub peer: Option<SocketAddr>,
    /// The negotiated ALPN protocol (`http/1.1`, `h2`) and TLS cipher suite.
    pub alpn: Option<String>,
    pub cipher: Option<String>,
    pub status: u16,
    /// Content-Length as the server announced it (absent: none was sent).
    pub content_length: Option<u64>,
    /// Body bytes received, and in how many pieces (HTTP/1.1: reads that returned data;
    /// HTTP/2: DATA frames as hyper hands them over).
    pub bytes: u64,
    pub chunks: u64,
    /// From the start of connect() to the last body byte.
    pub elapsed_us: u64,
    /// From the end of the response header to the last body byte.
    pub body_us: u64,
    /// bytes / elapsed, in 10^9 bytes per second.
    pub gb_per_s: f64,
    /// CPU seconds (user + system) of this process: all of it, and during the transfer
    /// (connect to the last byte).
    pub cpu_s: f64,
    pub transfer_cpu_s: f64,
    /// With `--sha256`: whether the body's digest matched the `sha256:` digest in the path.
    pub sha256_match: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let header = encode_header(Mode::Download, 1 << 40);
        assert_eq!(decode_header(&header), Some((Mode::Download, 1 << 40)));
        assert_eq!(decode_header(&[b'X'; HEADER_LEN]), None);
    }

    #[test]
    fn server_line_round_trip() {
        let local: SocketAddr = "[fd00::1]:443".parse().unwrap();
        let peer: SocketAddr = "10.1.2.2:40000".parse().unwrap();
        let line = server_line(local, peer);
        assert!(line.len() < MAX_LINE);
        assert_eq!(parse_server_line(line.trim_end()), Some((local, peer)));
    }
}
