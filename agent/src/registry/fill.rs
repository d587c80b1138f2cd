//! A miss's fill, as the store's single flight runs it for the first client that misses a
//! digest: this node's containerd, then peers, else the upstream (resumed with Range where a
//! crashed run left a prefix). Each step is a named method; what to make of upstream's answer
//! is decided by pure functions, tested below without a network.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt};
use http::{
    header::{self, HeaderMap},
    Method, Response, StatusCode, Uri,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::warn;

use super::{
    headers::{content_length, content_range_total, resumed_at},
    origin::{Kind, MAX_MANIFEST},
};
use crate::{
    node::sync::lock,
    oci::digest::Digest,
    oci::repo_key::RepoKey,
    registry::metrics::RegistryMetrics,
    sources::failover::{resuming, skip_prefix, Resume},
    sources::order::{Found, Lookup, Sources},
    sources::source::{Blame, ByteStream, SourceKind},
    store::catalog::Catalog,
    store::{Fetched, Store},
    upstream::chain::{served_by_endpoint, Chains},
    upstream::client::{idle_timeout, BoxError, UpstreamError},
};

/// What a fill tells the request that started it; every other client that joins the fill gets
/// only its bytes. Empty until the fill runs: a request whose report stays empty joined another
/// client's fill.
#[derive(Default)]
pub(super) struct FillReport(Mutex<Option<Report>>);

struct Report {
    source: SourceKind,
    /// For peers' bytes that do not verify.
    blame: Option<Blame>,
    /// An upstream answer the store does not keep (a refusal, a blob that does not fit on
    /// disk, an odd manifest): it goes to this client as it is.
    uncached: Option<Response<Incoming>>,
}

impl FillReport {
    fn report(&self) -> std::sync::MutexGuard<'_, Option<Report>> {
        lock(&self.0)
    }

    fn started(&self) {
        *self.report() = Some(Report {
            source: SourceKind::Upstream,
            blame: None,
            uncached: None,
        });
    }

    fn update(&self, change: impl FnOnce(&mut Report)) {
        if let Some(report) = self.report().as_mut() {
            change(report);
        }
    }

    /// Whether this request's own fill ran (else it joined another client's).
    pub fn ran_here(&self) -> bool {
        self.report().is_some()
    }

    /// Where the fill's bytes came from (the upstream unless a source served them).
    pub fn source(&self) -> SourceKind {
        self.report()
            .as_ref()
            .map_or(SourceKind::Upstream, |r| r.source)
    }

    pub fn take_blame(&self) -> Option<Blame> {
        self.report().as_mut()?.blame.take()
    }

    pub fn take_uncached(&self) -> Option<Response<Incoming>> {
        self.report().as_mut()?.uncached.take()
    }
}

/// A GET of the content upstream, along its registry's chain, from a byte offset.
#[derive(Clone)]
pub(super) struct UpstreamFetch {
    chains: Arc<Chains>,
    uri: Uri,
    /// The client's request headers, hop-by-hop ones removed.
    headers: HeaderMap,
}

impl UpstreamFetch {
    pub fn new(chains: Arc<Chains>, uri: Uri, headers: HeaderMap) -> Self {
        UpstreamFetch {
            chains,
            uri,
            headers,
        }
    }

    /// The fill fetches the whole content, or the rest from `from`; the client's own Range
    /// is served from the fill, so it is not sent.
    pub async fn get_from(&self, from: u64) -> Result<Response<Incoming>, UpstreamError> {
        let mut headers = self.headers.clone();
        headers.remove(header::RANGE);
        headers.remove(header::IF_RANGE);
        if from > 0 {
            let range = format!("bytes={from}-").parse().expect("valid header");
            headers.insert(header::RANGE, range);
        }
        self.chains
            .fetch(Method::GET, self.uri.clone(), &headers)
            .await
    }
}

/// The fill of one missed digest, with everything it needs once it runs on its own.
pub(super) struct MissFill {
    pub digest: Digest,
    pub kind: Kind,
    pub repo_key: RepoKey,
    /// The client sent no credentials of its own.
    pub public: bool,
    /// Peers may serve it, and stream it from this fill: public content.
    pub shareable: bool,
    pub fetch: UpstreamFetch,
    pub catalog: Arc<Catalog>,
    pub store: Arc<Store>,
    pub sources: Sources,
    pub metrics: RegistryMetrics,
    pub upstream_idle: Duration,
    pub report: Arc<FillReport>,
}

impl MissFill {
    /// `held`: the prefix a crashed run left on disk (see `store::resume`).
    pub async fn run(self, held: u64) -> Result<Fetched<ByteStream>, BoxError> {
        self.report.started();
        let started = Instant::now();
        // The fill fetches the whole blob, or the rest after the prefix a crashed run left.
        // Manifests are small: never resumed.
        let from = if self.kind == Kind::Blob { held } else { 0 };
        let elected = match self.try_sources(from).await {
            Ok(fetched) => return Ok(fetched),
            Err(elected) => elected,
        };
        let (resp, offset) = self.fetch_upstream(from).await?;
        self.metrics
            .upstream_latency(self.kind.label(), started.elapsed());
        let admitted = admit(self.kind, resp.status(), resp.headers(), offset, |n| {
            self.store.admits(n)
        });
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(why) => return Err(self.relay_uncached(resp, offset, why).await),
        };
        // Content a chain endpoint served was fetched without the client's credentials.
        let public = self.public || served_by_endpoint(&resp);
        self.record(admitted.media_type.as_deref(), public);
        // Peers may stream it from this fill from its first byte on (an elected fill
        // announced it already).
        if self.shareable && !elected {
            self.sources.announce(&self.digest);
        }
        Ok(self.upstream_body(resp, offset, admitted.len))
    }

    /// This node's containerd, then peers, before the upstream. `Err(elected)`: nobody
    /// serves it, and `elected` says whether this node fetches it for the cluster.
    async fn try_sources(&self, from: u64) -> Result<Fetched<ByteStream>, bool> {
        if self.sources.is_empty() {
            return Err(false);
        }
        let elect = self.kind == Kind::Blob;
        let lookup = self
            .sources
            .open(&self.digest, from, self.shareable, elect)
            .await;
        let mut found = match lookup {
            Lookup::Found(found) => found,
            Lookup::Upstream { elected } => return Err(elected),
        };
        let known = self
            .catalog
            .content(&self.digest)
            .and_then(|m| m.media_type);
        let media_type = found.opened.media_type.clone().or(known);
        // A manifest is served with its media type, or not from here.
        if self.kind == Kind::Manifest && media_type.is_none() {
            return Err(false);
        }
        // Peers share public content only. containerd's may be anyone's: not public until
        // upstream says so (see `authorize`).
        let public = self.public && found.kind == SourceKind::Peer;
        self.record(media_type.as_deref(), public);
        let blame = found.blame.take();
        self.report.update(|r| {
            r.source = found.kind;
            r.blame = blame;
        });
        Ok(from_source(found, &self.metrics, self.resume_upstream()))
    }

    /// Upstream's answer for the rest from `from`, and the offset its body starts at.
    async fn fetch_upstream(&self, from: u64) -> Result<(Response<Incoming>, u64), BoxError> {
        let resp = self.fetch.get_from(from).await?;
        match resume_offset(from, resp.status(), resumed_at(&resp)) {
            Some(offset) => Ok((resp, offset)),
            // A 416, or an answer that does not fit: ask again for the whole blob.
            None => Ok((self.fetch.get_from(0).await?, 0)),
        }
    }

    /// Hand upstream's answer to the client as it is, and fail the fill: the store keeps
    /// nothing of it.
    async fn relay_uncached(
        &self,
        resp: Response<Incoming>,
        offset: u64,
        why: NotCached,
    ) -> BoxError {
        let resp = if why == NotCached::DiskFull && offset > 0 {
            // The client gets the whole blob, uncached: a 206 is not what it asked for.
            match self.fetch.get_from(0).await {
                Ok(whole) => whole,
                Err(e) => return Box::new(e),
            }
        } else {
            resp
        };
        self.report.update(|r| r.uncached = Some(resp));
        why.reason().into()
    }

    fn record(&self, media_type: Option<&str>, public: bool) {
        let recorded =
            self.catalog
                .record_content(&self.digest, media_type, &self.repo_key, public);
        if let Err(e) = recorded {
            warn!(error = %e, "recording content metadata failed");
        }
    }

    fn upstream_body(
        &self,
        resp: Response<Incoming>,
        offset: u64,
        len: Option<u64>,
    ) -> Fetched<ByteStream> {
        let counted = self.metrics.clone();
        let body = resp
            .into_body()
            .into_data_stream()
            .inspect_ok(move |chunk| counted.bytes(SourceKind::Upstream, chunk.len() as u64));
        let body = idle_timeout(body, self.upstream_idle).boxed();
        Fetched {
            body: resuming(body, offset, len, self.resume_upstream()),
            len,
            offset,
            gated: false,
        }
    }

    fn resume_upstream(&self) -> Resume {
        upstream_resume(
            self.fetch.clone(),
            self.kind,
            self.metrics.clone(),
            self.upstream_idle,
        )
    }
}

/// Where the body of upstream's answer to "the rest from `from`" starts: at `from` (a 206 that
/// starts there), at 0 (a 200: upstream ignores Range, and a whole body is one the store can
/// use), or `None`: a 416, or an answer that does not fit, so ask again for the whole blob.
fn resume_offset(from: u64, status: StatusCode, resumed_at: Option<u64>) -> Option<u64> {
    if from == 0 {
        return Some(0);
    }
    match resumed_at {
        Some(at) if at == from => Some(from),
        _ if status == StatusCode::OK => Some(0),
        _ => None,
    }
}

/// What the store keeps of upstream's answer.
#[derive(Debug, PartialEq, Eq)]
struct Admitted {
    len: Option<u64>,
    /// A manifest's media type (blobs have none).
    media_type: Option<String>,
}

/// Why upstream's answer goes to the client as it is, uncached.
#[derive(Debug, PartialEq, Eq)]
enum NotCached {
    /// Upstream said no (401, 404, ...): the client gets that.
    Refused(StatusCode),
    /// The disk is below the free-space floor.
    DiskFull,
    /// A manifest without Content-Type, or too large: it cannot be served faithfully from the
    /// store.
    OddManifest,
}

impl NotCached {
    fn reason(&self) -> String {
        match self {
            NotCached::Refused(status) => format!("upstream answered {status}"),
            NotCached::DiskFull => "disk below the free-space floor: not caching".into(),
            NotCached::OddManifest => "manifest without Content-Type or too large".into(),
        }
    }
}

/// Whether the store keeps upstream's answer, whose body starts at `offset`. `admits`: whether
/// the store has room for this many bytes.
fn admit(
    kind: Kind,
    status: StatusCode,
    headers: &HeaderMap,
    offset: u64,
    admits: impl FnOnce(u64) -> bool,
) -> Result<Admitted, NotCached> {
    let resumed = offset > 0 && status == StatusCode::PARTIAL_CONTENT;
    if status != StatusCode::OK && !resumed {
        return Err(NotCached::Refused(status));
    }
    let len = if offset > 0 {
        content_range_total(headers)
    } else {
        content_length(headers)
    };
    if !admits(len.unwrap_or(0).saturating_sub(offset)) {
        return Err(NotCached::DiskFull);
    }
    let media_type = match kind {
        Kind::Blob => None,
        Kind::Manifest => {
            let media_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            if media_type.is_none() || len.is_none_or(|l| l > MAX_MANIFEST as u64) {
                return Err(NotCached::OddManifest);
            }
            media_type.map(str::to_string)
        }
    };
    Ok(Admitted { len, media_type })
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
fn upstream_resume(
    fetch: UpstreamFetch,
    kind: Kind,
    metrics: RegistryMetrics,
    idle: Duration,
) -> Resume {
    Box::new(move |pos| {
        let (fetch, metrics) = (fetch.clone(), metrics.clone());
        Box::pin(async move {
            if kind != Kind::Blob {
                return None;
            }
            let resp = fetch.get_from(pos).await.ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(name.clone(), HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn a_resumed_fill_takes_the_rest_or_a_whole_body_and_asks_again_otherwise() {
        assert_eq!(resume_offset(0, StatusCode::OK, None), Some(0));
        assert_eq!(
            resume_offset(100, StatusCode::PARTIAL_CONTENT, Some(100)),
            Some(100)
        );
        // Upstream ignores Range: a whole body, which the store can use.
        assert_eq!(resume_offset(100, StatusCode::OK, None), Some(0));
        // A 206 from elsewhere, or a 416: ask again from 0.
        assert_eq!(
            resume_offset(100, StatusCode::PARTIAL_CONTENT, Some(50)),
            None
        );
        assert_eq!(
            resume_offset(100, StatusCode::RANGE_NOT_SATISFIABLE, None),
            None
        );
    }

    #[test]
    fn a_whole_blob_is_kept_with_its_length() {
        let h = headers(&[(header::CONTENT_LENGTH, "1000")]);
        let admitted = admit(Kind::Blob, StatusCode::OK, &h, 0, |n| n == 1000);
        assert_eq!(
            admitted,
            Ok(Admitted {
                len: Some(1000),
                media_type: None
            })
        );
    }

    #[test]
    fn a_resumed_blob_takes_its_length_from_content_range_and_needs_room_for_the_rest() {
        let h = headers(&[
            (header::CONTENT_LENGTH, "600"),
            (header::CONTENT_RANGE, "bytes 400-999/1000"),
        ]);
        let admitted = admit(Kind::Blob, StatusCode::PARTIAL_CONTENT, &h, 400, |n| {
            n == 600
        });
        assert_eq!(admitted.map(|a| a.len), Ok(Some(1000)));
        // A 206 for a fill that asked for everything is not the content.
        let not = admit(Kind::Blob, StatusCode::PARTIAL_CONTENT, &h, 0, |_| true);
        assert_eq!(not, Err(NotCached::Refused(StatusCode::PARTIAL_CONTENT)));
    }

    #[test]
    fn refusals_and_a_full_disk_are_relayed_uncached() {
        let h = headers(&[(header::CONTENT_LENGTH, "10")]);
        for status in [
            StatusCode::UNAUTHORIZED,
            StatusCode::NOT_FOUND,
            StatusCode::BAD_GATEWAY,
        ] {
            assert_eq!(
                admit(Kind::Blob, status, &h, 0, |_| true),
                Err(NotCached::Refused(status))
            );
        }
        assert_eq!(
            admit(Kind::Blob, StatusCode::OK, &h, 0, |_| false),
            Err(NotCached::DiskFull)
        );
        assert!(NotCached::DiskFull.reason().contains("free-space floor"));
        assert!(NotCached::Refused(StatusCode::NOT_FOUND)
            .reason()
            .contains("404"));
    }

    #[test]
    fn a_manifest_is_kept_only_with_a_type_and_a_length_within_bounds() {
        let mt = "application/vnd.oci.image.manifest.v1+json";
        let ok = headers(&[(header::CONTENT_LENGTH, "500"), (header::CONTENT_TYPE, mt)]);
        assert_eq!(
            admit(Kind::Manifest, StatusCode::OK, &ok, 0, |_| true),
            Ok(Admitted {
                len: Some(500),
                media_type: Some(mt.into())
            })
        );
        let untyped = headers(&[(header::CONTENT_LENGTH, "500")]);
        let lengthless = headers(&[(header::CONTENT_TYPE, mt)]);
        let huge = headers(&[
            (header::CONTENT_LENGTH, "9000000"),
            (header::CONTENT_TYPE, mt),
        ]);
        for h in [untyped, lengthless, huge] {
            assert_eq!(
                admit(Kind::Manifest, StatusCode::OK, &h, 0, |_| true),
                Err(NotCached::OddManifest)
            );
        }
    }

    #[test]
    fn the_report_is_empty_for_a_joined_fill_and_holds_what_the_fill_said() {
        let report = FillReport::default();
        assert!(!report.ran_here());
        assert_eq!(report.source(), SourceKind::Upstream);
        report.update(|r| r.source = SourceKind::Peer);
        assert!(
            !report.ran_here(),
            "nothing is recorded for a fill that did not run here"
        );
        report.started();
        report.update(|r| r.source = SourceKind::Peer);
        assert!(report.ran_here());
        assert_eq!(report.source(), SourceKind::Peer);
        assert!(report.take_blame().is_none() && report.take_uncached().is_none());
    }
}
