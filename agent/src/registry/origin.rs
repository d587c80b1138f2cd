//! What a registry request names: the registry the connection talks to (`Origin`), the kind
//! of content (`Kind`), one piece of content by digest (`ContentRef`), and the upstream URIs
//! for them.
use http::Uri;

use crate::{oci::digest::Digest, oci::repo_key::RepoKey};

/// Manifests larger than this are passed through uncached (registries cap them at 4 MiB).
pub(super) const MAX_MANIFEST: usize = 8 << 20;

/// The registry a downstream connection is talking to.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `https` or `http`.
    pub scheme: http::uri::Scheme,
    /// `host[:port]` as clients name it (SNI, or Host for plain HTTP).
    pub authority: String,
}

/// Blobs or manifests: the two kinds of content by digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Manifest => "manifest",
        }
    }
    pub(super) fn path_segment(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
        }
    }
}

/// One piece of content by digest, as a request names it.
#[derive(Clone, Copy)]
pub(super) struct ContentRef<'a> {
    pub origin: &'a Origin,
    /// The repository within the registry.
    pub repo: &'a str,
    pub repo_key: &'a RepoKey,
    pub digest: &'a Digest,
    pub kind: Kind,
}

impl ContentRef<'_> {
    /// By digest, even when the client asked by tag: the content must be this digest.
    pub fn uri(&self) -> Uri {
        content_uri(self.origin, self.repo, self.kind, self.digest)
    }
}

/// `/v2/<repo>/{blobs|manifests}/<digest>` at the origin.
pub(super) fn content_uri(origin: &Origin, repo: &str, kind: Kind, digest: &Digest) -> Uri {
    format!(
        "{}://{}/v2/{repo}/{}/{digest}",
        origin.scheme,
        origin.authority,
        kind.path_segment()
    )
    .parse()
    .expect("repository names from a parsed path form a valid URI")
}

pub(super) fn upstream_uri(origin: &Origin, uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("{}://{}{pq}", origin.scheme, origin.authority)
        .parse()
        .unwrap_or_else(|_| uri.clone())
}
