//! eddy's own requests to a registry's token realm (the Docker token flow): a pull token for
//! one repository, anonymously or with node credentials, cached until it expires.
//!
//! Used to ask whether anonymous clients may read a repository (`visibility`) and to fetch
//! with the node's credentials (`credentials`).
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};

use crate::{
    upstream::challenge::{self, Bearer, Challenge},
    upstream::client::{empty, Upstream, UpstreamError},
};

/// What eddy accepts for a manifest HEAD of its own (blobs ignore Accept).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json, */*";

/// Token responses are small JSON documents; anything bigger is not one.
const MAX_TOKEN_RESPONSE: usize = 64 << 10;
/// The token spec's default lifetime, when the realm does not say.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long a repository that answered a credential-less HEAD is taken to need none.
const OPEN_TTL: Duration = Duration::from_secs(60);
/// Bound on cached tokens (one per repository and credentials).
const MAX_TOKENS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("token realm {realm}: {reason}")]
    Realm { realm: String, reason: String },
}

/// (realm, service, repository, hash of the credentials) → `Authorization` and its expiry.
type Key = (String, Option<String>, String, [u8; 32]);

pub struct TokenClient {
    upstream: Upstream,
    cache: Mutex<HashMap<Key, (HeaderValue, Instant)>>,
    /// registry authority → the challenge its 401s carry (stable per registry), so a cached
    /// token needs no request at all.
    challenges: Mutex<HashMap<String, Challenge>>,
    /// `authority/name` → until when a credential-less HEAD is known to need no credentials
    /// (a registry without auth, or a repository it serves anonymously), so such requests do
    /// not cost a HEAD each.
    open: Mutex<HashMap<String, Instant>>,
}

impl TokenClient {
    pub fn new(upstream: Upstream) -> Self {
        TokenClient {
            upstream,
            cache: Mutex::new(HashMap::new()),
            challenges: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The `Authorization` to read repository `name` at `probe`'s registry with `basic`
    /// credentials (or anonymously): `basic` itself for a registry that asks for Basic auth,
    /// else a pull token from its realm. The registry's challenge is learned from a
    /// credential-less HEAD of `probe`, once per registry. `Ok(None)`: the registry needs no
    /// credentials, or gives none to these.
    pub async fn authorization(
        &self,
        probe: &Uri,
        name: &str,
        basic: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, TokenError> {
        let authority = probe.authority().map(|a| a.as_str()).unwrap_or_default();
        let open_key = format!("{authority}/{name}");
        if self
            .open
            .lock()
            .unwrap()
            .get(&open_key)
            .is_some_and(|until| Instant::now() < *until)
        {
            return Ok(None);
        }
        let known = self.challenges.lock().unwrap().get(authority).cloned();
        let challenge = match known {
            Some(c) => c,
            None => {
                let mut head = Request::builder()
                    .method(Method::HEAD)
                    .uri(probe.clone())
                    .body(empty())
                    .expect("valid request");
                head.headers_mut()
                    .insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
                let resp = self.upstream.send(head).await?;
                if resp.status() != StatusCode::UNAUTHORIZED {
                    // Only a success says "no credentials needed"; a 404 may hide a private
                    // repository.
                    if !(resp.status().is_success() || resp.status().is_redirection()) {
                        return Ok(None);
                    }
                    let mut open = self.open.lock().unwrap();
                    if open.len() >= MAX_TOKENS {
                        open.clear();
                    }
                    open.insert(open_key, Instant::now() + OPEN_TTL);
                    return Ok(None);
                }
                let Some(c) = challenge::from_headers(resp.headers()) else {
                    return Ok(None);
                };
                let mut challenges = self.challenges.lock().unwrap();
                if challenges.len() >= MAX_TOKENS {
                    challenges.clear();
                }
                challenges.insert(authority.to_string(), c.clone());
                c
            }
        };
        match challenge {
            Challenge::Bearer(b) => self.pull_token(&b, name, basic).await,
            Challenge::Other => Ok(basic.cloned()),
        }
    }

    /// A pull token for repository `name` from the challenge's realm, as an `Authorization`
    /// value, with `basic` credentials or anonymously. `Ok(None)`: the realm refused
    /// (401/403).
    pub async fn pull_token(
        &self,
        bearer: &Bearer,
        name: &str,
        basic: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, TokenError> {
        let key: Key = (
            bearer.realm.clone(),
            bearer.service.clone(),
            name.to_string(),
            Sha256::digest(basic.map(|b| b.as_bytes()).unwrap_or_default()).into(),
        );
        if let Some((value, until)) = self.cache.lock().unwrap().get(&key) {
            if Instant::now() < *until {
                return Ok(Some(value.clone()));
            }
        }
        let realm_err = |reason: String| TokenError::Realm {
            realm: bearer.realm.clone(),
            reason,
        };
        let uri = token_uri(bearer, name).ok_or_else(|| realm_err("not a URI".into()))?;
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(empty())
            .expect("valid request");
        if let Some(basic) = basic {
            req.headers_mut()
                .insert(header::AUTHORIZATION, basic.clone());
        }
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
        let (token, ttl) =
            parse_token_response(&body).ok_or_else(|| realm_err("no token".into()))?;
        let value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| realm_err("token is not a header value".into()))?;
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_TOKENS {
            cache.retain(|_, (_, until)| Instant::now() < *until);
            if cache.len() >= MAX_TOKENS {
                cache.clear();
            }
        }
        cache.insert(key, (value.clone(), Instant::now() + ttl));
        Ok(Some(value))
    }
}

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
    let absolute = matches!(uri.scheme_str(), Some("https" | "http")) && uri.authority().is_some();
    absolute.then_some(uri)
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
        assert!(uri
            .to_string()
            .starts_with("https://q.test/v2/auth?x=1&scope="));
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
}
