//! Where content-addressed data can come from besides eddy's own store and the upstream
//! registry: containerd's content store on this node (`ContentSource`), and other nodes
//! (`PeerSource`, implemented by `peers`).
//!
//! The registry handler asks these sources in order (store → containerd → peers → upstream)
//! through the one small interface below, so a new source is a new module, not new branches
//! in the handler. Whatever a source returns goes through the store's fill, which verifies
//! the digest before anything is committed: a source never has to be trusted.
use bytes::Bytes;
use futures_util::{future::BoxFuture, stream::BoxStream};

use crate::{oci::digest::Digest, store::BoxError};

/// A body of content bytes.
pub type ByteStream = BoxStream<'static, Result<Bytes, BoxError>>;

/// Content a source opened.
pub struct Opened {
    /// The whole blob's length in bytes.
    pub len: u64,
    /// The offset in the blob of `body`'s first byte: the `from` that was asked for.
    pub offset: u64,
    pub body: ByteStream,
    /// The media type, where the source knows it (peers send the one upstream gave for a
    /// manifest; containerd's content store does not keep one).
    pub media_type: Option<String>,
}

/// A source of content by digest.
pub trait ContentSource: Send + Sync + 'static {
    /// The `source` label in metrics: `containerd` or `peer`.
    fn kind(&self) -> SourceKind;

    /// Opens `digest` from byte `from`. `None` means this source cannot serve it now, and the
    /// caller goes on to the next source; it must come quickly when the source lacks it.
    fn open(&self, digest: &Digest, from: u64) -> BoxFuture<'_, Option<Opened>>;
}

/// The last-seen tag → digest record that a node offers its peers for outages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagAnswer {
    pub digest: Digest,
    pub media_type: String,
    /// When this node last confirmed the mapping upstream (seconds since the Unix epoch), so
    /// a node asking several peers can take the newest.
    pub seen_at: u64,
}

/// What this node offers its peers. It answers from local sources only (the store, with
/// downloads in flight, and containerd), and public content only: a peer request is never
/// passed on to other peers or to the upstream registry.
pub trait PeerShare: Send + Sync + 'static {
    /// Opens `digest` from byte `from`, streaming from a download in flight if need be.
    fn open(&self, digest: &Digest, from: u64) -> BoxFuture<'_, Option<Opened>>;

    /// The last-seen record of `registry/repository:tag`, for a public repository only.
    fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<TagAnswer>;

    /// Every digest this node can serve peers right now (to advertise in the DHT).
    fn digests(&self) -> Vec<Digest>;
}

/// Where a response's bytes came from: the `source` label of eddy's metrics, and what decides
/// whether a client must be authorized for content it did not fetch itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// eddy's own store (a hit, or a fill another client started).
    Store,
    /// This node's containerd content store.
    Containerd,
    /// Other nodes.
    Peer,
    /// The registry itself, or its chain's endpoints.
    Upstream,
}

impl SourceKind {
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Store => "store",
            SourceKind::Containerd => "containerd",
            SourceKind::Peer => "peer",
            SourceKind::Upstream => "upstream",
        }
    }
}

/// Tells the peers that sent a body that its bytes did not verify, so that they are avoided
/// for a while. The handler holds it without knowing who the peers are.
pub struct Blame(Box<dyn FnOnce(&'static str) + Send + Sync>);

impl Blame {
    pub fn new(blame: impl FnOnce(&'static str) + Send + Sync + 'static) -> Self {
        Blame(Box::new(blame))
    }

    pub fn blame(self, reason: &'static str) {
        (self.0)(reason)
    }
}

/// What asking the peers for a blob gave.
pub enum PeerLookup {
    /// A peer serves it. Its bytes are gated: no client sees them before they verify.
    Found { opened: Opened, blame: Blame },
    /// Fetch it upstream. `elected`: this node fetches it for the cluster (its single flight),
    /// and has announced it, so the other nodes stream from this node's fill.
    Upstream { elected: bool },
}

/// Other nodes as a source: content they hold or are fetching, the cluster's single flight
/// for content nobody holds yet, and their last-seen records of public tags.
pub trait PeerSource: Send + Sync + 'static {
    /// Whether any peer is connected: without one there is nothing to ask.
    fn is_active(&self) -> bool;

    /// `digest` from byte `from`. `elect`: when nobody holds it, take part in the cluster's
    /// single flight (blobs; manifests are small and go upstream).
    fn open<'a>(&'a self, digest: &'a Digest, from: u64, elect: bool) -> BoxFuture<'a, PeerLookup>;

    /// This node can serve `digest` now (a fill's first byte arrived).
    fn announce(&self, digest: &Digest);

    /// This node holds a record of a public tag, for peers during an upstream outage.
    fn announce_tag(&self, registry: &str, repository: &str, tag: &str);

    /// The newest record of `registry/repository:tag` among the peers.
    fn tag<'a>(
        &'a self,
        registry: &'a str,
        repository: &'a str,
        tag: &'a str,
    ) -> BoxFuture<'a, Option<TagAnswer>>;
}
