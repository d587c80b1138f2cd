//! The sources a miss is served from before the upstream: containerd's content store on this
//! node, then peers. eddy's own store comes first and the upstream last; both are the
//! registry handler's. One shared fill asks these once per digest (single flight).
use std::sync::Arc;

use crate::{
    oci::digest::Digest,
    sources::source::{
        Blame, ContentSource, Opened, PeerLookup, PeerSource, SourceKind, TagAnswer,
    },
};

/// Content a source other than the upstream serves.
pub struct Found {
    pub opened: Opened,
    pub kind: SourceKind,
    /// Bytes no client may see before they verify (a peer's).
    pub gated: bool,
    /// For bytes that do not verify: avoid their senders.
    pub blame: Option<Blame>,
}

/// What the sources before the upstream gave for a miss.
pub enum Lookup {
    Found(Found),
    /// Nobody serves it: fetch it upstream. `elected`: this node fetches it for the cluster.
    Upstream {
        elected: bool,
    },
}

/// The sources a miss is asked in order, before the upstream.
#[derive(Default, Clone)]
pub struct Sources {
    containerd: Option<Arc<dyn ContentSource>>,
    peers: Option<Arc<dyn PeerSource>>,
}

impl Sources {
    pub fn new(
        containerd: Option<Arc<dyn ContentSource>>,
        peers: Option<Arc<dyn PeerSource>>,
    ) -> Self {
        Sources { containerd, peers }
    }

    pub fn is_empty(&self) -> bool {
        self.containerd.is_none() && self.peers.is_none()
    }

    /// `digest` from byte `from`: this node's containerd, then peers. `shareable`: public
    /// content, the only kind peers share. `elect`: when nobody holds it, hold the cluster's
    /// single flight.
    pub async fn open(&self, digest: &Digest, from: u64, shareable: bool, elect: bool) -> Lookup {
        if let Some(containerd) = &self.containerd {
            if let Some(opened) = containerd.open(digest, from).await {
                return Lookup::Found(Found {
                    opened,
                    kind: containerd.kind(),
                    gated: false,
                    blame: None,
                });
            }
        }
        let Some(peers) = self.active_peers().filter(|_| shareable) else {
            return Lookup::Upstream { elected: false };
        };
        match peers.open(digest, from, elect).await {
            PeerLookup::Found { opened, blame } => Lookup::Found(Found {
                opened,
                kind: SourceKind::Peer,
                gated: true,
                blame: Some(blame),
            }),
            PeerLookup::Upstream { elected } => Lookup::Upstream { elected },
        }
    }

    pub fn peers_active(&self) -> bool {
        self.active_peers().is_some()
    }

    fn active_peers(&self) -> Option<&Arc<dyn PeerSource>> {
        self.peers.as_ref().filter(|p| p.is_active())
    }

    /// Peers may stream `digest` from this node now.
    pub fn announce(&self, digest: &Digest) {
        if let Some(peers) = &self.peers {
            peers.announce(digest);
        }
    }

    /// This node holds a record of a public tag.
    pub fn announce_tag(&self, registry: &str, repository: &str, tag: &str) {
        if let Some(peers) = &self.peers {
            peers.announce_tag(registry, repository, tag);
        }
    }

    /// `digest` from a peer that holds it, without the single flight (small content).
    pub async fn peer_held(&self, digest: &Digest, from: u64) -> Option<(Opened, Blame)> {
        match self.active_peers()?.open(digest, from, false).await {
            PeerLookup::Found { opened, blame } => Some((opened, blame)),
            PeerLookup::Upstream { .. } => None,
        }
    }

    /// The newest record of a public tag among the peers.
    pub async fn peer_tag(&self, registry: &str, repository: &str, tag: &str) -> Option<TagAnswer> {
        self.peers.as_ref()?.tag(registry, repository, tag).await
    }
}
