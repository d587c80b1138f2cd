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
//!
//! Files, in the order a request meets them: `route` (which API), `access` (node
//! credentials, private content), `content` (by digest: the store, else the shared `fill`),
//! `manifests` (by tag), `respond` (answers, with `headers`); `origin` and `handler` hold the
//! request's vocabulary and the handler's state. `metrics` is the handler's own.
//!
//! May import `oci`, `store`, `sources` and `upstream`.
mod access;
mod content;
mod fill;
mod handler;
mod headers;
mod manifests;
pub mod metrics;
mod origin;
mod respond;
mod route;

pub use handler::{Handler, UPSTREAM_IDLE};
pub use origin::Origin;
