//! Answers to clients: content from the store or a fill (with the registry's headers and
//! Range), upstream's answers passed through, and eddy's own errors, each marked so that
//! [`Handler::handle`](super::Handler) logs and counts it.
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{
    header::{self, HeaderMap},
    Method, Request, Response, StatusCode,
};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use super::{handler::Handler, headers::*, origin::*};
use crate::{
    oci::digest::Digest,
    oci::range::{parse_range, RangeSpec},
    sources::source::SourceKind,
    store::Blob,
    upstream::client::{empty, Body, BoxError, UpstreamError},
};

/// Why eddy itself answered a client with an error: read back in [`Handler::handle`](super::Handler), which
/// logs and counts it.
#[derive(Clone)]
pub(super) struct EddyFailure {
    pub(super) reason: &'static str,
    pub(super) cause: String,
}

/// Content served from the store or a fill.
pub(super) struct Cached<'a> {
    pub digest: &'a Digest,
    pub media_type: Option<&'a str>,
    pub len: u64,
    /// The content was already there (in the store, or being fetched for another client).
    pub hit: bool,
}

/// Registry-style error body, marked as eddy's own answer (`reason` is the metric label).
pub(super) fn error_response(
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

pub(super) fn bad_gateway(e: &UpstreamError) -> Response<Body> {
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

pub(super) fn passthrough_response(resp: Response<Incoming>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        strip_hop_by_hop(parts),
        body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync(),
    )
}

pub(super) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

impl Handler {
    /// Serve a committed blob or manifest.
    pub(super) fn serve_blob(
        &self,
        req: &Request<Incoming>,
        digest: &Digest,
        media_type: Option<&str>,
        blob: Blob,
    ) -> Response<Body> {
        let len = blob.len();
        let what = Cached {
            digest,
            media_type,
            len,
            hit: true,
        };
        self.serve_cached(req.method(), req.headers(), what, |s, e| {
            blob.read_range(s, e).boxed()
        })
    }

    /// Serve cached (or filling) content with the registry's headers, honouring Range.
    ///
    /// `hit`: the content was already there (in the store, or being fetched for another
    /// client). Its bytes count as `eddy_bytes_total{source="store"}`; the bytes a client's
    /// own miss streams from its fill were already counted once, as upstream bytes.
    pub(super) fn serve_cached<F>(
        &self,
        method: &Method,
        req_headers: &HeaderMap,
        what: Cached<'_>,
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
        let Cached {
            digest,
            media_type,
            len,
            hit,
        } = what;
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

    /// Stream a fill of unknown length as it arrives (chunked). If it fails verification the
    /// body is cut off before its end, so the client cannot take it for complete.
    pub(super) fn serve_unsized(
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

    /// An upstream response relayed uncached, its body bytes counted as upstream bytes.
    pub(super) fn counted_passthrough(&self, resp: Response<Incoming>) -> Response<Body> {
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
    pub(super) async fn forward(
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

    pub(super) async fn send_upstream(
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
    pub(super) async fn forward_following(
        &self,
        origin: &Origin,
        req: Request<Incoming>,
    ) -> Response<Body> {
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
