//! The proxy listener: accept redirected connections, recover their original destination
//! and pick a route from the connection's first bytes:
//! - a TLS ClientHello for a configured registry (by SNI, or by address when there is no
//!   SNI): terminate TLS with a leaf from eddy's CA and serve the registry API, if the
//!   client process trusts that CA (the trust gate, `trust`); else pass it through;
//! - a plain-HTTP `/v2` request: serve the registry API over HTTP;
//! - anything else: the transparent passthrough, bytes spliced to the original destination.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use http::Request;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::{
    hook::bpf::Bpf,
    listener::metrics::{route, DirectionLabels, ProxyMetrics},
    listener::peek::{self, Hello},
    listener::registries::Registries,
    registry::{Handler as RegistryHandler, Origin},
    tls::{self, Ca, RegistryName},
    trust::{self, ClientProcess, TrustGate, TrustVerdict},
    upstream::client as upstream,
};

/// Plaintext rustls buffers per connection before it must write to the socket.
const TLS_WRITE_BUFFER: usize = 1 << 20;
/// A client that sent its ClientHello but does not finish the handshake in this time is
/// dropped: a stalled handshake would otherwise hold its buffers for good.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send a whole request head within this time (slowloris); containerd sends
/// it in one write.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection handler needs.
pub struct Proxy {
    parts: ProxyParts,
    tls_by_sni: Arc<rustls::ServerConfig>,
    next_id: AtomicU64,
}

/// Where a connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Passthrough,
    /// Terminate TLS for this registry; `ip` when the client sent no SNI.
    Tls {
        authority: String,
        ip: Option<std::net::IpAddr>,
    },
    Http,
}

/// What a [`Proxy`]'s connection handlers depend on, each a separate dependency.
pub struct ProxyParts {
    pub bpf: Arc<Bpf>,
    pub metrics: ProxyMetrics,
    pub socket_mark: u32,
    pub registries: Registries,
    pub ca: Arc<Ca>,
    pub registry: Arc<RegistryHandler>,
    /// Decides, per client process, whether terminating TLS is safe.
    pub trust: Arc<TrustGate>,
    /// Flips to true on SIGTERM: HTTP connections then close once idle.
    pub shutdown: watch::Receiver<bool>,
}

impl Proxy {
    pub fn new(parts: ProxyParts) -> Self {
        Proxy {
            tls_by_sni: tls::server_config(Arc::clone(&parts.ca)),
            parts,
            next_id: AtomicU64::new(1),
        }
    }

    /// Accept on `listener` until `shutdown` flips, then take what is already queued (those
    /// clients were redirected before the hooks were detached and expect an answer).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        tasks: TaskTracker,
    ) {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.spawn(stream, peer, &tasks),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        while let Ok(Ok((stream, peer))) =
            tokio::time::timeout(Duration::from_millis(20), listener.accept()).await
        {
            self.spawn(stream, peer, &tasks);
        }
    }

    fn spawn(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, tasks: &TaskTracker) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, client = %peer);
        tasks.spawn(Arc::clone(self).handle(stream, peer).instrument(span));
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let Ok(local) = client.local_addr() else {
            return;
        };
        let Some((orig, process)) = self.parts.bpf.take_orig_dst(peer, local) else {
            // Someone dialled the proxy port directly: there is nowhere to send it.
            self.parts.metrics.connection(route::NO_ORIG_DST);
            debug!("no original destination recorded; closing");
            return;
        };
        self.parts.metrics.active.inc();
        let hello = peek::classify(&client).await;
        match route(&hello, orig, &self.parts.registries, &self.parts.ca) {
            Route::Passthrough => {
                self.parts.metrics.connection(route::PASSTHROUGH);
                if let Err(e) = self.passthrough(client, orig).await {
                    debug!(dst = %orig, error = %e, "passthrough ended with an error");
                }
            }
            Route::Tls { authority, ip } => match self.parts.trust.judge(process).await {
                TrustVerdict::Untrusting(reason) => {
                    // A client that does not trust eddy's CA would fail the handshake:
                    // its pull must still work, so leave the connection alone.
                    self.parts.metrics.connection(route::PASSTHROUGH_UNTRUSTED);
                    debug!(pid = process.tgid, reason = reason.label(), dst = %orig, "untrusting client; passing through");
                    if let Err(e) = self.passthrough(client, orig).await {
                        debug!(dst = %orig, error = %e, "passthrough ended with an error");
                    }
                }
                TrustVerdict::Trusting => {
                    self.terminate(client, authority, ip, orig, process).await
                }
            },
            Route::Http => {
                self.parts.metrics.connection(route::REGISTRY_HTTP);
                self.serve_http(client, None, orig).await;
            }
        }
        self.parts.metrics.active.dec();
    }

    /// Terminate TLS with a leaf from eddy's CA and serve the registry API. A client that
    /// rejects the certificate anyway puts its executable under the trust gate's guard.
    async fn terminate(
        &self,
        client: TcpStream,
        authority: String,
        ip: Option<std::net::IpAddr>,
        orig: SocketAddr,
        process: ClientProcess,
    ) {
        self.parts.metrics.connection(route::REGISTRY_TLS);
        self.parts.registry.upstream().pins.pin(&authority, orig);
        let config = match ip {
            Some(ip) => tls::server_config_for_ip(Arc::clone(&self.parts.ca), ip),
            None => Arc::clone(&self.tls_by_sni),
        };
        let handshake = tokio_rustls::TlsAcceptor::from(config).accept(client);
        let Ok(handshake) = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await else {
            debug!("TLS handshake with the client timed out");
            return;
        };
        match handshake {
            Ok(mut tls) => {
                // rustls encrypts at most this much per write (default 64 KiB):
                // larger batches mean fewer, larger socket writes for layer bytes.
                tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
                let origin = Origin {
                    scheme: http::uri::Scheme::HTTPS,
                    authority,
                };
                self.serve_http(tls, Some(Arc::new(origin)), orig).await;
            }
            Err(e) if trust::is_certificate_rejection(&e) => {
                debug!(error = %e, "the client rejected eddy's certificate");
                self.parts.trust.record_rejection(&process);
            }
            Err(e) => debug!(error = %e, "TLS handshake with the client failed"),
        }
    }

    /// Serve the registry API on a (decrypted) stream, HTTP/1.1 or HTTP/2.
    async fn serve_http<IO>(&self, io: IO, origin: Option<Arc<Origin>>, orig: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let registry = Arc::clone(&self.parts.registry);
        let service = service_fn(move |req: Request<Incoming>| {
            let origin = match &origin {
                Some(o) => Arc::clone(o),
                None => Arc::new(plain_http_origin(&req, orig, &registry)),
            };
            let registry = Arc::clone(&registry);
            async move { Ok::<_, std::convert::Infallible>(registry.handle(origin, req).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Hand body chunks to the TLS layer as they are, instead of copying them into
        // hyper's own write buffer first.
        builder
            .http1()
            .writev(true)
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder
            .http2()
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(1 << 20);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut shutdown = self.parts.shutdown.clone();
        let result = if *shutdown.borrow_and_update() {
            conn.as_mut().graceful_shutdown();
            conn.await
        } else {
            tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.changed() => {
                    // Finish the requests in flight, then close: an idle keep-alive
                    // connection must not hold up the drain.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "registry connection ended with an error");
        }
    }

    async fn passthrough(&self, client: TcpStream, orig: SocketAddr) -> std::io::Result<()> {
        let _ = client.set_nodelay(true);
        let upstream = match upstream::connect(orig, self.parts.socket_mark).await {
            Ok(s) => s,
            Err(e) => {
                self.parts.metrics.upstream_connect_errors.inc();
                // Reset rather than close, so the client sees a failed connection as it
                // would have dialling direct, not an empty response.
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return Err(std::io::Error::other(e));
            }
        };
        debug!(dst = %orig, "passthrough");
        let (up, down) = crate::listener::splice::bidirectional(&client, &upstream).await?;
        let bytes = &self.parts.metrics.bytes;
        bytes
            .get_or_create(&DirectionLabels {
                direction: "upload",
            })
            .inc_by(up);
        bytes
            .get_or_create(&DirectionLabels {
                direction: "download",
            })
            .inc_by(down);
        Ok(())
    }
}

/// A plain-HTTP request names its registry in the Host header; the connection's original
/// destination is where that registry lives.
fn plain_http_origin(
    req: &Request<Incoming>,
    orig: SocketAddr,
    registry: &RegistryHandler,
) -> Origin {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_ascii_lowercase())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_ascii_lowercase)
        })
        .unwrap_or_else(|| upstream::authority(&orig.ip().to_string(), orig.port(), false));
    registry.upstream().pins.pin(&authority, orig);
    Origin {
        scheme: http::uri::Scheme::HTTP,
        authority,
    }
}

/// Pick the route for a connection from its first bytes and original destination.
pub fn route(hello: &Hello, orig: SocketAddr, registries: &Registries, ca: &Ca) -> Route {
    let name = match hello {
        Hello::Tls { sni: Some(sni) } if registries.has_host(sni) => RegistryName::Dns(sni.clone()),
        Hello::Tls { sni: None } if registries.has_addr(orig) => RegistryName::Ip(orig.ip()),
        Hello::HttpRegistry => return Route::Http,
        _ => return Route::Passthrough,
    };
    if !ca.covers(&name) {
        // The CA's name constraints predate this registry: terminating would only
        // produce certificate errors, so leave the connection alone.
        warn!(
            ?name,
            "registry not covered by the CA's name constraints; passing through"
        );
        return Route::Passthrough;
    }
    match name {
        RegistryName::Dns(host) => Route::Tls {
            authority: upstream::authority(&host, orig.port(), true),
            ip: None,
        },
        RegistryName::Ip(ip) => Route::Tls {
            authority: upstream::authority(&upstream::ip_host(ip), orig.port(), true),
            ip: Some(ip),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(sni: &str) -> Hello {
        Hello::Tls {
            sni: Some(sni.into()),
        }
    }

    #[test]
    fn routes_by_sni_address_and_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let registries = Registries::parse(&["ghcr.io".into(), "10.0.0.9:5000".into()]).unwrap();
        let ca = Ca::load_or_create(dir.path(), Some(&registries.names())).unwrap();
        let orig: SocketAddr = "10.1.1.1:443".parse().unwrap();

        assert_eq!(
            route(&tls("ghcr.io"), orig, &registries, &ca),
            Route::Tls {
                authority: "ghcr.io".into(),
                ip: None
            }
        );
        let on_8443: SocketAddr = "10.1.1.1:8443".parse().unwrap();
        assert_eq!(
            route(&tls("ghcr.io"), on_8443, &registries, &ca),
            Route::Tls {
                authority: "ghcr.io:8443".into(),
                ip: None
            }
        );
        // Not a registry: untouched.
        assert_eq!(
            route(&tls("example.com"), orig, &registries, &ca),
            Route::Passthrough
        );
        assert_eq!(
            route(&Hello::Other, orig, &registries, &ca),
            Route::Passthrough
        );
        // No SNI: only a registry configured by address is terminated.
        let by_ip: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        assert_eq!(
            route(&Hello::Tls { sni: None }, by_ip, &registries, &ca),
            Route::Tls {
                authority: "10.0.0.9:5000".into(),
                ip: Some(by_ip.ip())
            }
        );
        assert_eq!(
            route(&Hello::Tls { sni: None }, orig, &registries, &ca),
            Route::Passthrough
        );
        assert_eq!(
            route(&Hello::HttpRegistry, orig, &registries, &ca),
            Route::Http
        );
    }

    #[test]
    fn a_registry_the_ca_cannot_sign_for_is_passed_through() {
        let dir = tempfile::tempdir().unwrap();
        let old = Registries::parse(&["ghcr.io".into()]).unwrap();
        let ca = Ca::load_or_create(dir.path(), Some(&old.names())).unwrap();
        // quay.io was added after the CA was created with its name constraints.
        let now = Registries::parse(&["ghcr.io".into(), "quay.io".into()]).unwrap();
        let orig: SocketAddr = "10.1.1.1:443".parse().unwrap();
        assert_eq!(route(&tls("quay.io"), orig, &now, &ca), Route::Passthrough);
        assert!(matches!(
            route(&tls("ghcr.io"), orig, &now, &ca),
            Route::Tls { .. }
        ));
    }
}
