//! Registry chains (`--mirror`, `--fallback`): other endpoints for a registry, configured in
//! eddy once instead of in a containerd `hosts.toml` on every node.
//!
//! For a registry with a chain, a manifest or blob request goes to
//! 1. its mirrors, in order, until one answers with success;
//! 2. the registry itself, with the client's own request (its `Authorization` included);
//! 3. its fallbacks, in order, when the registry answered 404 or 5xx, or could not be reached.
//!
//! The client gets the first success, or else the registry's own answer (or error: then an
//! unreachable registry still means "serve the last known tag" to the handler). Whatever an
//! endpoint serves goes to the client under the name it asked for, with the digest the
//! endpoint gave; the store keeps content by digest, so it is shared across names.
//!
//! Endpoints are not intercepted destinations: eddy resolves their host names itself
//! (DNS) and connects from its marked sockets. A client's `Authorization` was issued for the
//! registry it asked, so it never goes to an endpoint: there eddy uses the node's
//! credentials for that host (`--upstream-auth-file`), or an anonymous pull token.
use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use hyper::body::Incoming;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tracing::debug;

use crate::{
    oci::api_path::{parse_path, Api},
    oci::host::split_host_port,
    upstream::client::{Upstream, UpstreamError},
    upstream::credentials::NodeCredentials,
    upstream::token::TokenClient,
};

/// An endpoint that could not be reached is skipped for this long, so a dead mirror costs
/// one connect timeout, not one per request. So is a registry with fallbacks: while it is
/// down, its fallbacks serve at once.
const SKIP_UNREACHABLE: Duration = Duration::from_secs(30);
/// Getting a token for an endpoint gives up after this long; the request then goes without.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("expected REGISTRY=ENDPOINT[,ENDPOINT...]")]
    Shape,
    #[error("registry {registry:?} is not HOST[:PORT]")]
    Registry { registry: String },
    #[error("endpoint {endpoint:?} is not [http://|https://]HOST[:PORT][/PREFIX]")]
    Endpoint { endpoint: String },
    #[error("endpoint {endpoint:?}: prefix {prefix:?} is not a repository path (lower-case a-z, 0-9, separators . _ - and /)")]
    Prefix { endpoint: String, prefix: String },
    #[error("endpoint {endpoint:?} is the registry itself")]
    SelfLoop { endpoint: String },
}

/// `HOST[:PORT]`: a registry as clients name it. Docker Hub's names are one registry, the
/// one containerd dials (`registry-1.docker.io`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryAuthority {
    /// Lower case; an IPv6 address without brackets.
    pub host: String,
    pub port: Option<u16>,
}

impl RegistryAuthority {
    fn parse(raw: &str) -> Option<Self> {
        let (host, port) = split_host_port(raw)?;
        let host = match host.as_str() {
            "docker.io" | "index.docker.io" => DOCKER_HUB_API.to_string(),
            _ => host,
        };
        Some(RegistryAuthority { host, port })
    }

    /// Whether a client's request to `scheme://authority` goes to this registry. A registry
    /// named without a port is the one on the scheme's default port.
    fn matches(&self, https: bool, authority: &str) -> bool {
        let Some((host, port)) = split_host_port(authority) else {
            return false;
        };
        let default = if https { 443 } else { 80 };
        host == self.host && port.unwrap_or(default) == self.port.unwrap_or(default)
    }

    /// What `--registry` takes for it (a host name, or an IP with its port), so the proxy
    /// terminates its connections.
    pub fn registry_value(&self) -> String {
        match (self.host.parse::<IpAddr>(), self.port) {
            (Ok(IpAddr::V6(ip)), Some(port)) => format!("[{ip}]:{port}"),
            (Ok(ip), Some(port)) => format!("{ip}:{port}"),
            _ => self.host.clone(),
        }
    }
}

impl fmt::Display for RegistryAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        match self.port {
            Some(port) => write!(f, "{host}:{port}"),
            None => f.write_str(&host),
        }
    }
}

/// Docker Hub's API host; `docker.io` names it.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// `[http://|https://]HOST[:PORT][/PREFIX]`: where else a registry's content can be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// Lower case; `registry-1.docker.io` for `docker.io`; IPv6 without brackets.
    pub host: String,
    pub port: Option<u16>,
    /// Put in front of the repository path; no leading or trailing `/`.
    pub prefix: String,
    /// As the metrics and logs show it: `https://ghcr.io/acme`, `http://10.0.0.5:5000`.
    pub label: Arc<str>,
}

impl Endpoint {
    fn parse(raw: &str) -> Option<Self> {
        let (https, rest) = if let Some(rest) = raw.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = raw.strip_prefix("http://") {
            (false, rest)
        } else if raw.contains("://") {
            return None;
        } else {
            (true, raw)
        };
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() && !crate::oci::api_path::valid_repository(prefix) {
            return None;
        }
        let (host, port) = split_host_port(authority)?;
        let host = match host.as_str() {
            "docker.io" | "index.docker.io" => DOCKER_HUB_API.to_string(),
            _ => host,
        };
        let name = RegistryAuthority {
            host: host.clone(),
            port,
        };
        let scheme = if https { "https" } else { "http" };
        let label = match prefix {
            "" => format!("{scheme}://{name}"),
            p => format!("{scheme}://{name}/{p}"),
        };
        Some(Endpoint {
            https,
            host,
            port,
            prefix: prefix.to_string(),
            label: label.into(),
        })
    }

    /// The PREFIX of `raw`, if it has one that is not a repository path.
    fn bad_prefix(raw: &str) -> Option<&str> {
        let rest = raw
            .strip_prefix("https://")
            .or_else(|| raw.strip_prefix("http://"))
            .unwrap_or(raw);
        if rest.contains("://") {
            return None; // another scheme: not an endpoint at all
        }
        let prefix = rest.split_once('/')?.1.trim_end_matches('/');
        let ok = prefix.is_empty() || crate::oci::api_path::valid_repository(prefix);
        (!ok).then_some(prefix)
    }

    fn is_docker_hub(&self) -> bool {
        self.host == DOCKER_HUB_API
    }

    /// `host[:port]`, the port left out when it is the scheme's default (as eddy's upstream
    /// client and the node credentials name hosts).
    pub fn authority(&self) -> String {
        let name = RegistryAuthority {
            host: self.host.clone(),
            port: self.port,
        }
        .to_string();
        let default = if self.https { 443 } else { 80 };
        match self.port {
            Some(p) if p == default => name
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or(name),
            _ => name,
        }
    }

    /// The repository at this endpoint for `repo` at the registry: the prefix in front, and
    /// Docker Hub's `library/` for a single-component name.
    pub fn repository(&self, repo: &str) -> String {
        let name = match self.prefix.as_str() {
            "" => repo.to_string(),
            prefix => format!("{prefix}/{repo}"),
        };
        if self.is_docker_hub() && !name.contains('/') {
            format!("library/{name}")
        } else {
            name
        }
    }

    /// `/v2/<name>/<tail>` at this endpoint.
    fn uri(&self, name: &str, tail: &str) -> Option<Uri> {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/v2/{name}/{tail}", self.authority())
            .parse()
            .ok()
    }

    fn is(&self, registry: &RegistryAuthority) -> bool {
        let default = if self.https { 443 } else { 80 };
        self.host == registry.host
            && self.port.unwrap_or(default) == registry.port.unwrap_or(default)
            && self.prefix.is_empty()
    }
}

/// One `--mirror` or `--fallback` value: `REGISTRY=ENDPOINT[,ENDPOINT...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFlag {
    pub registry: RegistryAuthority,
    pub endpoints: Vec<Endpoint>,
}

impl ChainFlag {
    /// clap's value parser: one line saying what is wrong.
    pub fn parse(value: &str) -> Result<Self, ChainError> {
        let shape = || ChainError::Shape;
        let (registry, endpoints) = value.trim().split_once('=').ok_or_else(shape)?;
        let registry_name =
            RegistryAuthority::parse(registry.trim()).ok_or_else(|| ChainError::Registry {
                registry: registry.to_string(),
            })?;
        let mut parsed = Vec::new();
        for raw in endpoints.split(',').map(str::trim) {
            if raw.is_empty() {
                return Err(shape());
            }
            if let Some(prefix) = Endpoint::bad_prefix(raw) {
                return Err(ChainError::Prefix {
                    endpoint: raw.to_string(),
                    prefix: prefix.to_string(),
                });
            }
            let endpoint = Endpoint::parse(raw).ok_or_else(|| ChainError::Endpoint {
                endpoint: raw.to_string(),
            })?;
            if endpoint.is(&registry_name) {
                return Err(ChainError::SelfLoop {
                    endpoint: raw.to_string(),
                });
            }
            parsed.push(endpoint);
        }
        Ok(ChainFlag {
            registry: registry_name,
            endpoints: parsed,
        })
    }
}

/// One registry's endpoints: mirrors before it, fallbacks after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub mirrors: Vec<Endpoint>,
    pub fallbacks: Vec<Endpoint>,
}

/// Every configured chain, by registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainConfig {
    chains: Vec<(RegistryAuthority, Chain)>,
}

impl ChainConfig {
    /// Merge the flags: repeated flags for one registry append, in order.
    pub fn new(mirrors: &[ChainFlag], fallbacks: &[ChainFlag]) -> Self {
        let mut config = ChainConfig::default();
        for (flags, fallback) in [(mirrors, false), (fallbacks, true)] {
            for flag in flags {
                let chain = config.entry(&flag.registry);
                let list = if fallback {
                    &mut chain.fallbacks
                } else {
                    &mut chain.mirrors
                };
                for endpoint in &flag.endpoints {
                    if !list.contains(endpoint) {
                        list.push(endpoint.clone());
                    }
                }
            }
        }
        config
    }

    fn entry(&mut self, registry: &RegistryAuthority) -> &mut Chain {
        let at = match self.chains.iter().position(|(r, _)| r == registry) {
            Some(at) => at,
            None => {
                self.chains.push((registry.clone(), Chain::default()));
                self.chains.len() - 1
            }
        };
        &mut self.chains[at].1
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// The chain of the registry a request to `uri` goes to.
    pub fn chain_for(&self, uri: &Uri) -> Option<(&RegistryAuthority, &Chain)> {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let authority = uri.authority()?.as_str();
        self.chains
            .iter()
            .find(|(r, _)| r.matches(https, authority))
            .map(|(r, c)| (r, c))
    }

    /// The registries with a chain, as `--registry` values (so they are intercepted).
    pub fn registry_values(&self) -> Vec<String> {
        self.chains
            .iter()
            .map(|(r, _)| r.registry_value())
            .collect()
    }

    /// Ports named by chained registries, which eddy must intercept.
    pub fn ports(&self) -> Vec<u16> {
        self.chains.iter().filter_map(|(r, _)| r.port).collect()
    }

    /// For the startup log: `registry: mirrors [..] fallbacks [..]`.
    pub fn describe(&self) -> Vec<String> {
        let labels = |v: &[Endpoint]| v.iter().map(|e| e.label.to_string()).collect::<Vec<_>>();
        self.chains
            .iter()
            .map(|(r, c)| {
                format!(
                    "{r}: mirrors {:?}, fallbacks {:?}",
                    labels(&c.mirrors),
                    labels(&c.fallbacks)
                )
            })
            .collect()
    }
}

/// How one step of a chain ended, as `eddy_endpoint_requests_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: this endpoint's answer goes to the client.
    Served,
    /// 404.
    NotFound,
    /// 401 or 403 (after eddy's own token, at an endpoint).
    Refused,
    /// 5xx.
    ServerError,
    /// Any other status.
    Other,
    Unreachable,
    /// Not tried: it could not be reached moments ago.
    Skipped,
}

impl Outcome {
    pub fn of(result: &Result<Response<Incoming>, UpstreamError>) -> Self {
        match result {
            Ok(resp) => Self::of_status(resp.status()),
            Err(UpstreamError::RecentlyUnreachable { .. }) => Outcome::Skipped,
            Err(e) if e.is_unreachable() => Outcome::Unreachable,
            Err(_) => Outcome::Other,
        }
    }

    fn of_status(status: StatusCode) -> Self {
        match status.as_u16() {
            200..=299 => Outcome::Served,
            404 => Outcome::NotFound,
            401 | 403 => Outcome::Refused,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Other,
        }
    }

    /// After the registry itself: do its fallbacks get a turn? Not after a refusal, which
    /// the client must see to authenticate (and then ask again).
    pub fn falls_back(self) -> bool {
        matches!(
            self,
            Outcome::NotFound | Outcome::ServerError | Outcome::Unreachable | Outcome::Skipped
        )
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::NotFound => "not_found",
            Outcome::Refused => "refused",
            Outcome::ServerError => "server_error",
            Outcome::Other => "other",
            Outcome::Unreachable => "unreachable",
            Outcome::Skipped => "skipped",
        }
    }
}

/// A response extension: an endpoint other than the registry itself served this. Content
/// eddy fetched there went without the client's credentials, so anyone on the node may have
/// it (as with the node's own credentials).
#[derive(Debug, Clone)]
pub struct ServedByEndpoint(pub Arc<str>);

/// Whether `resp` came from an endpoint of a chain rather than the registry itself.
pub fn served_by_endpoint<B>(resp: &Response<B>) -> bool {
    resp.extensions().get::<ServedByEndpoint>().is_some()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    registry: String,
    endpoint: String,
    outcome: &'static str,
}

/// `eddy_endpoint_requests_total{registry,endpoint,outcome}`: each step of each chain,
/// the registry itself included (`endpoint` = the registry's name).
#[derive(Clone, Default)]
pub struct ChainMetrics {
    requests: Family<EndpointLabels, Counter>,
}

impl ChainMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "eddy_endpoint_requests",
            "Requests along registry chains (--mirror, --fallback) by registry, endpoint and outcome; outcome=\"served\" is the endpoint whose answer the client got",
            m.requests.clone(),
        );
        m
    }

    fn count(&self, registry: &RegistryAuthority, endpoint: &str, outcome: Outcome) {
        self.requests
            .get_or_create(&EndpointLabels {
                registry: registry.to_string(),
                endpoint: endpoint.to_string(),
                outcome: outcome.label(),
            })
            .inc();
    }
}

/// The part of a content request an endpoint needs: the repository and what follows it.
struct Target {
    repo: String,
    /// `manifests/<reference>` or `blobs/<digest>`, with the query if there was one.
    tail: String,
}

impl Target {
    fn of(uri: &Uri) -> Option<Self> {
        let (repo, tail) = match parse_path(uri.path()) {
            Api::Manifest { repo, reference } => (repo, format!("manifests/{reference}")),
            Api::Blob { repo, digest } => (repo, format!("blobs/{digest}")),
            _ => return None,
        };
        let tail = match uri.query() {
            Some(q) => format!("{tail}?{q}"),
            None => tail,
        };
        Some(Target {
            repo: repo.to_string(),
            tail,
        })
    }
}

/// Sends manifest and blob requests along their registry's chain.
pub struct Chains {
    config: ChainConfig,
    upstream: Upstream,
    tokens: Arc<TokenClient>,
    node_credentials: Option<Arc<NodeCredentials>>,
    metrics: ChainMetrics,
    /// endpoint label → until when it is skipped (it could not be reached).
    down: Mutex<HashMap<Arc<str>, Instant>>,
}

impl Chains {
    pub fn new(
        config: ChainConfig,
        upstream: Upstream,
        tokens: Arc<TokenClient>,
        node_credentials: Option<Arc<NodeCredentials>>,
        metrics: ChainMetrics,
    ) -> Self {
        Chains {
            config,
            upstream,
            tokens,
            node_credentials,
            metrics,
            down: Mutex::new(HashMap::new()),
        }
    }

    /// GET/HEAD `uri` at a registry (following redirects, as
    /// [`Upstream::fetch_following`]), along the registry's chain if it has one.
    pub async fn fetch(
        &self,
        method: Method,
        uri: Uri,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let chained = self
            .config
            .chain_for(&uri)
            .and_then(|(registry, chain)| Some((registry, chain, Target::of(&uri)?)));
        let Some((registry, chain, target)) = chained else {
            return self.upstream.fetch_following(method, uri, headers).await;
        };
        for endpoint in &chain.mirrors {
            if let Some(resp) = self
                .try_endpoint(registry, endpoint, &method, &target, headers)
                .await
            {
                return Ok(resp);
            }
        }
        // With fallbacks to go to, a registry that could not be reached is not waited for
        // again (a connect timeout per request) until SKIP_UNREACHABLE has passed.
        let own_label: Arc<str> = registry.to_string().into();
        let skip = !chain.fallbacks.is_empty();
        let own = if skip && self.is_down(&own_label) {
            Err(UpstreamError::RecentlyUnreachable {
                host: own_label.to_string(),
            })
        } else {
            self.upstream
                .fetch_following(method.clone(), uri, headers)
                .await
        };
        let outcome = Outcome::of(&own);
        if skip && outcome == Outcome::Unreachable {
            self.mark_down(&own_label);
        }
        self.metrics.count(registry, &own_label, outcome);
        if !outcome.falls_back() {
            return own;
        }
        for endpoint in &chain.fallbacks {
            if let Some(resp) = self
                .try_endpoint(registry, endpoint, &method, &target, headers)
                .await
            {
                return Ok(resp);
            }
        }
        own
    }

    /// One endpoint's answer, if it is a success.
    async fn try_endpoint(
        &self,
        registry: &RegistryAuthority,
        endpoint: &Endpoint,
        method: &Method,
        target: &Target,
        headers: &HeaderMap,
    ) -> Option<Response<Incoming>> {
        if self.is_down(&endpoint.label) {
            self.metrics
                .count(registry, &endpoint.label, Outcome::Skipped);
            return None;
        }
        let name = endpoint.repository(&target.repo);
        let uri = endpoint.uri(&name, &target.tail)?;
        let mut headers = headers.clone();
        headers.remove(header::AUTHORIZATION);
        if let Some(auth) = self.authorization(endpoint, &name, &uri).await {
            headers.insert(header::AUTHORIZATION, auth);
        }
        let result = self
            .upstream
            .fetch_following(method.clone(), uri.clone(), &headers)
            .await;
        let outcome = Outcome::of(&result);
        self.metrics.count(registry, &endpoint.label, outcome);
        match result {
            Ok(mut resp) if outcome == Outcome::Served => {
                debug!(%registry, endpoint = %endpoint.label, %uri, "served by a chain endpoint");
                resp.extensions_mut()
                    .insert(ServedByEndpoint(Arc::clone(&endpoint.label)));
                Some(resp)
            }
            Ok(resp) => {
                debug!(%registry, endpoint = %endpoint.label, %uri, status = %resp.status(), "chain endpoint did not serve");
                None
            }
            Err(e) => {
                debug!(%registry, endpoint = %endpoint.label, %uri, error = %e, "chain endpoint failed");
                if outcome == Outcome::Unreachable {
                    self.mark_down(&endpoint.label);
                }
                None
            }
        }
    }

    /// The node's credentials for the endpoint's host, else an anonymous pull token where
    /// the endpoint asks for one; never the client's own.
    async fn authorization(
        &self,
        endpoint: &Endpoint,
        name: &str,
        uri: &Uri,
    ) -> Option<HeaderValue> {
        let authority = endpoint.authority();
        let lookup = async {
            if let Some(creds) = &self.node_credentials {
                if let Some(auth) = creds
                    .authorization(&self.tokens, &authority, name, uri)
                    .await
                {
                    return Some(auth);
                }
            }
            self.tokens
                .authorization(uri, name, None)
                .await
                .ok()
                .flatten()
        };
        tokio::time::timeout(AUTH_TIMEOUT, lookup)
            .await
            .ok()
            .flatten()
    }

    fn is_down(&self, label: &Arc<str>) -> bool {
        let mut down = self.down.lock().unwrap();
        match down.get(label) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                down.remove(label);
                false
            }
            None => false,
        }
    }

    fn mark_down(&self, label: &Arc<str>) {
        self.down
            .lock()
            .unwrap()
            .insert(Arc::clone(label), Instant::now() + SKIP_UNREACHABLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(v: &str) -> ChainFlag {
        ChainFlag::parse(v).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    /// Where `endpoint` asks for the `v1` manifest of the registry's `app`.
    fn app_manifest_uri(endpoint: &Endpoint) -> String {
        endpoint
            .uri(&endpoint.repository("app"), "manifests/v1")
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_home_lab_example_rewrites_names() {
        let f = flag("anubis:32000=ghcr.io/acme,docker.io");
        assert_eq!(
            f.registry,
            RegistryAuthority {
                host: "anubis".into(),
                port: Some(32000)
            }
        );
        let [ghcr, hub] = &f.endpoints[..] else {
            panic!("two endpoints: {f:?}")
        };
        assert_eq!(ghcr.repository("app"), "acme/app");
        assert_eq!(
            app_manifest_uri(ghcr),
            "https://ghcr.io/v2/acme/app/manifests/v1"
        );
        // Docker Hub: its API host, and library/ for single-component names only.
        assert_eq!(&*hub.label, "https://registry-1.docker.io");
        assert_eq!(hub.repository("app"), "library/app");
        assert_eq!(hub.repository("team/app"), "team/app");
        assert_eq!(
            app_manifest_uri(hub),
            "https://registry-1.docker.io/v2/library/app/manifests/v1"
        );
    }

    #[test]
    fn endpoints_with_schemes_ports_and_prefixes() {
        let f = flag(
            "10.0.0.1:5000=http://10.0.0.2:5000/mirror/,https://[fd00::1]:8443,quay.io:443/x/y",
        );
        let labels: Vec<&str> = f.endpoints.iter().map(|e| &*e.label).collect();
        assert_eq!(
            labels,
            [
                "http://10.0.0.2:5000/mirror",
                "https://[fd00::1]:8443",
                "https://quay.io:443/x/y"
            ]
        );
        assert_eq!(f.endpoints[0].authority(), "10.0.0.2:5000");
        assert_eq!(f.endpoints[1].authority(), "[fd00::1]:8443");
        assert_eq!(f.endpoints[2].authority(), "quay.io");
        assert_eq!(f.endpoints[2].repository("app"), "x/y/app");
        // Prefixed endpoints of Docker Hub make multi-component names: no library/.
        let f = flag("r.test=docker.io/acme");
        assert_eq!(f.endpoints[0].repository("app"), "acme/app");
        assert_eq!(f.registry.registry_value(), "r.test");
        assert_eq!(
            flag("[fd00::9]:5000=a.test").registry.registry_value(),
            "[fd00::9]:5000"
        );
        assert_eq!(
            flag("10.1.1.1:80=a.test").registry.registry_value(),
            "10.1.1.1:80"
        );
        assert_eq!(
            flag("docker.io=mirror.test").registry.host,
            "registry-1.docker.io"
        );
    }

    #[test]
    fn bad_flags_say_what_is_wrong_in_one_line() {
        let cases = [
            ("anubis:32000", "expected REGISTRY=ENDPOINT"),
            ("anubis=", "expected REGISTRY=ENDPOINT"),
            ("anubis=a.test,,b.test", "expected REGISTRY=ENDPOINT"),
            ("=ghcr.io", "registry \"\" is not HOST[:PORT]"),
            ("an ubis=ghcr.io", "is not HOST[:PORT]"),
            ("anubis:99999=ghcr.io", "is not HOST[:PORT]"),
            ("anubis/x=ghcr.io", "is not HOST[:PORT]"),
            ("anubis=ftp://ghcr.io", "endpoint \"ftp://ghcr.io\" is not"),
            ("anubis=user@ghcr.io", "is not [http://|https://]HOST"),
            (
                "anubis=ghcr.io/Acme",
                "prefix \"Acme\" is not a repository path",
            ),
            ("anubis=ghcr.io:0", "is not [http://|https://]HOST"),
            (
                "anubis=ghcr.io/a/../b",
                "prefix \"a/../b\" is not a repository path",
            ),
            ("anubis:32000=http://anubis:32000", "is the registry itself"),
        ];
        for (value, expected) in cases {
            let e = ChainFlag::parse(value).expect_err(value).to_string();
            assert!(e.contains(expected), "{value}: {e}");
            assert!(!e.contains('\n'), "{value}: {e}");
        }
    }

    #[test]
    fn chains_merge_in_order_and_match_requests() {
        let config = ChainConfig::new(
            &[
                flag("anubis:32000=http://m1.test:5000"),
                flag("anubis:32000=m2.test,http://m1.test:5000"),
            ],
            &[
                flag("anubis:32000=ghcr.io/acme,docker.io"),
                flag("ghcr.io=quay.io"),
            ],
        );
        let uri: Uri = "http://anubis:32000/v2/app/manifests/v1".parse().unwrap();
        let (registry, chain) = config.chain_for(&uri).unwrap();
        assert_eq!(registry.to_string(), "anubis:32000");
        let labels = |v: &[Endpoint]| v.iter().map(|e| e.label.to_string()).collect::<Vec<_>>();
        assert_eq!(
            labels(&chain.mirrors),
            ["http://m1.test:5000", "https://m2.test"]
        );
        assert_eq!(
            labels(&chain.fallbacks),
            ["https://ghcr.io/acme", "https://registry-1.docker.io"]
        );
        // TLS to the same host and port is the same registry; other ports are not.
        assert!(config
            .chain_for(&"https://anubis:32000/v2/a/blobs/sha256:1".parse().unwrap())
            .is_some());
        assert!(config
            .chain_for(&"https://anubis/v2/a/manifests/v1".parse().unwrap())
            .is_none());
        // A registry without a port is the one on the scheme's default port.
        assert!(config
            .chain_for(&"https://ghcr.io/v2/a/manifests/v1".parse().unwrap())
            .is_some());
        assert!(config
            .chain_for(&"https://ghcr.io:8443/v2/a/manifests/v1".parse().unwrap())
            .is_none());
        assert_eq!(config.registry_values(), ["anubis", "ghcr.io"]);
        assert_eq!(config.ports(), [32000]);
    }

    #[test]
    fn targets_keep_the_reference_and_query() {
        let t = Target::of(&"https://r.test/v2/a/b/manifests/v1?x=1".parse().unwrap()).unwrap();
        assert_eq!(
            (t.repo.as_str(), t.tail.as_str()),
            ("a/b", "manifests/v1?x=1")
        );
        let t = Target::of(&"https://r.test/v2/a/blobs/sha256:ab".parse().unwrap()).unwrap();
        assert_eq!((t.repo.as_str(), t.tail.as_str()), ("a", "blobs/sha256:ab"));
        assert!(Target::of(&"https://r.test/v2/".parse().unwrap()).is_none());
    }

    #[test]
    fn only_not_found_server_errors_and_outages_fall_back() {
        let falls = |s: u16| Outcome::of_status(StatusCode::from_u16(s).unwrap()).falls_back();
        assert!(falls(404) && falls(500) && falls(503));
        assert!(!falls(200) && !falls(206) && !falls(401) && !falls(403) && !falls(416));
        assert!(Outcome::Unreachable.falls_back() && Outcome::Skipped.falls_back());
        let skipped = Err(UpstreamError::RecentlyUnreachable { host: "r".into() });
        assert_eq!(Outcome::of(&skipped), Outcome::Skipped);
    }
}
