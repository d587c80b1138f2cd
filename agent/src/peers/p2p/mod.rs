//! P2P between eddy nodes: a libp2p swarm (TCP, noise, yamux, optional pnet) with Kademlia
//! provider records for "who has this digest", and a stream protocol that serves content
//! from one node's [`PeerShare`] to another.
//!
//! - `config`: flags, the swarm key, bootstrap addresses and the node's identity.
//! - `swarm`: the behaviour and the task that owns the swarm (dialling, advertising).
//! - `protocol`: the wire messages of the blob protocol.
//! - `serve`: the serving side of it.
//! - `data`: the data port, where bodies move over TLS at hardware AES speed, by tickets
//!   handed out over the swarm.
//!
//! [`P2p`] is the handle the rest of eddy uses: which peer to ask and when is decided by
//! the caller; this module moves records and bytes.
mod claims;
pub mod config;
pub mod data;
mod error;
pub mod metrics;
mod network;
pub mod protocol;
mod serve;
mod swarm;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt as _, StreamExt as _};
use libp2p::{futures::AsyncReadExt, kad, multiaddr::Protocol, Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::TokioAsyncReadCompatExt as _;
use tracing::debug;

pub use self::{
    config::P2pConfig,
    error::{P2pError, PeerError},
    metrics::P2pMetrics,
};
use self::{
    data::DataServer,
    protocol::{Request, Response, BLOB_PROTOCOL},
    swarm::{Command, Shared},
};
use crate::{
    node::sync::lock,
    oci::digest::Digest,
    sources::source::{Opened, PeerShare, TagAnswer},
};

/// Connecting to a peer, sending the request and reading its answer's header must fit in
/// this: a peer slower than that is treated as failed and the caller moves on.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// A blob request's answer may take longer: a node serving a fill in flight answers once its
/// upstream has (the serving side bounds that wait to the same 10 s). The callers that ask
/// several providers bound their own wait far below this (`peers`: hedging).
pub const BLOB_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A body that delivers no byte for this long fails (the caller resumes elsewhere with a
/// Range from where it stopped).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams tried per request (see [`P2p::request`]); the pauses between them add 0.35 s.
const REQUEST_ATTEMPTS: u32 = 4;
/// Bytes read from the stream per read call, and about the size of the chunks handed on.
const READ_CHUNK: usize = 256 * 1024;
/// A peer whose data port could not be used (a firewall between nodes, say) gets its
/// bodies in-band for this long, rather than a failed connect on every fetch.
const DIRECT_AVOID_FOR: Duration = Duration::from_secs(300);

/// A connected peer, for `eddy status` (`GET /peers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    /// Its listen addresses (from identify), else the addresses it is connected on.
    pub addresses: Vec<String>,
    /// Seconds since the Unix epoch.
    pub connected_since: u64,
}

/// This node's identity and peers: `GET /peers` on the admin listener, for `eddy status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersReport {
    pub peer_id: String,
    pub listen: Vec<String>,
    pub peers: Vec<PeerInfo>,
}

/// The handle on this node's swarm. Cheap to clone; the swarm stops when the last clone
/// is dropped.
#[derive(Clone)]
pub struct P2p {
    inner: Arc<Inner>,
}

struct Inner {
    local: PeerId,
    commands: mpsc::UnboundedSender<Command>,
    control: libp2p_stream::Control,
    shared: Arc<Shared>,
    metrics: P2pMetrics,
    /// Wakes the advertising loop before its interval is up.
    reconcile_now: Arc<tokio::sync::Notify>,
    /// Peers whose data port failed, and since when (see [`DIRECT_AVOID_FOR`]).
    no_direct: Mutex<HashMap<PeerId, Instant>>,
    data: Arc<DataServer>,
    /// The claims this node keeps as the home of digests (see `claims`).
    claims: Arc<claims::Claims>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The swarm task ends with the last handle; the data port goes with it.
        self.data.stop();
    }
}

impl P2p {
    /// Starts the swarm task, the serving of inbound requests, the bootstrap dialling and
    /// the advertising of `share.digests()`. Returns once the node listens.
    pub async fn start(
        config: P2pConfig,
        share: Arc<dyn PeerShare>,
        metrics: P2pMetrics,
    ) -> Result<P2p, P2pError> {
        let keypair = config::load_or_create_identity(&config.identity_file)?;
        let local = keypair.public().to_peer_id();
        let mut swarm = swarm::build(&keypair, config.psk)?;
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control
            .accept(BLOB_PROTOCOL)
            .expect("the blob protocol is registered once per swarm");
        swarm
            .listen_on(config.listen.clone())
            .map_err(|e| P2pError::Listen(format!("{}: {e}", config.listen)))?;
        let shared = Arc::new(Shared::default());
        let mut driver = swarm::Driver::new(swarm, Arc::clone(&shared), metrics.clone());
        driver.wait_listening(Duration::from_secs(5)).await?;
        let data = DataServer::start(config.data_listen()).await?;
        tracing::info!(port = data.port(), "p2p data port listening");
        let (commands, rx) = mpsc::unbounded_channel();
        tokio::spawn(driver.run(rx));
        let claims = Arc::new(claims::Claims::default());
        tokio::spawn(serve::serve_inbound(
            incoming,
            serve::Serving {
                share: Arc::clone(&share),
                data: Arc::clone(&data),
                claims: Arc::clone(&claims),
                shared: Arc::clone(&shared),
                local,
                metrics: metrics.clone(),
            },
        ));
        if !config.bootstrap.is_empty() {
            tokio::spawn(resolve_loop(
                config.bootstrap.clone(),
                config.resolve_interval,
                commands.downgrade(),
            ));
        }
        let reconcile_now = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(reconcile_loop(
            share,
            config.reconcile_interval,
            commands.downgrade(),
            Arc::clone(&reconcile_now),
        ));
        Ok(P2p {
            inner: Arc::new(Inner {
                local,
                commands,
                control,
                shared,
                metrics,
                reconcile_now,
                no_direct: Mutex::new(HashMap::new()),
                data,
                claims,
            }),
        })
    }

    /// Re-advertise what the share holds now rather than at the next interval (a source
    /// learned new content).
    pub fn reconcile_soon(&self) {
        self.inner.reconcile_now.notify_one();
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.inner.local
    }

    /// The addresses this node listens on (with the real port when `--p2p-listen` said 0).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        lock(&self.inner.shared.listen_addrs).clone()
    }

    /// Starts providing `key`. Resolves true when the provider record was stored at the
    /// closest peers, false when `bound` passed first (the record is still published then,
    /// and re-published until [`P2p::stop_providing`]).
    pub async fn provide(&self, key: &[u8], bound: Duration) -> bool {
        let (reply, rx) = oneshot::channel();
        let command = Command::Provide {
            key: kad::RecordKey::new(&key),
            reply,
        };
        if self.inner.commands.send(command).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(bound, rx).await, Ok(Ok(true)))
    }

    pub fn stop_providing(&self, key: &[u8]) {
        let _ = self.inner.commands.send(Command::StopProviding {
            key: kad::RecordKey::new(&key),
        });
    }

    /// Other peers that provide `key`, deduplicated, as found until the lookup ends or
    /// `bound` passes.
    pub async fn providers(&self, key: &[u8], bound: Duration) -> Vec<PeerId> {
        let started = Instant::now();
        let (found, mut rx) = mpsc::unbounded_channel();
        let command = Command::Providers {
            key: kad::RecordKey::new(&key),
            found,
        };
        let mut out = Vec::new();
        if self.inner.commands.send(command).is_ok() {
            let mut seen = HashSet::new();
            let deadline = tokio::time::Instant::now() + bound;
            while let Ok(Some(peer)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                if peer != self.inner.local && seen.insert(peer) {
                    out.push(peer);
                }
            }
        }
        // Dropping `rx` tells the swarm task to finish the query.
        self.inner
            .metrics
            .lookup_seconds
            .observe(started.elapsed().as_secs_f64());
        out
    }

    /// Opens `digest` at `peer` from byte `from`. The bytes are not verified here: the
    /// store's fill does that before anything is committed.
    pub async fn fetch(
        &self,
        peer: PeerId,
        digest: &Digest,
        from: u64,
    ) -> Result<Opened, PeerError> {
        let mut direct = self.direct_allowed(&peer);
        // At most twice: a data port ticket that cannot be redeemed is followed by the same
        // request in-band.
        let result = loop {
            let request = Request::Blob {
                digest: *digest,
                from,
                direct,
            };
            match self.request(peer, &request).await {
                Ok((
                    stream,
                    Response::Blob {
                        len,
                        offset,
                        media_type,
                    },
                )) if offset == from => {
                    break Ok(Opened {
                        len,
                        offset,
                        media_type,
                        body: body_stream(stream, len - offset, self.inner.metrics.clone(), peer),
                    })
                }
                Ok((_, response @ Response::Direct { .. })) if direct => {
                    match self.redeem(peer, &response, from).await {
                        Ok(opened) => break Ok(opened),
                        Err(e) => {
                            debug!(%peer, %digest, error = %e, "p2p data port failed; asking in-band");
                            self.inner.metrics.failure("data_port");
                            lock(&self.inner.no_direct).insert(peer, Instant::now());
                            direct = false;
                        }
                    }
                }
                Ok((_, Response::NotFound)) => break Err(PeerError::NotFound),
                Ok((_, other)) => {
                    break Err(PeerError::Protocol(format!(
                        "answered {other:?} to a blob request from {from}"
                    )))
                }
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = &result {
            debug!(%peer, %digest, from, error = %e, "p2p fetch failed");
            self.report_failure(peer, e.reason());
        }
        result
    }

    /// Whether to offer `peer` to send bodies over its data port (not when it failed lately).
    fn direct_allowed(&self, peer: &PeerId) -> bool {
        let mut avoided = lock(&self.inner.no_direct);
        avoided.retain(|_, since| since.elapsed() < DIRECT_AVOID_FOR);
        !avoided.contains_key(peer)
    }

    /// The body a `Response::Direct` ticket names, from `peer`'s data port at the address
    /// this node is connected to it on.
    async fn redeem(&self, peer: PeerId, response: &Response, from: u64) -> Result<Opened, String> {
        let ticket = protocol::ticket_of(response)
            .map_err(|e| e.to_string())?
            .ok_or("not a ticket")?;
        let ip = self.peer_ip(&peer).ok_or("no address for the peer")?;
        let body = data::fetch(ip, &ticket).await.map_err(|e| e.to_string())?;
        if body.offset != from || body.offset > body.len {
            return Err(format!(
                "the data port sent offset {} of {} for {from}",
                body.offset, body.len
            ));
        }
        Ok(Opened {
            len: body.len,
            offset: body.offset,
            media_type: body.media_type,
            body: body_stream(
                body.stream.compat(),
                body.len - body.offset,
                self.inner.metrics.clone(),
                peer,
            ),
        })
    }

    /// The IP address this node is connected to `peer` on (else one it listens on).
    fn peer_ip(&self, peer: &PeerId) -> Option<IpAddr> {
        let peers = lock(&self.inner.shared.peers);
        let state = peers.get(peer)?;
        state
            .remote
            .iter()
            .chain(state.listen.iter())
            .find_map(|addr| {
                addr.iter().find_map(|p| match p {
                    Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
                    Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
                    _ => None,
                })
            })
    }

    /// The last-seen `registry/repository:tag` record at `peer`.
    pub async fn tag(
        &self,
        peer: PeerId,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<TagAnswer>, PeerError> {
        let request = Request::Tag {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
        };
        let result = match self.request(peer, &request).await {
            Ok((_, Response::Tag(answer))) => Ok(answer.map(Into::into)),
            Ok((_, other)) => Err(unexpected(&other, "a tag request")),
            Err(e) => Err(e),
        };
        self.reported(peer, result)
    }

    /// The peers connected right now.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        lock(&self.inner.shared.peers).keys().copied().collect()
    }

    /// Asks `home` who fetches `digest` from upstream for the cluster (see `claims`); this
    /// node's own claims when it is the home. `stale`: a fetcher that could not serve.
    pub async fn claim(
        &self,
        home: PeerId,
        digest: &Digest,
        stale: Option<PeerId>,
    ) -> Result<PeerId, PeerError> {
        let local = self.inner.local;
        if home == local {
            let shared = &self.inner.shared;
            return Ok(self.inner.claims.decide(*digest, local, stale, |p| {
                *p == local || shared.is_connected(p)
            }));
        }
        let request = Request::Claim {
            digest: *digest,
            stale: stale.map(|p| p.to_string()),
        };
        let result = match self.request(home, &request).await {
            Ok((_, Response::Fetcher(peer))) => peer
                .parse::<PeerId>()
                .map_err(|e| PeerError::Protocol(format!("claim answered {peer:?}: {e}"))),
            Ok((_, other)) => Err(unexpected(&other, "a claim")),
            Err(e) => Err(e),
        };
        self.reported(home, result)
    }

    /// `result`, a failure first reported against `peer`.
    fn reported<T>(&self, peer: PeerId, result: Result<T, PeerError>) -> Result<T, PeerError> {
        if let Err(e) = &result {
            self.report_failure(peer, e.reason());
        }
        result
    }

    pub fn peers(&self) -> Vec<PeerInfo> {
        let peers = lock(&self.inner.shared.peers);
        let mut out: Vec<PeerInfo> = peers
            .iter()
            .map(|(id, state)| {
                let addrs = if state.listen.is_empty() {
                    &state.remote
                } else {
                    &state.listen
                };
                PeerInfo {
                    peer_id: id.to_string(),
                    addresses: addrs.iter().map(|a| a.to_string()).collect(),
                    connected_since: state
                        .since
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    pub fn report(&self) -> PeersReport {
        PeersReport {
            peer_id: self.local_peer_id().to_string(),
            listen: self.listen_addrs().iter().map(|a| a.to_string()).collect(),
            peers: self.peers(),
        }
    }

    /// Counts a failed peer (`eddy_peer_failures_total{reason}`).
    pub fn report_failure(&self, peer: PeerId, reason: &'static str) {
        debug!(%peer, reason, "p2p peer failure");
        self.inner.metrics.failure(reason);
    }

    /// Opens a stream, sends `request` and reads the answer's header, all within
    /// [`HEADER_TIMEOUT`] ([`BLOB_HEADER_TIMEOUT`] for a blob). A stream that fails before the answer is tried again on a new
    /// stream, up to [`REQUEST_ATTEMPTS`] times with a short pause: under load, a busy
    /// peer's inbound queue drops streams (the client sees "connection is closed" while the
    /// connection itself stays up), and a failed claim or open costs an upstream fetch.
    async fn request(
        &self,
        peer: PeerId,
        request: &Request,
    ) -> Result<(libp2p::Stream, Response), PeerError> {
        let bound = match request {
            Request::Blob { .. } => BLOB_HEADER_TIMEOUT,
            _ => HEADER_TIMEOUT,
        };
        let deadline = tokio::time::Instant::now() + bound;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.request_once(peer, request, deadline).await {
                Err(e @ (PeerError::Connect(_) | PeerError::Protocol(_)))
                    if attempt < REQUEST_ATTEMPTS =>
                {
                    debug!(%peer, error = %e, attempt, "p2p request failed; trying a new stream");
                    tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
                }
                result => return result,
            }
        }
    }

    async fn request_once(
        &self,
        peer: PeerId,
        request: &Request,
        deadline: tokio::time::Instant,
    ) -> Result<(libp2p::Stream, Response), PeerError> {
        let mut control = self.inner.control.clone();
        let exchange = async move {
            let mut stream = control
                .open_stream(peer, BLOB_PROTOCOL)
                .await
                .map_err(|e| PeerError::Connect(e.to_string()))?;
            let protocol_error = |e: protocol::ProtocolError| PeerError::Protocol(e.to_string());
            protocol::write_header(&mut stream, request)
                .await
                .map_err(protocol_error)?;
            let header = protocol::read_header(&mut stream)
                .await
                .map_err(protocol_error)?;
            let response = protocol::decode_response(&header).map_err(protocol_error)?;
            Ok((stream, response))
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| PeerError::Timeout)?
    }
}

/// A peer's answer that does not fit `request` (e.g. "a claim").
fn unexpected(answer: &Response, request: &str) -> PeerError {
    PeerError::Protocol(format!("answered {answer:?} to {request}"))
}

/// The body of a fetch: exactly `remaining` bytes, or an error (a stall of
/// [`STALL_TIMEOUT`], a reset, or an end before the announced length).
fn body_stream<S>(
    stream: S,
    remaining: u64,
    metrics: P2pMetrics,
    peer: PeerId,
) -> crate::sources::source::ByteStream
where
    S: libp2p::futures::AsyncRead + Unpin + Send + 'static,
{
    struct Body<S> {
        stream: S,
        remaining: u64,
        scratch: Vec<u8>,
        metrics: P2pMetrics,
        peer: PeerId,
    }
    let body = Body {
        stream,
        remaining,
        scratch: vec![0; READ_CHUNK],
        metrics,
        peer,
    };
    futures_util::stream::unfold(Some(body), |body| async move {
        let mut b = body?;
        if b.remaining == 0 {
            return None;
        }
        let target = (b.remaining.min(READ_CHUNK as u64)) as usize;
        let mut filled = 0;
        let failure = match tokio::time::timeout(
            STALL_TIMEOUT,
            b.stream.read(&mut b.scratch[..target]),
        )
        .await
        {
            Ok(Ok(0)) => Some(("truncated", "the peer ended the body early".to_string())),
            Ok(Ok(n)) => {
                filled = n;
                None
            }
            Ok(Err(e)) => Some(("reset", format!("reading from the peer: {e}"))),
            Err(_) => Some((
                "stall",
                format!("no byte from the peer for {STALL_TIMEOUT:?}"),
            )),
        };
        if let Some((reason, message)) = failure {
            debug!(peer = %b.peer, reason, "p2p body failed");
            b.metrics.failure(reason);
            let err: crate::store::BoxError = message.into();
            return Some((Err(err), None));
        }
        // Gather what is already buffered into one chunk (yamux hands out frames of 16 KiB
        // or less; the store's fill and hashing work better on larger pieces), but never
        // wait for more: a slow sender's bytes are handed on as they come.
        let mut chunk = BytesMut::new();
        while filled < target {
            let n = match b.stream.read(&mut b.scratch[filled..target]).now_or_never() {
                Some(Ok(n)) if n > 0 => n,
                // Pending, or an end or error that the next read reports.
                _ => break,
            };
            filled += n;
        }
        chunk.extend_from_slice(&b.scratch[..filled]);
        b.remaining -= chunk.len() as u64;
        Some((Ok::<Bytes, crate::store::BoxError>(chunk.freeze()), Some(b)))
    })
    .boxed()
}

/// Resolves the bootstrap addresses now and every `every`, and has the swarm dial the ones
/// it is not connected to. Ends when the swarm does.
async fn resolve_loop(
    bootstrap: Vec<config::Bootstrap>,
    every: Duration,
    commands: mpsc::WeakUnboundedSender<Command>,
) {
    loop {
        let mut addrs = Vec::new();
        for b in &bootstrap {
            addrs.extend(b.resolve().await);
        }
        let Some(tx) = commands.upgrade() else { return };
        if addrs.is_empty() {
            debug!("p2p: no bootstrap address resolved; retrying");
        }
        if tx.send(Command::Dial(addrs)).is_err() {
            return;
        }
        drop(tx);
        tokio::time::sleep(every).await;
    }
}

/// Hands the swarm what `share` serves now, and every `every`, to advertise new digests
/// and withdraw gone ones.
async fn reconcile_loop(
    share: Arc<dyn PeerShare>,
    every: Duration,
    commands: mpsc::WeakUnboundedSender<Command>,
    now: Arc<tokio::sync::Notify>,
) {
    loop {
        let digests: HashSet<Digest> = share.digests().into_iter().collect();
        let Some(tx) = commands.upgrade() else { return };
        if tx.send(Command::Reconcile(digests)).is_err() {
            return;
        }
        drop(tx);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = now.notified() => {
                // A burst of changes (an image's layers) makes one round.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
