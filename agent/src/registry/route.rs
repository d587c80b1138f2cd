//! The entry point: which API a request calls, and where it goes.
use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{handler::Handler, headers::*, origin::*, respond::*};
use crate::{
    oci::api_path::{parse_path, Api},
    oci::digest::Digest,
    upstream::client::{empty, Body},
};

impl Handler {
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

    pub(super) async fn route(
        &self,
        origin: &Arc<Origin>,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
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

    /// `/v2/`: passed through. While upstream is unreachable, answer as a registry would so
    /// that pulls of cached images can go on.
    pub(super) async fn base(&self, origin: &Origin, req: Request<Incoming>) -> Response<Body> {
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
}
