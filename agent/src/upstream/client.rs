//! Talking to upstream registries.
//!
//! Every socket eddy opens towards an original destination carries eddy's SO_MARK, which
//! the connect hooks recognise and leave alone: even if eddy runs inside the hooked cgroup,
//! its own connections are never redirected back to itself.
//!
//! The HTTP client dials a registry host at the ORIGINAL destination address containerd
//! chose (learned per connection, see [`Pins`]), with SNI set to the host name, so eddy
//! reaches exactly the server containerd would have. Hosts it never saw intercepted (CDN
//! hosts named by a 307) are resolved through DNS like any client would.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client,
    },
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_util::either::Either;

pub use crate::node::error::BoxError;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// containerd follows up to 10 redirects; so do we.
const MAX_REDIRECTS: usize = 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {host}: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("invalid URI {uri}")]
    Uri { uri: String },
    #[error("request to {uri}: {source}")]
    Request {
        uri: Uri,
        source: hyper_util::client::legacy::Error,
    },
    #[error("more than {MAX_REDIRECTS} redirects from {uri}")]
    TooManyRedirects { uri: Uri },
    /// Not tried: it could not be reached moments ago (registry chains, `chain`).
    #[error("{host} could not be reached moments ago; not retried yet")]
    RecentlyUnreachable { host: String },
}

impl UpstreamError {
    /// The upstream could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        !matches!(self, UpstreamError::TooManyRedirects { .. })
    }
}

/// Connect to `addr` from a socket marked with `mark`.
pub async fn connect(addr: SocketAddr, mark: u32) -> Result<TcpStream, UpstreamError> {
    let err = |source| UpstreamError::Connect { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket2::SockRef::from(&socket)
        .set_mark(mark)
        .map_err(err)?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(err)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// host:port → the original destination containerd dialled for it.
#[derive(Clone, Default)]
pub struct Pins(Arc<RwLock<HashMap<String, SocketAddr>>>);

impl Pins {
    pub fn pin(&self, authority: &str, addr: SocketAddr) {
        let key = authority.to_ascii_lowercase();
        if self.0.read().unwrap().get(&key) != Some(&addr) {
            self.0.write().unwrap().insert(key, addr);
        }
    }

    fn get(&self, authority: &str) -> Option<SocketAddr> {
        self.0.read().unwrap().get(authority).copied()
    }
}

/// The hyper connector: pinned address or DNS, marked socket, TLS with ALPN.
#[derive(Clone)]
struct Connector {
    pins: Pins,
    tls: TlsConnector,
    mark: u32,
}

pub struct UpstreamConn {
    io: TokioIo<Either<TcpStream, TlsStream<TcpStream>>>,
    h2: bool,
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for UpstreamConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamConn;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamConn, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.dial(uri).await })
    }
}

impl Connector {
    async fn dial(&self, uri: Uri) -> Result<UpstreamConn, UpstreamError> {
        let bad_uri = || UpstreamError::Uri {
            uri: uri.to_string(),
        };
        let host = uri.host().ok_or_else(bad_uri)?;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = match self.pins.get(&authority(host, port, https)) {
            Some(addr) => addr,
            None => resolve(host, port).await?,
        };
        let tcp = connect(addr, self.mark).await?;
        if !https {
            return Ok(UpstreamConn {
                io: TokioIo::new(Either::Left(tcp)),
                h2: false,
            });
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name =
            rustls::pki_types::ServerName::try_from(bare.to_string()).map_err(|_| bad_uri())?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|source| UpstreamError::Tls {
                host: host.to_string(),
                source,
            })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(UpstreamConn {
            io: TokioIo::new(Either::Right(tls)),
            h2,
        })
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, UpstreamError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    tokio::net::lookup_host((bare, port))
        .await
        .map_err(|source| UpstreamError::Resolve {
            host: host.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| UpstreamError::Resolve {
            host: host.to_string(),
            source: std::io::ErrorKind::NotFound.into(),
        })
}

/// `host[:port]`, the port omitted when it is the scheme's default (as in Host headers).
pub fn authority(host: &str, port: u16, https: bool) -> String {
    let default = if https { 443 } else { 80 };
    let host = host.to_ascii_lowercase();
    if port == default {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// An IP address as the host part of a URI (IPv6 in brackets).
pub fn ip_host(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// A pooled HTTP/1.1 + HTTP/2 client for upstream registries and their CDNs.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, Body>,
    pub pins: Pins,
}

impl Upstream {
    pub fn new(tls: Arc<rustls::ClientConfig>, mark: u32) -> Self {
        let pins = Pins::default();
        let connector = Connector {
            pins: pins.clone(),
            tls: TlsConnector::from(tls),
            mark,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_initial_stream_window_size(4 << 20)
            .http2_initial_connection_window_size(8 << 20)
            .build(connector);
        Upstream { client, pins }
    }

    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let uri = req.uri().clone();
        self.client
            .request(req)
            .await
            .map_err(|source| UpstreamError::Request { uri, source })
    }

    /// GET/HEAD `uri`, following redirects as containerd would: the registry's 307 to a CDN
    /// is followed here, and never reaches the client. Authorization is dropped when a
    /// redirect leaves the host (signed CDN URLs reject it, and it must not leak).
    pub async fn fetch_following(
        &self,
        method: Method,
        uri: Uri,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut uri = uri;
        let mut headers = headers.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .body(empty())
                .expect("method and uri are valid");
            *req.headers_mut() = headers.clone();
            let resp = self.send(req).await?;
            if !is_redirect(resp.status()) {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| resolve_location(&uri, l))
            else {
                return Ok(resp);
            };
            if next.authority() != uri.authority() {
                headers.remove(header::AUTHORIZATION);
            }
            uri = next;
        }
        Err(UpstreamError::TooManyRedirects { uri })
    }
}

/// Fail a body stream that stops delivering for `idle`: a stalled upstream must not hold a
/// shared fill (and every client waiting on it) forever.
pub fn idle_timeout<S, T, E>(
    stream: S,
    idle: Duration,
) -> impl futures_util::Stream<Item = Result<T, BoxError>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<T, E>> + Send + Unpin + 'static,
    E: Into<BoxError>,
    T: Send + 'static,
{
    futures_util::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(idle, futures_util::StreamExt::next(&mut stream)).await {
            Ok(Some(Ok(item))) => Some((Ok(item), Some(stream))),
            Ok(Some(Err(e))) => Some((Err(e.into()), None)),
            Ok(None) => None,
            Err(_) => Some((
                Err(format!("upstream sent nothing for {idle:?}").into()),
                None,
            )),
        }
    })
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Resolve a Location header against the request URI (absolute, or absolute-path).
pub fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    let parsed: Uri = location.parse().ok()?;
    if parsed.scheme().is_some() {
        return Some(parsed);
    }
    if !location.starts_with('/') {
        return None;
    }
    Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(location)
        .build()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_redirects() {
        let base: Uri = "https://registry.test/v2/a/blobs/sha256:1".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "/other/path?x=1")
                .unwrap()
                .to_string(),
            "https://registry.test/other/path?x=1"
        );
        assert_eq!(
            resolve_location(&base, "https://cdn.test:8443/blob?sig=abc")
                .unwrap()
                .to_string(),
            "https://cdn.test:8443/blob?sig=abc"
        );
        assert!(resolve_location(&base, "relative").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_idle_timeout() {
        use futures_util::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<u32, std::io::Error>>(1);
        let stream = tokio_stream_from(rx);
        let mut s = Box::pin(idle_timeout(stream, Duration::from_secs(5)));
        tx.send(Ok(1)).await.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap(), 1);
        // Nothing more arrives: the paused clock jumps to the timeout.
        assert!(s.next().await.unwrap().is_err());
        assert!(s.next().await.is_none());
        drop(tx);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + Unpin + 'static {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    #[test]
    fn authority_omits_default_ports() {
        assert_eq!(authority("GHCR.io", 443, true), "ghcr.io");
        assert_eq!(authority("10.0.0.1", 32000, false), "10.0.0.1:32000");
        assert_eq!(authority("10.0.0.1", 80, false), "10.0.0.1");
    }
}
