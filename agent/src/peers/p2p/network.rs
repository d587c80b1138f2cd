//! The libp2p swarm as the `PeerNetwork` that `peers` (which peer to ask, elections) uses.
use std::{str::FromStr, time::Duration};

use futures_util::future::BoxFuture;
use libp2p::PeerId;

use super::P2p;
use crate::{
    node::sync::lock,
    oci::digest::Digest,
    peers::{PeerKey, PeerNetwork},
    sources::source::{Opened, TagAnswer},
    store::BoxError,
};

fn peer_id(key: &PeerKey) -> Result<PeerId, BoxError> {
    PeerId::from_str(&key.0).map_err(|e| format!("peer id {key}: {e}").into())
}

fn key(peer: PeerId) -> PeerKey {
    PeerKey(peer.to_string())
}

impl PeerNetwork for P2p {
    fn local(&self) -> PeerKey {
        key(self.local_peer_id())
    }

    fn connected(&self) -> usize {
        lock(&self.inner.shared.peers).len()
    }

    fn provide(&self, key: Vec<u8>, bound: Duration) -> BoxFuture<'static, bool> {
        let p2p = self.clone();
        Box::pin(async move { p2p.provide(&key, bound).await })
    }

    fn providers(&self, key: Vec<u8>, bound: Duration) -> BoxFuture<'static, Vec<PeerKey>> {
        let p2p = self.clone();
        Box::pin(async move {
            let found = p2p.providers(&key, bound).await;
            found.into_iter().map(self::key).collect()
        })
    }

    fn fetch(
        &self,
        peer: PeerKey,
        digest: Digest,
        from: u64,
    ) -> BoxFuture<'static, Result<Opened, BoxError>> {
        let p2p = self.clone();
        Box::pin(async move {
            let peer = peer_id(&peer)?;
            Ok(P2p::fetch(&p2p, peer, &digest, from).await?)
        })
    }

    fn tag(
        &self,
        peer: PeerKey,
        registry: String,
        repository: String,
        tag: String,
    ) -> BoxFuture<'static, Result<Option<TagAnswer>, BoxError>> {
        let p2p = self.clone();
        Box::pin(async move {
            let peer = peer_id(&peer)?;
            Ok(P2p::tag(&p2p, peer, &registry, &repository, &tag).await?)
        })
    }

    fn members(&self) -> Vec<PeerKey> {
        self.connected_peers().into_iter().map(key).collect()
    }

    fn claim(
        &self,
        home: PeerKey,
        digest: Digest,
        stale: Option<PeerKey>,
    ) -> BoxFuture<'static, Result<PeerKey, BoxError>> {
        let p2p = self.clone();
        Box::pin(async move {
            let home = peer_id(&home)?;
            let stale = stale.as_ref().map(peer_id).transpose()?;
            Ok(key(P2p::claim(&p2p, home, &digest, stale).await?))
        })
    }

    fn report_failure(&self, peer: &PeerKey, reason: &'static str) {
        if let Ok(peer) = peer_id(peer) {
            P2p::report_failure(self, peer, reason);
        }
    }
}
