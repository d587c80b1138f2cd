//! The OCI distribution API, pull side, as a transparent caching proxy.
//!
//! containerd believes it talks to the registry itself, and has no fallback, so every
//! answer must be one the registry could have given: cached content is served with the
//! exact headers, and anything eddy does not cache (or doubts) goes upstream verbatim.
//!
//! - blobs and manifests by digest: from the store, else one shared upstream fetch
//!   (single-flight, streamed to every waiting client as it arrives);
//! - manifests by tag: revalidated upstream with HEAD on every request, served from the store
//!   when the digest is known, and from the last known record while upstream is unreachable;
//! - public or private is upstream's verdict (see `visibility`): content of a repository that
//!   upstream serves to anonymous clients is served to anyone, also while upstream is down;
//!   private content only to a client whose credentials upstream accepts for that repository
//!   (a HEAD upstream, remembered briefly).
pub mod metrics;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{
    header::{self, HeaderMap, HeaderName},
    Method, Request, Response, StatusCode, Uri,
};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use crate::{
    oci::api_path::{parse_path, Api},
    oci::digest::Digest,
    oci::range::{parse_range, RangeSpec},
    oci::repo_key::RepoKey,
    registry::metrics::RegistryMetrics,
    sources::failover::{resuming, skip_prefix, Resume},
    sources::order::{Found, Lookup, Sources},
    sources::source::{Blame, ByteStream, SourceKind},
    store::catalog::{Catalog, ContentMeta, TagRecord},
    store::{Blob, Fetched, Store, StoreError},
    upstream::chain::{served_by_endpoint, ChainConfig, ChainMetrics, Chains},
    upstream::client::{empty, idle_timeout, Body, BoxError, Upstream, UpstreamError},
    upstream::credentials::NodeCredentials,
    upstream::token::TokenClient,
    upstream::visibility::{Verdict, Visibility},
};

/// A fill whose upstream stops sending for this long fails (and its clients with it),
/// rather than hanging every client that shares it. `--upstream-idle-timeout` overrides it.
pub const UPSTREAM_IDLE: Duration = Duration::from_secs(60);
/// How long an upstream "yes" to a client's credentials for a repository is trusted.
const AUTH_TTL: Duration = Duration::from_secs(60);
/// Getting a token with the node's credentials gives up after this long: the request then
/// goes upstream as it came.
const NODE_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a miss waits for upstream's public/private verdict on a repository this node
/// never asked about, before it decides whether peers may serve it.
const VERDICT_BOUND: Duration = Duration::from_secs(3);
/// Manifests larger than this are passed through uncached (registries cap them at 4 MiB).
const MAX_MANIFEST: usize = 8 << 20;
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// The registry a downstream connection is talking to.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `https` or `http`.
    pub scheme: http::uri::Scheme,
    /// `host[:port]` as clients name it (SNI, or Host for plain HTTP).
    pub authority: String,
}

pub struct Registry {
    upstream: Upstream,
    store: Arc<Store>,
    catalog: Arc<Catalog>,
    metrics: RegistryMetrics,
    visibility: Arc<Visibility>,
    /// eddy's own token requests (anonymous ones, and with node credentials).
    tokens: Arc<TokenClient>,
    node_credentials: Option<Arc<NodeCredentials>>,
    /// Manifest and blob fetches go through here: along a registry's `--mirror`/`--fallback`
    /// chain when it has one, else straight to the registry.
    chains: Arc<Chains>,
    /// (repository, credentials hash) → when upstream last accepted them.
    auth_ok: Mutex<HashMap<(RepoKey, [u8; 32]), Instant>>,
    /// containerd and peers, asked before the upstream on a miss.
    sources: Sources,
    /// How long a fill waits for upstream's next bytes ([`UPSTREAM_IDLE`] by default).
    upstream_idle: Duration,
}

/// Where a fill's bytes came from.
struct Served {
    source: SourceKind,
    /// For peers' bytes that do not verify.
    blame: Option<Blame>,
}

impl Default for Served {
    fn default() -> Self {
        Served {
            source: SourceKind::Upstream,
            blame: None,
        }
    }
}

impl Registry {
    /// `node_credentials`: from `--upstream-auth-file`.
    pub fn new(
        upstream: Upstream,
        store: Arc<Store>,
        catalog: Arc<Catalog>,
        metrics: RegistryMetrics,
        node_credentials: Option<NodeCredentials>,
    ) -> Self {
        let tokens = Arc::new(TokenClient::new(upstream.clone()));
        let node_credentials = node_credentials.map(Arc::new);
        Registry {
            chains: Arc::new(Chains::new(
                ChainConfig::default(),
                upstream.clone(),
                Arc::clone(&tokens),
                node_credentials.clone(),
                ChainMetrics::default(),
            )),
            visibility: Arc::new(Visibility::new(
                upstream.clone(),
                Arc::clone(&tokens),
                Arc::clone(&catalog),
            )),
            tokens,
            node_credentials,
            upstream,
            store,
            catalog,
            metrics,
            auth_ok: Mutex::new(HashMap::new()),
            sources: Sources::default(),
            upstream_idle: UPSTREAM_IDLE,
        }
    }

    /// Ask these sources (containerd, peers) before the upstream on a miss.
    pub fn with_sources(mut self, sources: Sources) -> Self {
        self.sources = sources;
        self
    }

    /// A fill whose upstream sends nothing for `idle` fails (`--upstream-idle-timeout`).
    pub fn with_upstream_idle(mut self, idle: Duration) -> Self {
        self.upstream_idle = idle;
        self
    }

    /// Registry chains (`chain`): `--mirror` and `--fallback`.
    pub fn with_chains(mut self, config: ChainConfig, metrics: ChainMetrics) -> Self {
        self.chains = Arc::new(Chains::new(
            config,
            self.upstream.clone(),
            Arc::clone(&self.tokens),
            self.node_credentials.clone(),
            metrics,
        ));
        self
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Upstream's public/private verdicts (what this node may share with peers).
    pub fn visibility(&self) -> Arc<Visibility> {
        Arc::clone(&self.visibility)
    }

    pub async fn handle(
        self: Arc<Self>,
        origin: Arc<Origin>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = self.route(&origin, req).await;
        // Every error answer eddy makes itself (not upstream's own) is logged with its cause
        // and counted: a client that sees it fails its pull.
        if let Some(failed) = resp.extensions().get::<EddyFailure>() {
            warn!(
                status = resp.status().as_u16(),
                reason = failed.reason,
                cause = %failed.cause,
                %method,
                registry = %origin.authority,
                path,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "eddy answered a client with an error"
            );
            self.metrics.error_response(failed.reason);
        }
        resp
    }

    async fn route(&self, origin: &Arc<Origin>, mut req: Request<Incoming>) -> Response<Body> {
        let origin = &**origin;
        let path = req.uri().path().to_string();
        let is_read = req.method() == Method::GET || req.method() == Method::HEAD;
        let api = parse_path(&path);
        if let (Api::Blob { repo, .. } | Api::Manifest { repo, .. }, true) = (&api, is_read) {
            self.add_node_credentials(origin, repo, &mut req).await;
        }
        match api {
            Api::Blob { repo, digest } if is_read => match digest.parse::<Digest>() {
                Ok(digest) => self.content(origin, repo, &digest, Kind::Blob, req).await,
                Err(_) => self.forward(origin, req, "blob").await,
            },
            Api::Manifest { repo, reference } if is_read => match reference.parse::<Digest>() {
                Ok(digest) => {
                    self.content(origin, repo, &digest, Kind::Manifest, req)
                        .await
                }
                Err(_) if reference.starts_with("sha256:") || reference.contains(':') => {
                    self.forward(origin, req, "manifest").await
                }
                Err(_) => self.manifest_by_tag(origin, repo, reference, req).await,
            },
            Api::Base => self.base(origin, req).await,
            _ => self.forward(origin, req, "other").await,
        }
    }

    /// A request without credentials of its own goes upstream with the node's, if it has
    /// some for this registry (see `credentials`).
    async fn add_node_credentials(&self, origin: &Origin, repo: &str, req: &mut Request<Incoming>) {
        let Some(creds) = &self.node_credentials else {
            return;
        };
        if req.headers().contains_key(header::AUTHORIZATION) {
            return;
        }
        let probe = upstream_uri(origin, req.uri());
        let auth = tokio::time::timeout(
            NODE_AUTH_TIMEOUT,
            creds.authorization(&self.tokens, &origin.authority, repo, &probe),
        )
        .await;
        if let Ok(Some(auth)) = auth {
            req.headers_mut().insert(header::AUTHORIZATION, auth);
        }
    }

    /// `/v2/`: passed through. While upstream is unreachable, answer as a registry would so
    /// that pulls of cached images can go on.
    async fn base(&self, origin: &Origin, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        match self.send_upstream(origin, req).await {
            Ok(resp) => resp,
            Err(e) if e.is_unreachable() && (method == Method::GET || method == Method::HEAD) => {
                debug!(error = %e, "upstream unreachable; answering /v2/ locally");
                let body = if method == Method::HEAD {
                    empty()
                } else {
                    full(Bytes::from_static(b"{}"))
                };
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(API_VERSION, "registry/2.0")
                    .body(body)
                    .expect("valid response")
            }
            Err(e) => bad_gateway(&e),
        }
    }

    /// A blob, or a manifest by digest: content-addressed, so cacheable.
    async fn content(
        &self,
        origin: &Origin,
        repo: &str,
        digest: &Digest,
        kind: Kind,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let repo_key = RepoKey::new(&origin.authority, repo);
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
            if let Err(denied) = self
                .authorize(
                    origin,
                    repo,
                    &repo_key,
                    kind,
                    digest,
                    meta.as_ref(),
                    req.headers(),
                )
                .await
            {
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
        self.fill(origin, repo, &repo_key, digest, kind, req).await
    }

    /// A miss: start (or join) the one shared upstream fetch of `digest` and stream from it.
    /// Manifests go the same way (registries count every manifest GET as a pull).
    async fn fill(
        &self,
        origin: &Origin,
        repo: &str,
        repo_key: &RepoKey,
        digest: &Digest,
        kind: Kind,
        req: Request<Incoming>,
    ) -> Response<Body> {
        // By digest, even when the client asked by tag: the content must be this digest.
        let uri = content_uri(origin, repo, kind, digest);
        let headers = request_headers(req.headers());
        let public = !headers.contains_key(header::AUTHORIZATION);
        // Other nodes share public content only, so only that is worth asking them for.
        let mut shareable = public || self.visibility.is_public(repo_key);
        if !shareable && self.sources.peers_active() && self.visibility.known(repo_key).is_none() {
            // A repository this node never asked about (a token registry hands anonymous
            // clients tokens too): ask now, once, so its first pull here can use peers.
            let check = self.visibility.check(repo_key, repo, &uri);
            shareable =
                tokio::time::timeout(VERDICT_BOUND, check).await == Ok(Some(Verdict::Public));
        }
        if !public {
            // Fetched with the client's credentials: find out whether anyone may have it.
            self.visibility.refresh(repo_key, repo, || uri.clone());
        }
        // Upstream answers the store should not keep (a refusal, or a blob that does not fit
        // on disk) go to this client as they are, uncached.
        let (uncached_tx, uncached_rx) = tokio::sync::oneshot::channel::<Response<Incoming>>();
        let owned = Arc::new(AtomicBool::new(false));
        // Which source the fill took its bytes from, and the peers among them.
        let served_by = Arc::new(Mutex::new(Served::default()));

        let fill = {
            let chains = Arc::clone(&self.chains);
            let catalog = Arc::clone(&self.catalog);
            let metrics = self.metrics.clone();
            let store = Arc::clone(&self.store);
            let sources = self.sources.clone();
            let upstream_idle = self.upstream_idle;
            let (digest_c, repo_key, owned) = (*digest, repo_key.clone(), Arc::clone(&owned));
            let served_by = Arc::clone(&served_by);
            self.store.fill(digest, move |held| async move {
                owned.store(true, Ordering::Relaxed);
                let started = Instant::now();
                // The fill fetches the whole blob (the client's own Range is served from it), or
                // the rest after the prefix a crashed run left (`held`). Manifests are small:
                // never resumed.
                let from = if kind == Kind::Blob { held } else { 0 };
                let fetch = move |from: u64| {
                    let mut headers = headers.clone();
                    headers.remove(header::RANGE);
                    headers.remove(header::IF_RANGE);
                    if from > 0 {
                        let range = format!("bytes={from}-").parse().expect("valid header");
                        headers.insert(header::RANGE, range);
                    }
                    let (chains, uri) = (Arc::clone(&chains), uri.clone());
                    async move { chains.fetch(Method::GET, uri, &headers).await }
                };
                let resume_upstream =
                    upstream_resume(fetch.clone(), kind, metrics.clone(), upstream_idle);
                let boxed = |e: UpstreamError| -> BoxError { Box::new(e) };

                // This node's containerd, then peers, before the upstream.
                let mut elected = false;
                if !sources.is_empty() {
                    match sources
                        .open(&digest_c, from, shareable, kind == Kind::Blob)
                        .await
                    {
                        Lookup::Found(mut found) => {
                            let known = catalog.content(&digest_c).and_then(|m| m.media_type);
                            let media_type = found.opened.media_type.clone().or(known);
                            // A manifest is served with its media type, or not from here.
                            if kind == Kind::Blob || media_type.is_some() {
                                // Peers share public content only. containerd's may be anyone's:
                                // not public until upstream says so (see `authorize`).
                                let public = public && found.kind == SourceKind::Peer;
                                if let Err(e) = catalog.record_content(
                                    &digest_c,
                                    media_type.as_deref(),
                                    &repo_key,
                                    public,
                                ) {
                                    warn!(error = %e, "recording content metadata failed");
                                }
                                *served_by.lock().unwrap() = Served {
                                    source: found.kind,
                                    blame: found.blame.take(),
                                };
                                return Ok(from_source(found, &metrics, resume_upstream));
                            }
                        }
                        Lookup::Upstream { elected: won } => elected = won,
                    }
                }

                let mut resp = fetch(from).await.map_err(boxed)?;
                let mut offset = 0;
                if from > 0 {
                    match resumed_at(&resp) {
                        Some(at) if at == from => offset = from,
                        // A 200 (upstream ignores Range) is a whole body the store can use.
                        _ if resp.status() == StatusCode::OK => {}
                        // A 416, or an answer that does not fit: ask again for the whole blob.
                        _ => resp = fetch(0).await.map_err(boxed)?,
                    }
                }
                metrics.upstream_latency(kind.label(), started.elapsed());
                let status_ok = resp.status() == StatusCode::OK
                    || (offset > 0 && resp.status() == StatusCode::PARTIAL_CONTENT);
                if !status_ok {
                    let status = resp.status();
                    let _ = uncached_tx.send(resp);
                    let refused: BoxError = format!("upstream answered {status}").into();
                    return Err(refused);
                }
                let len = if offset > 0 {
                    content_range_total(resp.headers())
                } else {
                    content_length(resp.headers())
                };
                if !store.admits(len.unwrap_or(0).saturating_sub(offset)) {
                    // The client gets the whole blob, uncached: a 206 is not what it asked for.
                    if offset > 0 {
                        resp = fetch(0).await.map_err(boxed)?;
                    }
                    let _ = uncached_tx.send(resp);
                    let full: BoxError = "disk below the free-space floor: not caching".into();
                    return Err(full);
                }
                let media_type = match kind {
                    Kind::Blob => None,
                    Kind::Manifest => {
                        let mt = resp
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok());
                        if mt.is_none() || len.is_none_or(|l| l > MAX_MANIFEST as u64) {
                            // Cannot be served faithfully from the store: relay it.
                            let _ = uncached_tx.send(resp);
                            let odd: BoxError = "manifest without Content-Type or too large".into();
                            return Err(odd);
                        }
                        mt.map(str::to_string)
                    }
                };
                // Content a chain endpoint served was fetched without the client's credentials.
                let public = public || served_by_endpoint(&resp);
                if let Err(e) =
                    catalog.record_content(&digest_c, media_type.as_deref(), &repo_key, public)
                {
                    warn!(error = %e, "recording content metadata failed");
                }
                // Peers may stream it from this fill from its first byte on (an elected fill
                // announced it already).
                if shareable && !elected {
                    sources.announce(&digest_c);
                }
                let counted = metrics.clone();
                let body = resp
                    .into_body()
                    .into_data_stream()
                    .inspect_ok(move |chunk| {
                        counted.bytes(SourceKind::Upstream, chunk.len() as u64)
                    });
                let body = idle_timeout(body, upstream_idle).boxed();
                Ok(Fetched {
                    body: resuming(body, offset, len, resume_upstream),
                    len,
                    offset,
                    gated: false,
                })
            })
        };

        let announced = match fill.started().await {
            Ok(len) => len,
            Err(e) => {
                if let Some(blame) = served_by.lock().unwrap().blame.take() {
                    if matches!(
                        e,
                        StoreError::DigestMismatch { .. } | StoreError::LengthMismatch { .. }
                    ) {
                        blame.blame("digest_mismatch");
                    }
                }
                return match uncached_rx.await {
                    // Upstream said no (401, 404, ...), or the disk is full: the client gets
                    // upstream's answer as it is.
                    Ok(resp) => {
                        self.metrics.request(kind.label(), SourceKind::Upstream);
                        self.counted_passthrough(resp)
                    }
                    // Someone else's fetch failed (or ours, before upstream answered): on
                    // any doubt, go upstream for this client directly.
                    Err(_) => {
                        warn!(%digest, error = %e, "shared fetch failed; fetching uncached");
                        self.metrics.request(kind.label(), SourceKind::Upstream);
                        let headers = request_headers(req.headers());
                        match self
                            .chains
                            .fetch(
                                Method::GET,
                                content_uri(origin, repo, kind, digest),
                                &headers,
                            )
                            .await
                        {
                            Ok(resp) => self.counted_passthrough(resp),
                            Err(e) => bad_gateway(&e),
                        }
                    }
                };
            }
        };
        let meta = self.catalog.content(digest);
        let joined = !owned.load(Ordering::Relaxed);
        let source = served_by.lock().unwrap().source;
        // We joined someone else's fetch, or ours came from containerd (content any client
        // on the node may have pulled, with any credentials): make sure this client may see it.
        if joined || source == SourceKind::Containerd {
            if let Err(denied) = self
                .authorize(
                    origin,
                    repo,
                    repo_key,
                    kind,
                    digest,
                    meta.as_ref(),
                    req.headers(),
                )
                .await
            {
                return denied;
            }
        }
        self.metrics.request(
            kind.label(),
            if joined { SourceKind::Store } else { source },
        );
        let media_type = meta.and_then(|m| m.media_type);
        if kind == Kind::Manifest
            && !media_type
                .as_deref()
                .is_some_and(|mt| accepts(req.headers(), mt))
        {
            return self
                .fetch_manifest(origin, repo_key, Some(digest), req)
                .await;
        }
        let len = match announced {
            Some(len) => len,
            // Upstream sent no length (a chunked body). A plain GET streams at once, without
            // a Content-Length; a Range needs the length, which comes with the last byte.
            None if req.method() == Method::GET && !req.headers().contains_key(header::RANGE) => {
                return self.serve_unsized(digest, media_type.as_deref(), joined, fill);
            }
            None => match fill.len().await {
                Ok(len) => len,
                Err(e) => return error_response(StatusCode::BAD_GATEWAY, "fill_failed", &e),
            },
        };
        self.serve_cached(
            req.method(),
            req.headers(),
            digest,
            media_type.as_deref(),
            len,
            joined,
            |s, e| fill.read_range(s, e).boxed(),
        )
    }

    /// Stream a fill of unknown length as it arrives (chunked). If it fails verification the
    /// body is cut off before its end, so the client cannot take it for complete.
    fn serve_unsized(
        &self,
        digest: &Digest,
        media_type: Option<&str>,
        hit: bool,
        fill: crate::store::Fill,
    ) -> Response<Body> {
        let metrics = self.metrics.clone();
        let stream = fill
            .read_range(0, None)
            .inspect_ok(move |chunk| {
                if hit {
                    metrics.bytes(SourceKind::Store, chunk.len() as u64)
                }
            })
            .map_ok(Frame::data)
            .map_err(|e| -> BoxError { Box::new(e) });
        Response::builder()
            .header(
                header::CONTENT_TYPE,
                media_type.unwrap_or("application/octet-stream"),
            )
            .header(DOCKER_CONTENT_DIGEST, digest.to_string())
            .header(API_VERSION, "registry/2.0")
            .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
            .expect("valid response")
    }

    /// GET a manifest (by digest, or by tag after revalidation) from upstream, store it if it
    /// verifies, and answer with upstream's headers.
    async fn fetch_manifest(
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

    async fn remember_manifest(
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
    async fn manifest_by_tag(
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
    async fn revalidate_tag(
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
    async fn stale_tag(
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
    async fn tag_from_peers(
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

    /// Serve a committed blob or manifest.
    fn serve_blob(
        &self,
        req: &Request<Incoming>,
        digest: &Digest,
        media_type: Option<&str>,
        blob: Blob,
    ) -> Response<Body> {
        let len = blob.len();
        self.serve_cached(
            req.method(),
            req.headers(),
            digest,
            media_type,
            len,
            true,
            |s, e| blob.read_range(s, e).boxed(),
        )
    }

    /// Serve cached (or filling) content with the registry's headers, honouring Range.
    ///
    /// `hit`: the content was already there (in the store, or being fetched for another
    /// client). Its bytes count as `eddy_bytes_total{source="store"}`; the bytes a client's
    /// own miss streams from its fill were already counted once, as upstream bytes.
    #[allow(clippy::too_many_arguments)]
    fn serve_cached<F>(
        &self,
        method: &Method,
        req_headers: &HeaderMap,
        digest: &Digest,
        media_type: Option<&str>,
        len: u64,
        hit: bool,
        read: F,
    ) -> Response<Body>
    where
        F: FnOnce(
            u64,
            Option<u64>,
        ) -> futures_util::stream::BoxStream<
            'static,
            Result<Bytes, crate::store::StoreError>,
        >,
    {
        let range = match req_headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            Some(spec) => match parse_range(spec, len) {
                RangeSpec::Satisfiable(start, end) => Some((start, end)),
                RangeSpec::Ignore => None,
                RangeSpec::Unsatisfiable => {
                    return Response::builder()
                        .status(StatusCode::RANGE_NOT_SATISFIABLE)
                        .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                        .body(empty())
                        .expect("valid response");
                }
            },
            None => None,
        };
        let mut resp = Response::builder()
            .header(
                header::CONTENT_TYPE,
                media_type.unwrap_or("application/octet-stream"),
            )
            .header(DOCKER_CONTENT_DIGEST, digest.to_string())
            .header(header::ETAG, format!("\"{digest}\""))
            .header(header::ACCEPT_RANGES, "bytes")
            .header(API_VERSION, "registry/2.0");
        let (start, end) = match range {
            Some((start, end)) => {
                resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{len}", end - 1),
                );
                (start, end)
            }
            None => (0, len),
        };
        resp = resp.header(header::CONTENT_LENGTH, end - start);
        if method == Method::HEAD {
            return resp.body(empty()).expect("valid response");
        }
        let metrics = self.metrics.clone();
        let stream = read(start, Some(end))
            .inspect_ok(move |chunk| {
                if hit {
                    metrics.bytes(SourceKind::Store, chunk.len() as u64)
                }
            })
            .map_ok(Frame::data)
            .map_err(|e| -> BoxError { Box::new(e) });
        resp.body(BodyExt::boxed_unsync(StreamBody::new(stream)))
            .expect("valid response")
    }

    /// Private content: upstream must accept this client's credentials for the repository
    /// (and the digest must exist there). Checked with a HEAD, remembered for AUTH_TTL.
    #[allow(clippy::too_many_arguments)]
    async fn authorize(
        &self,
        origin: &Origin,
        repo: &str,
        repo_key: &RepoKey,
        kind: Kind,
        digest: &Digest,
        meta: Option<&ContentMeta>,
        req_headers: &HeaderMap,
    ) -> Result<(), Response<Body>> {
        // Served to a request without credentials: public, whatever the repository.
        if meta.is_some_and(|m| m.public) {
            return Ok(());
        }
        let uri = || content_uri(origin, repo, kind, digest);
        let seen_in_repo = meta.is_some_and(|m| m.repos.contains(repo_key.as_str()));
        let verdict = seen_in_repo
            .then(|| self.visibility.known(repo_key))
            .flatten();
        if verdict.is_some() {
            // Re-checked in the background once old; the last verdict stands meanwhile.
            self.visibility.refresh(repo_key, repo, uri);
        }
        if meta.is_some_and(|m| self.visibility.content_is_public(m)) {
            return Ok(());
        }
        let uri = uri();
        // Content fetched with credentials, from a repository never checked: ask upstream
        // once whether anonymous clients may have it, instead of checking every client.
        if seen_in_repo
            && verdict.is_none()
            && self.visibility.check(repo_key, repo, &uri).await == Some(Verdict::Public)
        {
            return Ok(());
        }
        let credentials: [u8; 32] = Sha256::digest(
            req_headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes())
                .unwrap_or_default(),
        )
        .into();
        let key = (repo_key.clone(), credentials);
        if seen_in_repo {
            if let Some(at) = self.auth_ok.lock().unwrap().get(&key) {
                if at.elapsed() < AUTH_TTL {
                    return Ok(());
                }
            }
        }
        let mut headers = HeaderMap::new();
        for name in [header::AUTHORIZATION, header::ACCEPT] {
            if let Some(v) = req_headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        let mut req = Request::builder()
            .method(Method::HEAD)
            .uri(uri)
            .body(empty())
            .expect("valid request");
        *req.headers_mut() = headers;
        let resp = self.upstream.send(req).await.map_err(|e| bad_gateway(&e))?;
        if resp.status().is_success() || resp.status().is_redirection() {
            let mut cache = self.auth_ok.lock().unwrap();
            if cache.len() > 10_000 {
                cache.retain(|_, at| at.elapsed() < AUTH_TTL);
            }
            cache.insert(key, Instant::now());
            drop(cache);
            let _ = self.catalog.record_content(digest, None, repo_key, false);
            return Ok(());
        }
        debug!(status = %resp.status(), repo = %repo_key, "upstream refused the client's credentials");
        Err(passthrough_response(resp))
    }

    /// An upstream response relayed uncached, its body bytes counted as upstream bytes.
    fn counted_passthrough(&self, resp: Response<Incoming>) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        let metrics = self.metrics.clone();
        let body = body
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    metrics.bytes(SourceKind::Upstream, data.len() as u64);
                }
                frame
            })
            .map_err(|e| -> BoxError { Box::new(e) })
            .boxed_unsync();
        Response::from_parts(strip_hop_by_hop(parts), body)
    }

    /// Pass the request upstream untouched and the answer back untouched.
    async fn forward(
        &self,
        origin: &Origin,
        req: Request<Incoming>,
        kind: &'static str,
    ) -> Response<Body> {
        self.metrics.request(kind, SourceKind::Upstream);
        match self.send_upstream(origin, req).await {
            Ok(resp) => resp,
            Err(e) => bad_gateway(&e),
        }
    }

    async fn send_upstream(
        &self,
        origin: &Origin,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, UpstreamError> {
        let (parts, body) = req.into_parts();
        let mut up = Request::builder()
            .method(parts.method)
            .uri(upstream_uri(origin, &parts.uri))
            .body(body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync())
            .expect("valid request");
        *up.headers_mut() = request_headers(&parts.headers);
        let resp = self.upstream.send(up).await?;
        Ok(passthrough_response(resp))
    }

    /// HEAD of an uncached blob: follow the CDN redirect like containerd would.
    async fn forward_following(&self, origin: &Origin, req: Request<Incoming>) -> Response<Body> {
        let headers = request_headers(req.headers());
        match self
            .chains
            .fetch(
                req.method().clone(),
                upstream_uri(origin, req.uri()),
                &headers,
            )
            .await
        {
            Ok(resp) => passthrough_response(resp),
            Err(e) => bad_gateway(&e),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }
    fn path_segment(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
        }
    }
}

/// The fill's body from a source other than the upstream, counted under that source, and
/// resumed upstream if it fails mid-way.
fn from_source(
    found: Found,
    metrics: &RegistryMetrics,
    resume_upstream: Resume,
) -> Fetched<ByteStream> {
    let Found {
        opened,
        kind: source,
        gated,
        ..
    } = found;
    let counted = metrics.clone();
    let body = opened
        .body
        .inspect_ok(move |chunk| counted.bytes(source, chunk.len() as u64))
        .boxed();
    Fetched {
        body: resuming(body, opened.offset, Some(opened.len), resume_upstream),
        len: Some(opened.len),
        offset: opened.offset,
        gated,
    }
}

/// Resumes a blob's fill at the upstream from byte `pos`, when its source failed mid-way.
/// Manifests are small and never resumed.
fn upstream_resume<F, Fut>(fetch: F, kind: Kind, metrics: RegistryMetrics, idle: Duration) -> Resume
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + 'static,
{
    Box::new(move |pos| {
        let (fetch, metrics) = (fetch.clone(), metrics.clone());
        Box::pin(async move {
            if kind != Kind::Blob {
                return None;
            }
            let resp = fetch(pos).await.ok()?;
            let (at, whole) = (resumed_at(&resp), resp.status() == StatusCode::OK);
            let body = resp
                .into_body()
                .into_data_stream()
                .inspect_ok(move |chunk| metrics.bytes(SourceKind::Upstream, chunk.len() as u64));
            let body = idle_timeout(body, idle).boxed();
            match at {
                Some(at) if at == pos => Some(body),
                _ if whole => Some(skip_prefix(body, pos)),
                _ => None,
            }
        })
    })
}

/// `/v2/<repo>/{blobs|manifests}/<digest>` at the origin.
fn content_uri(origin: &Origin, repo: &str, kind: Kind, digest: &Digest) -> Uri {
    format!(
        "{}://{}/v2/{repo}/{}/{digest}",
        origin.scheme,
        origin.authority,
        kind.path_segment()
    )
    .parse()
    .expect("repository names from a parsed path form a valid URI")
}

fn upstream_uri(origin: &Origin, uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("{}://{}{pq}", origin.scheme, origin.authority)
        .parse()
        .unwrap_or_else(|_| uri.clone())
}

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus Host, which the
/// client sets from the URI.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

fn request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    let names: Vec<HeaderName> = out.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for n in names {
        out.remove(n);
    }
    out
}

fn strip_hop_by_hop(mut parts: http::response::Parts) -> http::response::Parts {
    let names: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for n in names {
        parts.headers.remove(n);
    }
    parts
}

fn passthrough_response(resp: Response<Incoming>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        strip_hop_by_hop(parts),
        body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync(),
    )
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Where a 206's body starts (`Content-Range: bytes START-END/TOTAL`).
fn resumed_at(resp: &Response<Incoming>) -> Option<u64> {
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return None;
    }
    let range = resp.headers().get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (start, _) = range.strip_prefix("bytes ")?.split_once('-')?;
    start.trim().parse().ok()
}

/// The blob's total length from a 206's `Content-Range` (None for `*`).
fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    let range = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    range.rsplit_once('/')?.1.trim().parse().ok()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Why eddy itself answered a client with an error: read back in [`Registry::handle`], which
/// logs and counts it.
#[derive(Clone)]
struct EddyFailure {
    reason: &'static str,
    cause: String,
}

/// Registry-style error body, marked as eddy's own answer (`reason` is the metric label).
fn error_response(
    status: StatusCode,
    reason: &'static str,
    cause: &dyn std::fmt::Display,
) -> Response<Body> {
    let cause = cause.to_string();
    let message = format!("eddy: {cause}");
    let body = serde_json::json!({"errors": [{"code": "UNKNOWN", "message": message}]}).to_string();
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(body)))
        .expect("valid response");
    resp.extensions_mut().insert(EddyFailure { reason, cause });
    resp
}

fn bad_gateway(e: &UpstreamError) -> Response<Body> {
    let reason = if e.is_unreachable() {
        "upstream_unreachable"
    } else {
        "upstream_redirects"
    };
    error_response(
        StatusCode::BAD_GATEWAY,
        reason,
        &format_args!("upstream: {e}"),
    )
}

/// Whether the client's Accept header admits `media_type` (no Accept admits anything).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .filter(|v| !v.is_empty())
        .collect();
    values.is_empty()
        || values
            .iter()
            .any(|v| *v == "*/*" || v.eq_ignore_ascii_case(media_type))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn accept_matching() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json;q=0.5"));
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
        assert!(!accepts(
            &h,
            "application/vnd.docker.distribution.manifest.v2+json"
        ));
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(accepts(&h, "anything"));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(header::HOST, HeaderValue::from_static("x"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let out = request_headers(&h);
        assert!(out.get(header::CONNECTION).is_none() && out.get(header::HOST).is_none());
        assert_eq!(out.get(header::AUTHORIZATION).unwrap(), "Bearer t");
    }
}
