//! Where content-addressed data can come from besides eddy's own store and the upstream
//! registry: containerd's content store on this node (`containerd`), and other nodes (`p2p`).
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
    fn name(&self) -> &'static str;

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
