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
use http_body_util::BodyExt;
use tracing::{debug, info};

use crate::{
    catalog::{Catalog, ContentMeta, RepoVisibility},
    challenge::{self, Bearer, Challenge},
    upstream::{empty, Upstream},
};

/// A verdict older than this is re-checked (in the background; the old one stands meanwhile).
pub const RECHECK_AFTER: Duration = Duration::from_secs(600);
/// One whole check (HEAD, token, HEAD) gives up after this long, undecided.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Token responses are small JSON documents; anything bigger is not one.
const MAX_TOKEN_RESPONSE: usize = 64 << 10;
/// The token spec's default lifetime, when the realm does not say.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);
/// A background check of one repository starts at most this often (a running check ends
/// within CHECK_TIMEOUT, so this also keeps two from running at once).
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Bounds on the in-memory maps (one entry per repository seen).
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Public,
    Private,
}

/// Why a check did not conclude.
#[derive(Debug, thiserror::Error)]
pub enum Undecided {
    #[error("upstream: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("upstream answered {0}")]
    Status(StatusCode),
    #[error("token realm {realm}: {reason}")]
    Realm { realm: String, reason: String },
    #[error("timed out")]
    Timeout,
}

pub struct Visibility {
    upstream: Upstream,
    catalog: Arc<Catalog>,
    /// repo → last verdict (a read-through cache of the catalog's records).
    known: Mutex<HashMap<String, RepoVisibility>>,
    /// repo → when its last background check started.
    attempts: Mutex<HashMap<String, Instant>>,
    /// repo → eddy's own anonymous `Authorization` for it, and when it expires.
    tokens: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl Visibility {
    pub fn new(upstream: Upstream, catalog: Arc<Catalog>) -> Self {
        Visibility {
            upstream,
            catalog,
            known: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The last verdict on `repo` (`authority/repository`), however old.
    pub fn known(&self, repo: &str) -> Option<Verdict> {
        self.record(repo).map(|r| verdict_of(&r))
    }

    pub fn is_public(&self, repo: &str) -> bool {
        self.known(repo) == Some(Verdict::Public)
    }

    /// Whether anyone may have this content: upstream served it without credentials, or it
    /// was seen in a repository upstream serves to anonymous clients (content addressing
    /// makes it public wherever it is).
    pub fn content_is_public(&self, meta: &ContentMeta) -> bool {
        meta.public || meta.repos.iter().any(|r| self.is_public(r))
    }

    fn record(&self, repo: &str) -> Option<RepoVisibility> {
        if let Some(r) = self.known.lock().unwrap().get(repo) {
            return Some(*r);
        }
        let r = self.catalog.repo_visibility(repo)?;
        self.remember(repo, r);
        Some(r)
    }

    fn remember(&self, repo: &str, record: RepoVisibility) {
        let mut known = self.known.lock().unwrap();
        if known.len() >= MAX_ENTRIES {
            // The catalog has them all; this is only a cache.
            known.clear();
        }
        known.insert(repo.to_string(), record);
    }

    fn is_fresh(&self, repo: &str) -> bool {
        self.record(repo)
            .is_some_and(|r| now_unix().saturating_sub(r.checked_at) < RECHECK_AFTER.as_secs())
    }

    /// Start a check of `repo` in the background unless a fresh verdict exists or a check
    /// started less than RETRY_AFTER ago. `probe` is content of the repository upstream just served (a manifest or
    /// blob URI), `name` the repository path within the registry.
    pub fn refresh(self: &Arc<Self>, repo: &str, name: &str, probe: Uri) {
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
            attempts.insert(repo.to_string(), Instant::now());
        }
        let this = Arc::clone(self);
        let (repo, name) = (repo.to_string(), name.to_string());
        tokio::spawn(async move {
            let _ = this.check(&repo, &name, &probe).await;
        });
    }

    /// Ask upstream now, record and return the verdict. `None`: undecided (nothing changes).
    pub async fn check(&self, repo: &str, name: &str, probe: &Uri) -> Option<Verdict> {
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, self.decide(repo, name, probe))
            .await
        {
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
                self.remember(repo, record);
                if let Err(e) = self.catalog.record_repo_visibility(repo, &record) {
                    debug!(error = %e, "recording a repository's visibility failed");
                }
                if before != Some(verdict) {
                    info!(repo, ?verdict, "repository visibility decided by an anonymous check upstream");
                }
                Some(verdict)
            }
            Err(e) => {
                debug!(repo, error = %e, "repository visibility undecided");
                None
            }
        }
    }

    /// eddy's own anonymous `Authorization` for `repo`: cached until it expires, else asked
    /// for through the challenge a credential-less HEAD of `probe` gets. `None` when the
    /// registry needs no token or gives anonymous clients none.
    pub async fn anonymous_authorization(
        &self,
        repo: &str,
        name: &str,
        probe: &Uri,
    ) -> Option<HeaderValue> {
        if let Some((value, until)) = self.tokens.lock().unwrap().get(repo) {
            if Instant::now() < *until {
                return Some(value.clone());
            }
        }
        let fetch = async {
            match self.probe_anonymously(probe).await.ok()? {
                (StatusCode::UNAUTHORIZED, Some(Challenge::Bearer(b))) => {
                    self.token(repo, name, &b).await.ok().flatten()
                }
                _ => None,
            }
        };
        tokio::time::timeout(CHECK_TIMEOUT, fetch).await.ok().flatten()
    }

    async fn decide(&self, repo: &str, name: &str, probe: &Uri) -> Result<Verdict, Undecided> {
        let (status, challenge) = self.probe_anonymously(probe).await?;
        if status != StatusCode::UNAUTHORIZED {
            return content_verdict(status).ok_or(Undecided::Status(status));
        }
        let bearer = match challenge {
            Some(Challenge::Bearer(b)) => b,
            // Basic (or no usable challenge): nothing anonymous gets in.
            _ => return Ok(Verdict::Private),
        };
        let Some(auth) = self.token(repo, name, &bearer).await? else {
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
    ) -> Result<(StatusCode, Option<Challenge>), crate::upstream::UpstreamError> {
        let resp = self.upstream.send(head_request(probe, None)).await?;
        let challenge = (resp.status() == StatusCode::UNAUTHORIZED)
            .then(|| challenge::from_headers(resp.headers()))
            .flatten();
        Ok((resp.status(), challenge))
    }

    /// An anonymous pull token for `name` from the challenge's realm. `Ok(None)`: the realm
    /// refused (401/403), so anonymous clients get nothing.
    async fn token(
        &self,
        repo: &str,
        name: &str,
        bearer: &Bearer,
    ) -> Result<Option<HeaderValue>, Undecided> {
        let realm_err = |reason: String| Undecided::Realm {
            realm: bearer.realm.clone(),
            reason,
        };
        let uri = token_uri(bearer, name).ok_or_else(|| realm_err("not a URI".into()))?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(empty())
            .expect("valid request");
        let resp = self.upstream.send(req).await?;
        let status = resp.status();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Ok(None);
        }
        if status != StatusCode::OK {
            return Err(realm_err(format!("answered {status}")));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| realm_err(e.to_string()))?
            .to_bytes();
        let (token, ttl) = parse_token_response(&body).ok_or_else(|| realm_err("no token".into()))?;
        let value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| realm_err("token is not a header value".into()))?;
        let mut tokens = self.tokens.lock().unwrap();
        if tokens.len() >= MAX_ENTRIES {
            tokens.retain(|_, (_, until)| Instant::now() < *until);
        }
        tokens.insert(repo.to_string(), (value.clone(), Instant::now() + ttl));
        Ok(Some(value))
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

fn head_request(uri: &Uri, auth: Option<&HeaderValue>) -> Request<crate::upstream::Body> {
    let mut headers = HeaderMap::new();
    if let Some(auth) = auth {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    // Manifests need an Accept the registry can answer; blobs ignore it.
    headers.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    let mut req = Request::builder()
        .method(Method::HEAD)
        .uri(uri.clone())
        .body(empty())
        .expect("valid request");
    *req.headers_mut() = headers;
    req
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json, */*";

/// `realm?service=..&scope=repository:<name>:pull`, as the token spec has it.
fn token_uri(bearer: &Bearer, name: &str) -> Option<Uri> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(service) = &bearer.service {
        query.append_pair("service", service);
    }
    query.append_pair("scope", &format!("repository:{name}:pull"));
    let sep = if bearer.realm.contains('?') { '&' } else { '?' };
    let uri: Uri = format!("{}{sep}{}", bearer.realm, query.finish())
        .parse()
        .ok()?;
    // Only absolute http(s) realms: a challenge must not point eddy anywhere else.
    matches!(uri.scheme_str(), Some("https" | "http"))
        .then_some(())
        .and(uri.authority().map(|_| uri.clone()))
}

/// `{"token": ..}` or `{"access_token": ..}`, and `expires_in` seconds.
fn parse_token_response(body: &[u8]) -> Option<(String, Duration)> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let r: TokenResponse = serde_json::from_slice(body).ok()?;
    let token = r.token.or(r.access_token).filter(|t| !t.is_empty())?;
    // Renew a little early, so a token is never used as it expires.
    let ttl = r
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TOKEN_TTL)
        .saturating_sub(Duration::from_secs(10))
        .max(Duration::from_secs(5));
    Some((token, ttl))
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

    fn bearer(realm: &str, service: Option<&str>) -> Bearer {
        Bearer {
            realm: realm.into(),
            service: service.map(String::from),
            scope: None,
        }
    }

    #[test]
    fn token_uri_follows_the_spec() {
        let uri = token_uri(
            &bearer("https://auth.docker.io/token", Some("registry.docker.io")),
            "library/busybox",
        )
        .unwrap();
        assert_eq!(
            uri.to_string(),
            "https://auth.docker.io/token?service=registry.docker.io&scope=repository%3Alibrary%2Fbusybox%3Apull"
        );
        // A realm with a query of its own keeps it.
        let uri = token_uri(&bearer("https://q.test/v2/auth?x=1", None), "a/b").unwrap();
        assert!(uri.to_string().starts_with("https://q.test/v2/auth?x=1&scope="));
        // Relative or odd realms are refused.
        assert!(token_uri(&bearer("/token", None), "a").is_none());
        assert!(token_uri(&bearer("file:///etc/passwd", None), "a").is_none());
    }

    #[test]
    fn token_responses() {
        let (t, ttl) =
            parse_token_response(br#"{"token":"abc","expires_in":300,"issued_at":"x"}"#).unwrap();
        assert_eq!((t.as_str(), ttl), ("abc", Duration::from_secs(290)));
        let (t, ttl) = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((t.as_str(), ttl), ("xyz", Duration::from_secs(50)));
        assert!(parse_token_response(br#"{"token":""}"#).is_none());
        assert!(parse_token_response(b"not json").is_none());
    }

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
        assert_eq!(content_verdict(StatusCode::NOT_FOUND), Some(Verdict::Private));
        assert_eq!(content_verdict(StatusCode::SERVICE_UNAVAILABLE), None);
    }

    #[test]
    fn content_is_public_through_any_public_repository() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Catalog::open(dir.path()).unwrap());
        catalog
            .record_repo_visibility(
                "r.test/pub",
                &RepoVisibility {
                    public: true,
                    checked_at: now_unix(),
                },
            )
            .unwrap();
        catalog
            .record_repo_visibility(
                "r.test/priv",
                &RepoVisibility {
                    public: false,
                    checked_at: now_unix(),
                },
            )
            .unwrap();
        let tls = crate::tls::upstream_client_config(&[]).unwrap();
        let v = Visibility::new(Upstream::new(tls, 1), catalog);
        let meta = |repos: &[&str]| ContentMeta {
            media_type: None,
            public: false,
            repos: repos.iter().map(|r| r.to_string()).collect(),
        };
        assert!(!v.content_is_public(&meta(&["r.test/priv"])));
        assert!(!v.content_is_public(&meta(&["r.test/unknown"])));
        assert!(v.content_is_public(&meta(&["r.test/priv", "r.test/pub"])));
        assert!(v.is_fresh("r.test/pub") && !v.is_fresh("r.test/unknown"));
    }
}
