//! Manifests by tag: revalidated upstream on every pull, served from the store when the digest
//! is known, from the last known record while upstream is unreachable, and from peers'
//! records as a last resort.
use std::time::Instant;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{
    header::{self, HeaderMap},
    Method, Request, Response, StatusCode, Uri,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::warn;

use super::{handler::Handler, headers::*, origin::*, respond::*};
use crate::{
    oci::digest::Digest,
    oci::repo_key::RepoKey,
    sources::source::SourceKind,
    store::catalog::TagRecord,
    store::{Blob, Fetched},
    upstream::chain::served_by_endpoint,
    upstream::client::{Body, BoxError, UpstreamError},
};

impl Handler {
    /// GET a manifest (by digest, or by tag after revalidation) from upstream, store it if it
    /// verifies, and answer with upstream's headers.
    pub(super) async fn fetch_manifest(
        &self,
        origin: &Origin,
        repo_key: &RepoKey,
        expected: Option<&Digest>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        self.metrics
            .request(Kind::Manifest.label(), SourceKind::Upstream);
        let method = req.method().clone();
        let uri = upstream_uri(origin, req.uri());
        let headers = request_headers(req.headers());
        let public = !headers.contains_key(header::AUTHORIZATION);
        let started = Instant::now();
        let resp = match self.chains.fetch(method.clone(), uri, &headers).await {
            Ok(r) => r,
            Err(e) => return bad_gateway(&e),
        };
        let public = public || served_by_endpoint(&resp);
        self.metrics
            .upstream_latency(Kind::Manifest.label(), started.elapsed());
        if resp.status() != StatusCode::OK || method == Method::HEAD {
            return passthrough_response(resp);
        }
        let (parts, body) = resp.into_parts();
        let bytes = match http_body_util::Limited::new(body, MAX_MANIFEST)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) => return error_response(StatusCode::BAD_GATEWAY, "manifest_read", &e),
        };
        self.metrics.bytes(SourceKind::Upstream, bytes.len() as u64);
        let computed = Digest::of(&bytes);
        let claimed = parts
            .headers
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok());
        let verified = expected.is_none_or(|d| *d == computed)
            && claimed.is_none_or(|c| c == computed.to_string());
        let media_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if verified {
            if let Some(mt) = &media_type {
                self.remember_manifest(&computed, mt, repo_key, public, bytes.clone())
                    .await;
            }
        } else {
            warn!(%computed, ?expected, ?claimed, "manifest digest mismatch; not cached");
        }
        Response::from_parts(strip_hop_by_hop(parts), full(bytes))
    }

    pub(super) async fn remember_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        repo_key: &RepoKey,
        public: bool,
        bytes: Bytes,
    ) {
        if let Err(e) = self
            .catalog
            .record_content(digest, Some(media_type), repo_key, public)
        {
            warn!(error = %e, "recording manifest metadata failed");
            return;
        }
        if self.store.contains(digest).is_some() {
            return;
        }
        let len = bytes.len() as u64;
        let fill = self.store.fill(digest, move |_| async move {
            let body = futures_util::stream::once(async move { Ok::<_, BoxError>(bytes) });
            Ok::<_, BoxError>(Fetched::whole(body, Some(len)))
        });
        if let Err(e) = fill.done().await {
            warn!(%digest, error = %e, "storing manifest failed");
        }
    }

    /// Manifests by tag: always revalidated upstream (HEAD, which registries do not count
    /// as a pull); the content itself comes from the store when the digest is known.
    pub(super) async fn manifest_by_tag(
        &self,
        origin: &Origin,
        repo: &str,
        tag: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let repo_key = RepoKey::new(&origin.authority, repo);
        let probe = upstream_uri(origin, req.uri());
        let headers = request_headers(req.headers());
        let with_credentials = headers.contains_key(header::AUTHORIZATION);
        if with_credentials {
            self.visibility.refresh(&repo_key, repo, || probe.clone());
        }
        let public = !with_credentials || self.visibility.is_public(&repo_key);
        let started = Instant::now();
        let head = match self.revalidate_tag(&repo_key, repo, probe, &headers).await {
            Ok(h) => h,
            Err(e) if e.is_unreachable() => {
                return self.stale_tag(origin, repo, &repo_key, tag, &req, &e).await
            }
            Err(e) => return bad_gateway(&e),
        };
        self.metrics.upstream_latency("tag", started.elapsed());
        let digest = head
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|d| d.parse::<Digest>().ok());
        let media_type = head
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (Some(digest), Some(media_type), true) =
            (digest, media_type, head.status() == StatusCode::OK)
        else {
            // Not something we can cache (a 401 challenge, 404, ...): the client gets
            // upstream's own answer to its own request.
            if req.method() == Method::HEAD {
                return passthrough_response(head);
            }
            return self.forward(origin, req, "manifest").await;
        };
        let public = public || served_by_endpoint(&head);
        let record = TagRecord {
            digest: digest.to_string(),
            media_type: media_type.clone(),
            public,
        };
        if let Err(e) = self.catalog.record_tag(&repo_key, tag, &record) {
            warn!(error = %e, "recording tag failed");
        }
        if public {
            // Peers may resolve it through this node while the upstream is down.
            self.sources.announce_tag(&origin.authority, repo, tag);
        }
        if req.method() == Method::HEAD {
            self.metrics
                .request(Kind::Manifest.label(), SourceKind::Upstream);
            return passthrough_response(head);
        }
        if let Some(blob) = self.store.get(&digest) {
            // Upstream just accepted this client's credentials for the repository.
            let _ = self
                .catalog
                .record_content(&digest, Some(&media_type), &repo_key, public);
            self.metrics
                .request(Kind::Manifest.label(), SourceKind::Store);
            return self.serve_blob(&req, &digest, Some(&media_type), blob);
        }
        self.content(origin, repo, &digest, Kind::Manifest, req)
            .await
    }

    /// HEAD a tag upstream (registries do not count it as a pull). For a public repository,
    /// with eddy's own anonymous token in place of the client's, so the answer does not
    /// depend on what the client's token grants; if that does not get a 200, with the
    /// client's own headers, whose answer the client gets.
    pub(super) async fn revalidate_tag(
        &self,
        repo_key: &RepoKey,
        repo: &str,
        probe: Uri,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if headers.contains_key(header::AUTHORIZATION) && self.visibility.is_public(repo_key) {
            if let Some(own) = self.visibility.anonymous_authorization(repo, &probe).await {
                let mut anonymous = headers.clone();
                anonymous.insert(header::AUTHORIZATION, own);
                let resp = self
                    .chains
                    .fetch(Method::HEAD, probe.clone(), &anonymous)
                    .await;
                if resp.as_ref().is_ok_and(|r| r.status() == StatusCode::OK) {
                    return resp;
                }
            }
        }
        self.chains.fetch(Method::HEAD, probe, headers).await
    }

    /// Upstream is unreachable: serve the tag's last known manifest if we may: this node's
    /// record, else the newest record a peer holds (peers only share public tags).
    pub(super) async fn stale_tag(
        &self,
        origin: &Origin,
        repo: &str,
        repo_key: &RepoKey,
        tag: &str,
        req: &Request<Incoming>,
        cause: &UpstreamError,
    ) -> Response<Body> {
        let local = self.catalog.tag(repo_key, tag).and_then(|rec| {
            let digest: Digest = rec.digest.parse().ok()?;
            // Private content needs upstream's word on the credentials, which we cannot get.
            let public = rec.public || self.visibility.is_public(repo_key);
            let ok = public && accepts(req.headers(), &rec.media_type);
            ok.then(|| {
                self.store
                    .get(&digest)
                    .map(|blob| (digest, rec.media_type, blob))
            })?
        });
        let usable = match local {
            Some(found) => Some(found),
            None => self.tag_from_peers(origin, repo, repo_key, tag, req).await,
        };
        let Some((digest, media_type, blob)) = usable else {
            return bad_gateway(cause);
        };
        warn!(repo = %repo_key, tag, %digest, error = %cause, "upstream unreachable; serving the last known manifest");
        self.metrics.stale_manifest();
        self.metrics
            .request(Kind::Manifest.label(), SourceKind::Store);
        self.serve_blob(req, &digest, Some(&media_type), blob)
    }

    /// The newest record of a public tag among the peers, with its manifest fetched from a
    /// peer, verified and stored.
    pub(super) async fn tag_from_peers(
        &self,
        origin: &Origin,
        repo: &str,
        repo_key: &RepoKey,
        tag: &str,
        req: &Request<Incoming>,
    ) -> Option<(Digest, String, Blob)> {
        let answer = self.sources.peer_tag(&origin.authority, repo, tag).await?;
        if !accepts(req.headers(), &answer.media_type) {
            return None;
        }
        let digest = answer.digest;
        if self.store.get(&digest).is_none() {
            let (opened, blame) = self.sources.peer_held(&digest, 0).await?;
            if opened.len > MAX_MANIFEST as u64 {
                return None;
            }
            let bytes: Vec<u8> = opened
                .body
                .try_fold(Vec::new(), |mut all, chunk| async move {
                    all.extend_from_slice(&chunk);
                    Ok(all)
                })
                .await
                .ok()?;
            if Digest::of(&bytes) != digest {
                blame.blame("digest_mismatch");
                return None;
            }
            self.metrics.bytes(SourceKind::Peer, bytes.len() as u64);
            self.remember_manifest(&digest, &answer.media_type, repo_key, true, bytes.into())
                .await;
        }
        let record = TagRecord {
            digest: digest.to_string(),
            media_type: answer.media_type.clone(),
            public: true,
        };
        if let Err(e) = self.catalog.record_tag(repo_key, tag, &record) {
            warn!(error = %e, "recording tag failed");
        }
        let blob = self.store.get(&digest)?;
        Some((digest, answer.media_type, blob))
    }
}
