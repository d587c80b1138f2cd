//! The serving side of the blob protocol: answers other nodes' requests from this node's
//! [`PeerShare`] only.
//!
//! Only swarm members reach this code: every connection is noise-authenticated (and, with a
//! swarm key, pnet-encrypted before that), so there is no anonymous access to check for
//! here. Requests are never recursive: an answer comes from `share.open` / `share.tag`
//! alone, never from a DHT lookup, another peer or the upstream registry, so two nodes
//! can never ask each other in a loop and a peer can never make this node pull anything.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use libp2p::{
    futures::{AsyncWriteExt, StreamExt, TryStreamExt},
    PeerId, Stream,
};
use tokio::sync::Semaphore;
use tracing::debug;

use super::{
    claims::Claims,
    data::DataServer,
    metrics::P2pMetrics,
    protocol::{self, Request, Response},
    swarm::Shared,
};
use crate::{node::sync::lock, sources::source::PeerShare};

/// Streams one peer may have open at once: enough for a pull's parallel layers, not enough
/// for one peer to take all of this node's file handles or bandwidth.
pub const MAX_INBOUND_PER_PEER: usize = 32;
/// The request header must arrive this soon after the stream opens.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `share.open` may take (a download in flight waits for upstream's first byte).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that reads nothing for this long is dropped.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the serving side needs besides the share: this node's data port (for clients
/// that can take a body there), the claims it keeps as a home node, and whether a peer is
/// still connected (a claim of a departed node does not stand).
pub(super) struct Serving {
    pub share: Arc<dyn PeerShare>,
    pub data: Arc<DataServer>,
    pub claims: Arc<Claims>,
    pub shared: Arc<Shared>,
    /// This node: a claim it holds itself stands while it runs.
    pub local: PeerId,
    pub metrics: P2pMetrics,
}

pub(super) async fn serve_inbound(mut incoming: libp2p_stream::IncomingStreams, serving: Serving) {
    let serving = Arc::new(serving);
    let limits: Mutex<HashMap<PeerId, Arc<Semaphore>>> = Mutex::new(HashMap::new());
    while let Some((peer, stream)) = incoming.next().await {
        let semaphore = {
            let mut limits = lock(&limits);
            if limits.len() > 1024 {
                limits.retain(|_, s| s.available_permits() < MAX_INBOUND_PER_PEER);
            }
            Arc::clone(
                limits
                    .entry(peer)
                    .or_insert_with(|| Arc::new(Semaphore::new(MAX_INBOUND_PER_PEER))),
            )
        };
        let Ok(permit) = semaphore.try_acquire_owned() else {
            debug!(%peer, "p2p: too many streams from one peer; refusing one");
            drop(stream);
            continue;
        };
        let serving = Arc::clone(&serving);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_one(&serving, peer, stream).await {
                debug!(%peer, error = %e, "p2p: request not served");
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("{0}")]
    Timeout(&'static str),
    #[error("reading the content: {0}")]
    Source(crate::store::BoxError),
    #[error("writing to the peer: {0}")]
    Write(std::io::Error),
}

async fn serve_one(serving: &Serving, peer: PeerId, mut stream: Stream) -> Result<(), ServeError> {
    let (share, data) = (&*serving.share, &*serving.data);
    let header = tokio::time::timeout(REQUEST_TIMEOUT, protocol::read_header(&mut stream))
        .await
        .map_err(|_| ServeError::Timeout("no request header"))??;
    match protocol::decode_request(&header)? {
        Request::Blob {
            digest,
            from,
            direct,
        } => {
            let opened = tokio::time::timeout(OPEN_TIMEOUT, share.open(&digest, from))
                .await
                .ok()
                .flatten();
            let Some(mut opened) = opened else {
                protocol::write_header(&mut stream, &Response::NotFound).await?;
                let _ = stream.close().await;
                return Ok(());
            };
            // Counted as the body leaves the source, on either path below.
            let sent = serving.metrics.sent_bytes.clone();
            opened.body = opened
                .body
                .inspect_ok(move |chunk| {
                    sent.inc_by(chunk.len() as u64);
                })
                .boxed();
            // The body goes over the data port when the client can take it there and a
            // ticket is free; in-band otherwise.
            if direct {
                match data.issue(opened) {
                    Ok(ticket) => {
                        protocol::write_header(&mut stream, &Response::from(&ticket)).await?;
                        return stream.close().await.map_err(ServeError::Write);
                    }
                    Err(back) => opened = back,
                }
            }
            protocol::write_header(
                &mut stream,
                &Response::Blob {
                    len: opened.len,
                    offset: opened.offset,
                    media_type: opened.media_type,
                },
            )
            .await?;
            let mut body = opened.body;
            while let Some(chunk) = body.next().await {
                // A source error ends the stream early: the client sees fewer bytes than
                // the header announced and resumes elsewhere.
                let chunk = chunk.map_err(ServeError::Source)?;
                tokio::time::timeout(WRITE_STALL_TIMEOUT, stream.write_all(&chunk))
                    .await
                    .map_err(|_| ServeError::Timeout("the peer stopped reading"))?
                    .map_err(ServeError::Write)?;
            }
            stream.close().await.map_err(ServeError::Write)
        }
        Request::Tag {
            registry,
            repository,
            tag,
        } => {
            let answer = share.tag(&registry, &repository, &tag).map(Into::into);
            protocol::write_header(&mut stream, &Response::Tag(answer)).await?;
            stream.close().await.map_err(ServeError::Write)
        }
        Request::Claim { digest, stale } => {
            // The claimant is the authenticated peer on this stream: a node can claim for
            // itself only.
            let stale = stale.and_then(|s| s.parse::<PeerId>().ok());
            let alive = |p: &PeerId| *p == serving.local || serving.shared.is_connected(p);
            let fetcher = serving.claims.decide(digest, peer, stale, alive);
            let answer = Response::Fetcher(fetcher.to_string());
            protocol::write_header(&mut stream, &answer).await?;
            stream.close().await.map_err(ServeError::Write)
        }
    }
}
