//! Content by digest (blobs, and manifests by digest): served from the store, else through
//! the one shared fill of the digest (`fill`), which every client missing it streams from.
use std::sync::Arc;

use futures_util::StreamExt;
use http::{header, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tracing::warn;

use super::{
    fill::{FillReport, MissFill, UpstreamFetch},
    handler::Handler,
    headers::*,
    origin::*,
    respond::*,
};
use crate::{
    oci::digest::Digest,
    oci::repo_key::RepoKey,
    sources::source::SourceKind,
    store::{Fill, StoreError},
    upstream::client::Body,
    upstream::visibility::{Verdict, VERDICT_BOUND},
};

impl Handler {
    /// A blob, or a manifest by digest: content-addressed, so cacheable.
    pub(super) async fn content(
        &self,
        origin: &Origin,
        repo: &str,
        digest: &Digest,
        kind: Kind,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let repo_key = RepoKey::new(&origin.authority, repo);
        let content = ContentRef {
            origin,
            repo,
            repo_key: &repo_key,
            digest,
            kind,
        };
        let meta = self.catalog.content(digest);
        let cached = self.store.get(digest);

        // A manifest is only served from the store in a media type the client accepts.
        if let Some(mt) = meta.as_ref().and_then(|m| m.media_type.as_deref()) {
            if kind == Kind::Manifest && !accepts(req.headers(), mt) {
                return self
                    .fetch_manifest(origin, &repo_key, Some(digest), req)
                    .await;
            }
        }

        if cached.is_some() || meta.is_some() {
            if let Err(denied) = self.authorize(&content, meta.as_ref(), req.headers()).await {
                return denied;
            }
        }

        if let Some(blob) = cached {
            self.metrics.request(kind.label(), SourceKind::Store);
            let media_type = meta.as_ref().and_then(|m| m.media_type.clone());
            return self.serve_blob(&req, digest, media_type.as_deref(), blob);
        }
        if req.method() == Method::HEAD {
            self.metrics.request(kind.label(), SourceKind::Upstream);
            return self.forward_following(origin, req).await;
        }
        self.fill(&content, req).await
    }
}

impl Handler {
    /// A miss: start (or join) the one shared fill of the digest and stream from it.
    /// Manifests go the same way (registries count every manifest GET as a pull).
    pub(super) async fn fill(
        &self,
        content: &ContentRef<'_>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let miss = self.miss_fill(content, &req).await;
        let report = Arc::clone(&miss.report);
        let fill = self.store.fill(content.digest, move |held| miss.run(held));
        match fill.started().await {
            Ok(announced) => {
                self.serve_fill(content, req, &report, announced, fill)
                    .await
            }
            Err(e) => self.fill_failed(content, req, &report, e).await,
        }
    }

    /// The fill this request runs if it is the first to miss the digest.
    async fn miss_fill(&self, content: &ContentRef<'_>, req: &Request<Incoming>) -> MissFill {
        let uri = content.uri();
        let headers = request_headers(req.headers());
        let public = !headers.contains_key(header::AUTHORIZATION);
        let shareable = self.shareable(content, public, &uri).await;
        if !public {
            // Fetched with the client's credentials: find out whether anyone may have it.
            self.visibility
                .refresh(content.repo_key, content.repo, || uri.clone());
        }
        MissFill {
            digest: *content.digest,
            kind: content.kind,
            repo_key: content.repo_key.clone(),
            public,
            shareable,
            fetch: UpstreamFetch::new(Arc::clone(&self.chains), uri, headers),
            catalog: Arc::clone(&self.catalog),
            store: Arc::clone(&self.store),
            sources: self.sources.clone(),
            metrics: self.metrics.clone(),
            upstream_idle: self.upstream_idle,
            report: Arc::default(),
        }
    }

    /// Other nodes share public content only, so only that is worth asking them for.
    async fn shareable(&self, content: &ContentRef<'_>, public: bool, uri: &Uri) -> bool {
        if public || self.visibility.is_public(content.repo_key) {
            return true;
        }
        if !self.sources.peers_active() || self.visibility.known(content.repo_key).is_some() {
            return false;
        }
        // A repository this node never asked about (a token registry hands anonymous
        // clients tokens too): ask now, once, so its first pull here can use peers.
        let check = self.visibility.check(content.repo_key, content.repo, uri);
        tokio::time::timeout(VERDICT_BOUND, check).await == Ok(Some(Verdict::Public))
    }

    /// The fill failed before this client got a byte: it gets upstream's own answer, or a
    /// fetch of its own, uncached (on any doubt, go upstream).
    async fn fill_failed(
        &self,
        content: &ContentRef<'_>,
        req: Request<Incoming>,
        report: &FillReport,
        e: StoreError,
    ) -> Response<Body> {
        let bad_bytes = matches!(
            e,
            StoreError::DigestMismatch { .. } | StoreError::LengthMismatch { .. }
        );
        if let Some(blame) = report.take_blame().filter(|_| bad_bytes) {
            blame.blame("digest_mismatch");
        }
        self.metrics
            .request(content.kind.label(), SourceKind::Upstream);
        // Upstream said no (401, 404, ...), or the disk is full: the client gets upstream's
        // answer as it is.
        if let Some(resp) = report.take_uncached() {
            return self.counted_passthrough(resp);
        }
        // Someone else's fill failed (or ours, before upstream answered).
        warn!(digest = %content.digest, error = %e, "shared fetch failed; fetching uncached");
        let headers = request_headers(req.headers());
        match self
            .chains
            .fetch(Method::GET, content.uri(), &headers)
            .await
        {
            Ok(resp) => self.counted_passthrough(resp),
            Err(e) => bad_gateway(&e),
        }
    }

    /// Serve this client from the fill, once it may see the content.
    async fn serve_fill(
        &self,
        content: &ContentRef<'_>,
        req: Request<Incoming>,
        report: &FillReport,
        announced: Option<u64>,
        fill: Fill,
    ) -> Response<Body> {
        let meta = self.catalog.content(content.digest);
        let joined = !report.ran_here();
        let source = report.source();
        // We joined someone else's fill, or ours came from containerd (content any client
        // on the node may have pulled, with any credentials): make sure this client may see it.
        if joined || source == SourceKind::Containerd {
            if let Err(denied) = self.authorize(content, meta.as_ref(), req.headers()).await {
                return denied;
            }
        }
        let counted_as = if joined { SourceKind::Store } else { source };
        self.metrics.request(content.kind.label(), counted_as);
        let media_type = meta.and_then(|m| m.media_type);
        let acceptable = media_type
            .as_deref()
            .is_some_and(|mt| accepts(req.headers(), mt));
        if content.kind == Kind::Manifest && !acceptable {
            return self
                .fetch_manifest(content.origin, content.repo_key, Some(content.digest), req)
                .await;
        }
        let len = match announced {
            Some(len) => len,
            // Upstream sent no length (a chunked body). A plain GET streams at once, without
            // a Content-Length; a Range needs the length, which comes with the last byte.
            None if req.method() == Method::GET && !req.headers().contains_key(header::RANGE) => {
                return self.serve_unsized(content.digest, media_type.as_deref(), joined, fill);
            }
            None => match fill.len().await {
                Ok(len) => len,
                Err(e) => return error_response(StatusCode::BAD_GATEWAY, "fill_failed", &e),
            },
        };
        let what = Cached {
            digest: content.digest,
            media_type: media_type.as_deref(),
            len,
            hit: joined,
        };
        self.serve_cached(req.method(), req.headers(), what, |s, e| {
            fill.read_range(s, e).boxed()
        })
    }
}
