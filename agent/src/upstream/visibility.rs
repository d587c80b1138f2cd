//! Public or private, decided the way upstream decides it.
//!
//! Docker Hub, GHCR, Quay and gcr.io hand anonymous clients a bearer token, so "the client sent
//! an Authorization header" says nothing about whether content is private. When content comes
//! through with a client's credentials, eddy asks the registry itself, without credentials:
//! a HEAD of the content; on a 401 with a Bearer challenge, a pull token from the challenge's
//! realm, anonymously, and the HEAD again with it. If that gets the content, the repository is
//! public: its cached content is served to anyone, with no per-client check, and while the
//! registry is down. Otherwise it stays private (served only after upstream accepts the
//! asking client's own credentials, see `registry::authorize`).
//!
//! Verdicts are kept per `authority/repository`, persisted in the catalog, and re-checked in
//! the background once older than [`RECHECK_AFTER`]; until a re-check concludes, the last
//! verdict stands, which is what keeps public content available through an outage. A check
//! that cannot conclude (upstream unreachable, 5xx) changes nothing.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use tracing::{debug, info};

use crate::{
    oci::repo_key::RepoKey,
    store::catalog::{Catalog, ContentMeta, RepoVisibility},
    upstream::challenge::{self, Challenge},
    upstream::client::{empty, Upstream},
    upstream::token::{self, TokenClient},
};

/// A verdict older than this is re-checked (in the background; the old one stands meanwhile).
pub const RECHECK_AFTER: Duration = Duration::from_secs(600);
/// One whole check (HEAD, token, HEAD) gives up after this long, undecided.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// A background check of one repository starts at most this often (a running check ends
/// within CHECK_TIMEOUT, so this also keeps two from running at once).
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Bounds on the in-memory maps (one entry per repository seen).
const MAX_ENTRIES: usize = 10_000;
/// How long a request (a miss, or a peer's request) waits for upstream's verdict on a repository
/// this node never asked about (content containerd pulled before eddy saw it), before it goes on
/// without one: peers do not serve such content, and a miss does not share it with peers.
pub const VERDICT_BOUND: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Public,
    Private,
}

/// Why a check did not conclude.
#[derive(Debug, thiserror::Error)]
pub enum Undecided {
    #[error("upstream: {0}")]
    Upstream(#[from] crate::upstream::client::UpstreamError),
    #[error("upstream answered {0}")]
    Status(StatusCode),
    #[error(transparent)]
    Token(#[from] crate::upstream::token::TokenError),
    #[error("timed out")]
    Timeout,
}

pub struct Visibility {
    upstream: Upstream,
    catalog: Arc<Catalog>,
    /// repo → last verdict, or None for none yet: a read-through cache of the catalog's
    /// records, so the request path does not touch the disk for a repository twice.
    known: Mutex<HashMap<RepoKey, Option<RepoVisibility>>>,
    /// repo → when its last background check started.
    attempts: Mutex<HashMap<RepoKey, Instant>>,
    tokens: Arc<TokenClient>,
}

impl Visibility {
    pub fn new(upstream: Upstream, tokens: Arc<TokenClient>, catalog: Arc<Catalog>) -> Self {
        Visibility {
            upstream,
            catalog,
            known: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            tokens,
        }
    }

    /// The last verdict on `repo` (`authority/repository`), however old.
    pub fn known(&self, repo: &RepoKey) -> Option<Verdict> {
        self.record(repo).map(|r| verdict_of(&r))
    }

    pub fn is_public(&self, repo: &RepoKey) -> bool {
        self.known(repo) == Some(Verdict::Public)
    }

    /// Whether anyone may have this content: upstream served it without credentials, or it
    /// was seen in a repository upstream serves to anonymous clients (content addressing
    /// makes it public wherever it is).
    pub fn content_is_public(&self, meta: &ContentMeta) -> bool {
        meta.public
            || meta
                .repos
                .iter()
                .any(|r| self.is_public(&RepoKey::from_stored(r.as_str())))
    }

    fn record(&self, repo: &RepoKey) -> Option<RepoVisibility> {
        if let Some(r) = self.known.lock().unwrap().get(repo) {
            return *r;
        }
        let r = self.catalog.repo_visibility(repo);
        self.remember(repo, r);
        r
    }

    fn remember(&self, repo: &RepoKey, record: Option<RepoVisibility>) {
        let mut known = self.known.lock().unwrap();
        if known.len() >= MAX_ENTRIES {
            // The catalog has them all; this is only a cache.
            known.clear();
        }
        known.insert(repo.clone(), record);
    }

    fn is_fresh(&self, repo: &RepoKey) -> bool {
        self.record(repo)
            .is_some_and(|r| now_unix().saturating_sub(r.checked_at) < RECHECK_AFTER.as_secs())
    }

    /// Start a check of `repo` in the background unless a fresh verdict exists or a check
    /// started less than RETRY_AFTER ago. `probe` gives content of the repository upstream
    /// just served (a manifest or blob URI; built only when a check starts), `name` the
    /// repository path within the registry.
    pub fn refresh(self: &Arc<Self>, repo: &RepoKey, name: &str, probe: impl FnOnce() -> Uri) {
        if self.is_fresh(repo) {
            return;
        }
        {
            let mut attempts = self.attempts.lock().unwrap();
            if attempts
                .get(repo)
                .is_some_and(|at| at.elapsed() < RETRY_AFTER)
            {
                return;
            }
            if attempts.len() >= MAX_ENTRIES {
                attempts.retain(|_, at| at.elapsed() < RETRY_AFTER);
            }
            attempts.insert(repo.clone(), Instant::now());
        }
        let this = Arc::clone(self);
        let (repo, name, probe) = (repo.clone(), name.to_string(), probe());
        tokio::spawn(async move {
            let _ = this.check(&repo, &name, &probe).await;
        });
    }

    /// Ask upstream now, record and return the verdict. `None`: undecided (nothing changes).
    pub async fn check(&self, repo: &RepoKey, name: &str, probe: &Uri) -> Option<Verdict> {
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, self.decide(name, probe)).await {
            Ok(r) => r,
            Err(_) => Err(Undecided::Timeout),
        };
        match outcome {
            Ok(verdict) => {
                let before = self.known(repo);
                let record = RepoVisibility {
                    public: verdict == Verdict::Public,
                    checked_at: now_unix(),
                };
                self.remember(repo, Some(record));
                if let Err(e) = self.catalog.record_repo_visibility(repo, &record) {
                    debug!(error = %e, "recording a repository's visibility failed");
                }
                if before != Some(verdict) {
                    info!(
                        repo = %repo,
                        ?verdict,
                        "repository visibility decided by an anonymous check upstream"
                    );
                }
                Some(verdict)
            }
            Err(e) => {
                debug!(repo = %repo, error = %e, "repository visibility undecided");
                None
            }
        }
    }

    /// eddy's own anonymous `Authorization` for repository `name` (see
    /// [`TokenClient::authorization`]). `None` when the registry needs no token or gives
    /// anonymous clients none.
    pub async fn anonymous_authorization(&self, name: &str, probe: &Uri) -> Option<HeaderValue> {
        let fetch = self.tokens.authorization(probe, name, None);
        tokio::time::timeout(CHECK_TIMEOUT, fetch)
            .await
            .ok()?
            .ok()?
    }

    async fn decide(&self, name: &str, probe: &Uri) -> Result<Verdict, Undecided> {
        let (status, challenge) = self.probe_anonymously(probe).await?;
        if status != StatusCode::UNAUTHORIZED {
            return content_verdict(status).ok_or(Undecided::Status(status));
        }
        let bearer = match challenge {
            Some(Challenge::Bearer(b)) => b,
            // Basic (or no usable challenge): nothing anonymous gets in.
            _ => return Ok(Verdict::Private),
        };
        let Some(auth) = self.tokens.pull_token(&bearer, name, None).await? else {
            return Ok(Verdict::Private);
        };
        let req = head_request(probe, Some(&auth));
        let status = self.upstream.send(req).await?.status();
        content_verdict(status).ok_or(Undecided::Status(status))
    }

    /// HEAD `probe` without credentials: the status, and the challenge of a 401.
    async fn probe_anonymously(
        &self,
        probe: &Uri,
    ) -> Result<(StatusCode, Option<Challenge>), crate::upstream::client::UpstreamError> {
        let resp = self.upstream.send(head_request(probe, None)).await?;
        let challenge = (resp.status() == StatusCode::UNAUTHORIZED)
            .then(|| challenge::from_headers(resp.headers()))
            .flatten();
        Ok((resp.status(), challenge))
    }
}

fn verdict_of(r: &RepoVisibility) -> Verdict {
    if r.public {
        Verdict::Public
    } else {
        Verdict::Private
    }
}

/// What an answer to a HEAD of content says about the asker's access.
fn content_verdict(status: StatusCode) -> Option<Verdict> {
    if status.is_success() || status.is_redirection() {
        Some(Verdict::Public)
    } else if matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
    ) {
        Some(Verdict::Private)
    } else {
        None
    }
}

fn head_request(uri: &Uri, auth: Option<&HeaderValue>) -> Request<crate::upstream::client::Body> {
    let mut headers = HeaderMap::new();
    if let Some(auth) = auth {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    // Manifests need an Accept the registry can answer; blobs ignore it.
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static(token::MANIFEST_ACCEPT),
    );
    let mut req = Request::builder()
        .method(Method::HEAD)
        .uri(uri.clone())
        .body(empty())
        .expect("valid request");
    *req.headers_mut() = headers;
    req
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_statuses() {
        assert_eq!(content_verdict(StatusCode::OK), Some(Verdict::Public));
        assert_eq!(
            content_verdict(StatusCode::TEMPORARY_REDIRECT),
            Some(Verdict::Public)
        );
        assert_eq!(
            content_verdict(StatusCode::UNAUTHORIZED),
            Some(Verdict::Private)
        );
        assert_eq!(
            content_verdict(StatusCode::NOT_FOUND),
            Some(Verdict::Private)
        );
        assert_eq!(content_verdict(StatusCode::SERVICE_UNAVAILABLE), None);
    }

    #[test]
    fn content_is_public_through_any_public_repository() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Catalog::open(dir.path()).unwrap());
        catalog
            .record_repo_visibility(
                &RepoKey::from_stored("r.test/pub"),
                &RepoVisibility {
                    public: true,
                    checked_at: now_unix(),
                },
            )
            .unwrap();
        catalog
            .record_repo_visibility(
                &RepoKey::from_stored("r.test/priv"),
                &RepoVisibility {
                    public: false,
                    checked_at: now_unix(),
                },
            )
            .unwrap();
        let tls = crate::tls::upstream_client_config(&[]).unwrap();
        let upstream = Upstream::new(tls, 1);
        let tokens = Arc::new(TokenClient::new(upstream.clone()));
        let v = Visibility::new(upstream, tokens, catalog);
        let meta = |repos: &[&str]| ContentMeta {
            media_type: None,
            public: false,
            repos: repos.iter().map(|r| r.to_string()).collect(),
        };
        assert!(!v.content_is_public(&meta(&["r.test/priv"])));
        assert!(!v.content_is_public(&meta(&["r.test/unknown"])));
        assert!(v.content_is_public(&meta(&["r.test/priv", "r.test/pub"])));
        assert!(
            v.is_fresh(&RepoKey::from_stored("r.test/pub"))
                && !v.is_fresh(&RepoKey::from_stored("r.test/unknown"))
        );
    }
}
