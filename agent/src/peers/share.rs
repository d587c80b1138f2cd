//! What this node offers its peers (`source::PeerShare`): content in eddy's store, including
//! downloads still in flight, and in containerd's content store, and the last-seen tag
//! records. Public content only: what upstream serves to anonymous clients. Content that
//! arrived with a client's or the node's credentials, and was never found public, stays on
//! this node. Answers come from local sources only: a peer's request never goes further.
use std::sync::Arc;

use futures_util::{future::BoxFuture, StreamExt, TryStreamExt};

use crate::{
    oci::{digest::Digest, repo_key::RepoKey},
    sources::containerd::ContainerdSource,
    sources::source::{ContentSource, Opened, PeerShare, TagAnswer},
    store::catalog::Catalog,
    store::{BoxError, Store},
    upstream::visibility::{Verdict, Visibility, VERDICT_BOUND},
};

pub struct NodeShare {
    pub store: Arc<Store>,
    pub catalog: Arc<Catalog>,
    pub visibility: Arc<Visibility>,
    pub containerd: Option<Arc<ContainerdSource>>,
}

impl NodeShare {
    fn is_public(&self, digest: &Digest) -> bool {
        self.catalog
            .content(digest)
            .is_some_and(|meta| self.visibility.content_is_public(&meta))
    }

    /// Content in containerd that eddy never fetched itself: public if a repository that
    /// containerd pulled it from is, by upstream's verdict (asked now, once, when unknown).
    async fn containerd_content_is_public(
        &self,
        source: &ContainerdSource,
        digest: &Digest,
    ) -> bool {
        for (registry, repo) in source.distribution_sources(digest).await {
            let repo_key = RepoKey::new(&registry, &repo);
            match self.visibility.known(&repo_key) {
                Some(Verdict::Public) => return true,
                Some(_) => continue,
                None => {}
            }
            // containerd does not say whether `digest` is a manifest or a blob, and a probe of
            // the wrong kind answers 404: ask as a manifest, then as a blob (the last verdict
            // recorded is the right one).
            for kind in ["manifests", "blobs"] {
                let Ok(probe) = format!("https://{registry}/v2/{repo}/{kind}/{digest}").parse()
                else {
                    continue;
                };
                let check = self.visibility.check(&repo_key, &repo, &probe);
                if tokio::time::timeout(VERDICT_BOUND, check).await == Ok(Some(Verdict::Public)) {
                    return true;
                }
            }
        }
        false
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
            let source = self.containerd.as_ref()?;
            source.contains(&digest)?;
            let public =
                self.is_public(&digest) || self.containerd_content_is_public(source, &digest).await;
            if !public {
                return None;
            }
            let mut opened = source.open(&digest, from).await?;
            opened.media_type = opened.media_type.or(media_type);
            Some(opened)
        })
    }

    fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<TagAnswer> {
        let repo_key = RepoKey::new(registry, repository);
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
        if let Some(source) = &self.containerd {
            // Advertised whatever their verdict: one that turns out private is refused when
            // asked for, and most of what a node's containerd holds is public.
            all.extend(source.digests());
        }
        all.sort();
        all.dedup();
        all
    }
}
