//! Headers as a transparent proxy handles them: the registry's own, hop-by-hop ones that
//! never cross, Content-Length and Content-Range, and the client's Accept list.
use http::{
    header::{self, HeaderMap, HeaderName},
    Response, StatusCode,
};
use hyper::body::Incoming;

pub(super) const DOCKER_CONTENT_DIGEST: HeaderName =
    HeaderName::from_static("docker-content-digest");
pub(super) const API_VERSION: HeaderName =
    HeaderName::from_static("docker-distribution-api-version");

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), plus Host, which the
/// client sets from the URI.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
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

pub(super) fn request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    let names: Vec<HeaderName> = out.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for n in names {
        out.remove(n);
    }
    out
}

pub(super) fn strip_hop_by_hop(mut parts: http::response::Parts) -> http::response::Parts {
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

/// Where a 206's body starts (`Content-Range: bytes START-END/TOTAL`).
pub(super) fn resumed_at(resp: &Response<Incoming>) -> Option<u64> {
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return None;
    }
    let range = resp.headers().get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (start, _) = range.strip_prefix("bytes ")?.split_once('-')?;
    start.trim().parse().ok()
}

/// The blob's total length from a 206's `Content-Range` (None for `*`).
pub(super) fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    let range = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    range.rsplit_once('/')?.1.trim().parse().ok()
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether the client's Accept header admits `media_type` (no Accept admits anything).
pub(super) fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
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
