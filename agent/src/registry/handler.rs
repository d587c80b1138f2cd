//! The handler's state: the store, the catalog, the sources, the upstream and its chains,
//! the visibility verdicts; built once by `app` and shared by every connection.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    oci::repo_key::RepoKey,
    registry::metrics::RegistryMetrics,
    sources::order::Sources,
    store::catalog::Catalog,
    store::Store,
    upstream::chain::{ChainConfig, ChainMetrics, Chains},
    upstream::client::Upstream,
    upstream::credentials::NodeCredentials,
    upstream::token::TokenClient,
    upstream::visibility::Visibility,
};

/// A fill whose upstream stops sending for this long fails (and its clients with it),
/// rather than hanging every client that shares it. `--upstream-idle-timeout` overrides it.
pub const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// The OCI pull API handler, one per agent, shared by every connection.
pub struct Handler {
    pub(super) upstream: Upstream,
    pub(super) store: Arc<Store>,
    pub(super) catalog: Arc<Catalog>,
    pub(super) metrics: RegistryMetrics,
    pub(super) visibility: Arc<Visibility>,
    /// eddy's own token requests (anonymous ones, and with node credentials).
    pub(super) tokens: Arc<TokenClient>,
    pub(super) node_credentials: Option<Arc<NodeCredentials>>,
    /// Manifest and blob fetches go through here: along a registry's `--mirror`/`--fallback`
    /// chain when it has one, else straight to the registry.
    pub(super) chains: Arc<Chains>,
    /// (repository, credentials hash) → when upstream last accepted them.
    pub(super) auth_ok: Mutex<HashMap<(RepoKey, [u8; 32]), Instant>>,
    /// containerd and peers, asked before the upstream on a miss.
    pub(super) sources: Sources,
    /// How long a fill waits for upstream's next bytes ([`UPSTREAM_IDLE`] by default).
    pub(super) upstream_idle: Duration,
}

impl Handler {
    pub fn new(
        upstream: Upstream,
        store: Arc<Store>,
        catalog: Arc<Catalog>,
        metrics: RegistryMetrics,
        node_credentials: Option<NodeCredentials>,
    ) -> Self {
        let tokens = Arc::new(TokenClient::new(upstream.clone()));
        let node_credentials = node_credentials.map(Arc::new);
        Handler {
            chains: Arc::new(Chains::new(
                ChainConfig::default(),
                upstream.clone(),
                Arc::clone(&tokens),
                node_credentials.clone(),
                ChainMetrics::default(),
            )),
            visibility: Arc::new(Visibility::new(
                upstream.clone(),
                Arc::clone(&tokens),
                Arc::clone(&catalog),
            )),
            tokens,
            node_credentials,
            upstream,
            store,
            catalog,
            metrics,
            auth_ok: Mutex::new(HashMap::new()),
            sources: Sources::default(),
            upstream_idle: UPSTREAM_IDLE,
        }
    }

    /// Ask these sources (containerd, peers) before the upstream on a miss.
    pub fn with_sources(mut self, sources: Sources) -> Self {
        self.sources = sources;
        self
    }

    /// A fill whose upstream sends nothing for `idle` fails (`--upstream-idle-timeout`).
    pub fn with_upstream_idle(mut self, idle: Duration) -> Self {
        self.upstream_idle = idle;
        self
    }

    /// Registry chains (`chain`): `--mirror` and `--fallback`.
    pub fn with_chains(mut self, config: ChainConfig, metrics: ChainMetrics) -> Self {
        self.chains = Arc::new(Chains::new(
            config,
            self.upstream.clone(),
            Arc::clone(&self.tokens),
            self.node_credentials.clone(),
            metrics,
        ));
        self
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Upstream's public/private verdicts (what this node may share with peers).
    pub fn visibility(&self) -> Arc<Visibility> {
        Arc::clone(&self.visibility)
    }
}
