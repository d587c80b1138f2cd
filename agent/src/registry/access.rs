//! Who may have what: node credentials added to requests that carry none, and private
//! content served only to clients whose credentials upstream accepts.
use std::time::{Duration, Instant};

use http::{
    header::{self, HeaderMap},
    Method, Request, Response,
};
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};
use tracing::debug;

use super::{handler::Handler, origin::*, respond::*};
use crate::{
    store::catalog::ContentMeta,
    upstream::client::{empty, Body},
    upstream::visibility::Verdict,
};

/// How long an upstream "yes" to a client's credentials for a repository is trusted.
const AUTH_TTL: Duration = Duration::from_secs(60);
/// Getting a token with the node's credentials gives up after this long: the request then
/// goes upstream as it came.
const NODE_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

impl Handler {
    /// A request without credentials of its own goes upstream with the node's, if it has
    /// some for this registry (see `credentials`).
    pub(super) async fn add_node_credentials(
        &self,
        origin: &Origin,
        repo: &str,
        req: &mut Request<Incoming>,
    ) {
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

    /// Private content: upstream must accept this client's credentials for the repository
    /// (and the digest must exist there). Checked with a HEAD, remembered for AUTH_TTL.
    pub(super) async fn authorize(
        &self,
        content: &ContentRef<'_>,
        meta: Option<&ContentMeta>,
        req_headers: &HeaderMap,
    ) -> Result<(), Response<Body>> {
        let ContentRef {
            repo,
            repo_key,
            digest,
            ..
        } = *content;
        // Served to a request without credentials: public, whatever the repository.
        if meta.is_some_and(|m| m.public) {
            return Ok(());
        }
        let uri = || content.uri();
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
}
