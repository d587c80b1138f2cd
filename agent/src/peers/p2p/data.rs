//! The data port: blob bodies between nodes over TLS on a TCP port of its own, beside the
//! swarm connection.
//!
//! The swarm connection (pnet, noise, yamux) finds and authenticates peers and carries the
//! requests, but its per-byte cost (pnet's XSalsa20 and noise's ChaCha20-Poly1305, both in
//! software, plus yamux framing) held a transfer to 0.2–0.45 GB/s on this project's 2-core
//! machines. Bodies therefore move over one TLS 1.3 connection per fetch (rustls with ring:
//! AES-GCM in hardware), authenticated both ways through the swarm:
//! - The server's certificate is self-signed, made at start and never stored. The client
//!   learned its SHA-256 over the authenticated swarm stream and accepts nothing else.
//! - The client presents a one-time ticket: 32 random bytes that the server gave that peer
//!   over the same swarm stream, valid for [`TICKET_TTL`].
//!
//! A node outside the swarm (no swarm key, so no swarm connection) never gets a ticket, so
//! the port serves it nothing; what the port serves is exactly what the blob protocol would
//! have streamed in-band. A ticket holds the opened content, so the body starts at once.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::protocol::{self, Response, Ticket, Token};
use crate::{node::sync::lock, sources::source::Opened};

/// How long a ticket waits for its data connection.
pub const TICKET_TTL: Duration = Duration::from_secs(10);
/// Tickets outstanding at once; past it, bodies go in-band over the swarm stream.
const MAX_TICKETS: usize = 256;
/// TCP connect, TLS handshake and the ticket, each way.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// A client that reads nothing for this long is dropped.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The name in the certificate and in the client's SNI; the pin is what is checked.
const SERVER_NAME: &str = "peer.eddy.invalid";
const ALPN: &[u8] = b"eddy-blob/1";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data port certificate: {0}")]
    Certificate(String),
    #[error("data port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("the data port answered {0}")]
    Unexpected(String),
}

pub(super) struct Held {
    opened: Opened,
    expires: Instant,
}

/// The serving side: the listener's port, the certificate and the tickets handed out.
pub struct DataServer {
    port: u16,
    cert_sha256: [u8; 32],
    acceptor: TlsAcceptor,
    pub(super) tickets: Mutex<HashMap<Token, Held>>,
    /// Ends the listener and every connection (the swarm stopped).
    stop: CancellationToken,
}

impl DataServer {
    /// Binds `addr` (port 0: any) and serves it until [`DataServer::stop`].
    pub async fn start(addr: SocketAddr) -> Result<Arc<DataServer>, DataError> {
        let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| DataError::Certificate(e.to_string()))?;
        let cert_der = cert.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| DataError::Certificate(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key)
            .map_err(|e| DataError::Certificate(e.to_string()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DataError::Bind { addr, source })?;
        let port = listener.local_addr()?.port();
        let server = Arc::new(DataServer {
            port,
            cert_sha256: Sha256::digest(cert_der.as_ref()).into(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
            tickets: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&server).accept_loop(listener));
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops listening and closes every data connection, as the node leaving would.
    pub fn stop(&self) {
        self.stop.cancel();
        lock(&self.tickets).clear();
    }

    /// Holds `opened` for one data connection; None when too many tickets are out (the
    /// caller then streams `opened` in-band, so it is handed back).
    pub fn issue(&self, opened: Opened) -> Result<Ticket, Opened> {
        let mut tickets = lock(&self.tickets);
        let now = Instant::now();
        tickets.retain(|_, held| held.expires > now);
        if tickets.len() >= MAX_TICKETS {
            return Err(opened);
        }
        let token: Token = rand::random();
        tickets.insert(
            token,
            Held {
                opened,
                expires: now + TICKET_TTL,
            },
        );
        Ok(Ticket {
            port: self.port,
            cert_sha256: self.cert_sha256,
            token,
        })
    }

    fn redeem(&self, token: &Token) -> Option<Opened> {
        let mut tickets = lock(&self.tickets);
        let held = tickets.remove(token)?;
        (held.expires > Instant::now()).then_some(held.opened)
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, from) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    debug!(error = %e, "p2p data port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = Arc::clone(&self);
            tokio::spawn(async move {
                tokio::select! {
                    _ = server.stop.cancelled() => {}
                    served = server.serve_one(tcp) => if let Err(e) = served {
                        debug!(%from, error = %e, "p2p data port: connection not served");
                    },
                }
            });
        }
    }

    async fn serve_one(&self, tcp: TcpStream) -> Result<(), DataError> {
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut tls = self.acceptor.accept(tcp).await?;
            let mut token = [0u8; 32];
            tls.read_exact(&mut token).await?;
            Ok::<_, std::io::Error>((tls, token))
        };
        let (mut tls, token) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| DataError::Timeout("no TLS handshake and ticket"))??;
        // An unknown or expired ticket gets nothing, not even an answer.
        let Some(opened) = self.redeem(&token) else {
            return Err(DataError::Unexpected("an unknown ticket".into()));
        };
        let header = protocol::encode_header(&Response::Blob {
            len: opened.len,
            offset: opened.offset,
            media_type: opened.media_type,
        })?;
        tls.write_all(&header).await?;
        let mut body = opened.body;
        while let Some(chunk) = body.next().await {
            // A source error ends the body early: the client sees fewer bytes than the
            // header announced and resumes elsewhere.
            let chunk = chunk.map_err(|e| DataError::Unexpected(format!("source: {e}")))?;
            tokio::time::timeout(WRITE_STALL_TIMEOUT, tls.write_all(&chunk))
                .await
                .map_err(|_| DataError::Timeout("the peer stopped reading"))??;
        }
        tls.shutdown().await?;
        Ok(())
    }
}

/// A body's header from the data port at `ip` and the connection its bytes follow on.
pub struct DataBody {
    pub len: u64,
    pub offset: u64,
    pub media_type: Option<String>,
    pub stream: TlsStream<TcpStream>,
}

/// Redeems `ticket` at `ip`: connects, checks the certificate against the pin, sends the
/// token and reads the header.
pub async fn fetch(ip: std::net::IpAddr, ticket: &Ticket) -> Result<DataBody, DataError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| DataError::Certificate(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
            sha256: ticket.cert_sha256,
            provider: provider(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    let addr = SocketAddr::new(ip, ticket.port);
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(&ticket.token).await?;
        tls.flush().await?;
        let header = read_header(&mut tls).await?;
        Ok::<_, DataError>((tls, header))
    };
    let (stream, header) = tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| DataError::Timeout("the data port did not answer in time"))??;
    match protocol::decode_response(&header)? {
        Response::Blob {
            len,
            offset,
            media_type,
        } => Ok(DataBody {
            len,
            offset,
            media_type,
            stream,
        }),
        other => Err(DataError::Unexpected(format!("{other:?}"))),
    }
}

async fn read_header(tls: &mut TlsStream<TcpStream>) -> Result<Vec<u8>, DataError> {
    let mut len = [0u8; 4];
    tls.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > protocol::MAX_HEADER {
        return Err(protocol::ProtocolError::TooLarge(len).into());
    }
    let mut buf = vec![0u8; len];
    tls.read_exact(&mut buf).await?;
    Ok(buf)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the certificate whose SHA-256 came over the swarm, and checks that the
/// server holds its key (the handshake signature).
#[derive(Debug)]
struct PinnedCertificate {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the data port's certificate is not the one the peer named".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn opened(data: &'static [u8], from: u64) -> Opened {
        let body = futures_util::stream::iter(vec![Ok(Bytes::from_static(&data[from as usize..]))]);
        Opened {
            len: data.len() as u64,
            offset: from,
            body: body.boxed(),
            media_type: None,
        }
    }

    async fn body_of(mut b: DataBody) -> Vec<u8> {
        let mut out = Vec::new();
        b.stream.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_ticket_fetches_its_body_once() {
        let server = DataServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let ticket = server.issue(opened(b"hello, peer", 7)).ok().unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        let body = fetch(ip, &ticket).await.unwrap();
        assert_eq!((body.len, body.offset), (11, 7));
        assert_eq!(body_of(body).await, b"peer");
        // Used once: the same ticket again gets nothing.
        assert!(fetch(ip, &ticket).await.is_err());
    }

    #[tokio::test]
    async fn a_made_up_ticket_or_another_certificate_gets_nothing() {
        let server = DataServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let real = server.issue(opened(b"secret", 0)).ok().unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        let made_up = Ticket {
            token: rand::random(),
            ..real.clone()
        };
        assert!(fetch(ip, &made_up).await.is_err());
        // A client expecting another certificate refuses the server before sending the token.
        let wrong_pin = Ticket {
            cert_sha256: [7; 32],
            ..real.clone()
        };
        let e = fetch(ip, &wrong_pin).await.err().unwrap();
        assert!(e.to_string().contains("certificate"), "{e}");
        // The real ticket was never spent by either attempt.
        assert_eq!(body_of(fetch(ip, &real).await.unwrap()).await, b"secret");
    }

    #[tokio::test]
    async fn tickets_expire_and_are_bounded() {
        let server = DataServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut issued = Vec::new();
        for _ in 0..MAX_TICKETS {
            issued.push(server.issue(opened(b"x", 0)).ok().unwrap());
        }
        assert!(
            server.issue(opened(b"x", 0)).is_err(),
            "more than MAX_TICKETS held"
        );
        // An expired ticket is refused and frees its place.
        {
            let mut tickets = server.tickets.lock().unwrap();
            let held = tickets.get_mut(&issued[0].token).unwrap();
            held.expires = Instant::now() - Duration::from_secs(1);
        }
        assert!(server.redeem(&issued[0].token).is_none());
        assert!(server.issue(opened(b"x", 0)).is_ok());
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = DataServer::start(addr).await.err().unwrap();
        assert!(
            e.to_string().starts_with(&format!("data port {addr}")),
            "{e}"
        );
    }
}
