//! What this node offers its peers (`source::PeerShare`): content in eddy's store, including
//! downloads still in flight, and in containerd's content store, and the last-seen tag
//! records. Public content only: what upstream serves to anonymous clients. Content that
//! arrived with a client's or the node's credentials, and was never found public, stays on
//! this node. Answers come from local sources only: a peer's request never goes further.
use std::sync::Arc;

use futures_util::{future::BoxFuture, StreamExt, TryStreamExt};

use crate::{
    catalog::Catalog,
    digest::Digest,
    source::{ContentSource, Opened, PeerShare, TagAnswer},
    store::{BoxError, Store},
    visibility::Visibility,
};

/// Lists the digests of containerd's content store that may be shared (see `containerd`).
pub type ContainerdDigests = Arc<dyn Fn() -> Vec<Digest> + Send + Sync>;

pub struct NodeShare {
    pub store: Arc<Store>,
    pub catalog: Arc<Catalog>,
    pub visibility: Arc<Visibility>,
    pub containerd: Option<(Arc<dyn ContentSource>, ContainerdDigests)>,
}

impl NodeShare {
    fn is_public(&self, digest: &Digest) -> bool {
        self.catalog
            .content(digest)
            .is_some_and(|meta| self.visibility.content_is_public(&meta))
    }

    fn containerd_shares(&self, digest: &Digest) -> Option<&Arc<dyn ContentSource>> {
        let (source, digests) = self.containerd.as_ref()?;
        digests().contains(digest).then_some(source)
    }
}

impl PeerShare for NodeShare {
    fn open(&self, digest: &Digest, from: u64) -> BoxFuture<'_, Option<Opened>> {
        let digest = *digest;
        Box::pin(async move {
            let media_type = self.catalog.content(&digest).and_then(|m| m.media_type);
            if let Some(blob) = self.store.get(&digest) {
                if !self.is_public(&digest) || from > blob.len() {
                    return None;
                }
                return Some(Opened {
                    len: blob.len(),
                    offset: from,
                    body: blob.read_range(from, None).map_err(BoxError::from).boxed(),
                    media_type,
                });
            }
            if let Some(fill) = self.store.in_flight(&digest) {
                // Its metadata is recorded before its first byte, when upstream answered.
                let len = fill.len().await.ok()?;
                if !self.is_public(&digest) || from > len {
                    return None;
                }
                let media_type = self.catalog.content(&digest).and_then(|m| m.media_type);
                return Some(Opened {
                    len,
                    offset: from,
                    body: fill.read_range(from, None).map_err(BoxError::from).boxed(),
                    media_type,
                });
            }
            let source = self.containerd_shares(&digest)?;
            let mut opened = source.open(&digest, from).await?;
            opened.media_type = opened.media_type.or(media_type);
            Some(opened)
        })
    }

    fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<TagAnswer> {
        let repo_key = format!("{registry}/{repository}");
        let record = self.catalog.tag(&repo_key, tag)?;
        if !(record.public || self.visibility.is_public(&repo_key)) {
            return None;
        }
        Some(TagAnswer {
            digest: record.digest.parse().ok()?,
            media_type: record.media_type,
            seen_at: self.catalog.tag_changed_at(&repo_key, tag).unwrap_or(0),
        })
    }

    fn digests(&self) -> Vec<Digest> {
        let mut all: Vec<Digest> = self
            .store
            .digests()
            .into_iter()
            .filter(|d| self.is_public(d))
            .collect();
        if let Some((_, digests)) = &self.containerd {
            all.extend(digests());
        }
        all.sort();
        all.dedup();
        all
    }
}
