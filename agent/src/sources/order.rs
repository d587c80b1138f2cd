//! The sources a miss is served from before the upstream: containerd's content store on this
//! node, then peers. eddy's own store comes first and the upstream last; both are the
//! registry handler's. One shared fill asks these once per digest (single flight).
use std::sync::{Arc, Mutex};

use tracing::debug;

use crate::{
    oci::digest::Digest,
    peers::{Election, PeerKey, Peers},
    sources::source::{ContentSource, Opened},
};

/// Content found at a source.
pub struct Found {
    pub opened: Opened,
    /// The `source` metrics label.
    pub source: &'static str,
    /// The source is not trusted to send the right bytes: nothing may be served before the
    /// whole verifies (see `store::Fetched::gated`).
    pub gated: bool,
    /// Peers that sent bytes, to blame if they do not verify.
    pub contributors: Option<Arc<Mutex<Vec<PeerKey>>>>,
}

/// What to do about a miss.
pub enum Lookup {
    Found(Found),
    /// Fetch upstream. `elected`: this node is the cluster's fetcher for the blob and has
    /// announced it already (peers stream from its fill).
    Upstream {
        elected: bool,
    },
}

/// How often a miss asks the home again after the fetcher it named could not serve.
const RECLAIMS: usize = 2;

#[derive(Default, Clone)]
pub struct Sources {
    pub containerd: Option<Arc<dyn ContentSource>>,
    pub peers: Option<Arc<Peers>>,
}

impl Sources {
    pub fn is_empty(&self) -> bool {
        self.containerd.is_none() && self.peers.is_none()
    }

    /// `digest` from byte `from`. `shareable`: the content may come from other nodes (public
    /// content: peers share nothing else). `elect`: when nobody has it, hold the cluster's
    /// election on who fetches it upstream (blobs; manifests are small and fetched by each).
    pub async fn open(&self, digest: &Digest, from: u64, shareable: bool, elect: bool) -> Lookup {
        if let Some(containerd) = &self.containerd {
            if let Some(opened) = containerd.open(digest, from).await {
                return Lookup::Found(Found {
                    opened,
                    source: containerd.name(),
                    // containerd verified the digest when it committed the content.
                    gated: false,
                    contributors: None,
                });
            }
        }
        let Some(peers) = self.peers.as_ref().filter(|p| shareable && p.is_active()) else {
            return Lookup::Upstream { elected: false };
        };
        if let Some(held) = peers.open_held(digest, from).await {
            return Lookup::Found(peer_found(held));
        }
        if !elect {
            return Lookup::Upstream { elected: false };
        }
        let mut stale = None;
        for _ in 0..=RECLAIMS {
            match peers.elect(digest, stale.take()).await {
                Election::Upstream => return Lookup::Upstream { elected: true },
                Election::Peer(peer) => match peers.open_from_fetcher(&peer, digest, from).await {
                    Some(body) => return Lookup::Found(peer_found(body)),
                    None => {
                        debug!(%digest, %peer, "the fetcher the home named could not serve; asking again");
                        stale = Some(peer);
                    }
                },
            }
        }
        Lookup::Upstream { elected: false }
    }

    /// Whether peers are configured and connected.
    pub fn peers_active(&self) -> bool {
        self.peers.as_ref().is_some_and(|p| p.is_active())
    }

    /// This node can serve `digest` to peers now.
    pub fn announce(&self, digest: &Digest) {
        if let Some(peers) = &self.peers {
            peers.announce(digest);
        }
    }

    pub fn blame(&self, contributors: &[PeerKey], reason: &'static str) {
        if let Some(peers) = &self.peers {
            peers.blame(contributors, reason);
        }
    }
}

fn peer_found(body: crate::peers::PeerBody) -> Found {
    Found {
        opened: body.opened,
        source: "peer",
        gated: true,
        contributors: Some(body.contributors),
    }
}
