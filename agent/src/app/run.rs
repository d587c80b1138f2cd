//! `eddy run`: wire the pieces together, and take them apart again on SIGTERM.
//!
//! Setup order matters for fail-open: everything that can fail for a bad configuration
//! (listeners, privileges, loading) happens before the programs are attached, so a failed
//! start leaves nothing attached. Shutdown reverses it: stop redirecting first, then detach,
//! then drain the connections already redirected to us.
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch, task::JoinHandle};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::{
    app::config::Config,
    hook::bpf::Bpf,
    hook::metrics::BpfCounters,
    listener::metrics::ProxyMetrics,
    listener::proxy::{Proxy, ProxyParts},
    listener::registries::Registries,
    node::sys,
    ops::admin::{self, AdminState},
    peers::p2p::{P2p, P2pMetrics},
    peers::share::NodeShare,
    peers::{PeerNetwork, Peers},
    registry::metrics::RegistryMetrics,
    registry::Handler as RegistryHandler,
    sources::containerd::ContainerdSource,
    sources::order::Sources,
    store::catalog::Catalog,
    store::lifecycle::Lifecycle,
    store::metrics::StoreGauges,
    store::Store,
    tls::{Ca, TlsError},
    trust::metrics::TrustMetrics,
    trust::{Host, TrustGate},
    upstream::client::Upstream,
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] crate::store::datadir_lock::LockError),
    #[error(transparent)]
    Bpf(#[from] crate::hook::bpf::BpfError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Catalog(#[from] crate::store::catalog::CatalogError),
    #[error(transparent)]
    Credentials(#[from] crate::upstream::credentials::CredentialsError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    P2p(#[from] crate::peers::p2p::P2pError),
}

pub async fn run(config: Config) -> Result<(), AppError> {
    sys::raise_nofile_limit();
    let _data_dir_lock = claim_node(&config)?;
    let listeners = Listeners::bind(&config).await?;
    log_start(&config);
    let ca = Arc::new(load_ca(
        &config.ca_dir,
        &config.registries,
        config.ca_unconstrained,
    )?);
    let upstream_tls = crate::tls::upstream_client_config(&config.upstream_ca)?;
    let node_credentials = config
        .upstream_auth_file
        .as_deref()
        .map(crate::upstream::credentials::NodeCredentials::load)
        .transpose()?;
    let (store, catalog) = open_store(&config)?;
    let mut signals = Signals::install()?;

    let mut registry = MetricsRegistry::default();
    let registry_metrics = RegistryMetrics::register(&mut registry);
    let oci = RegistryHandler::new(
        Upstream::new(upstream_tls, config.socket_mark),
        Arc::clone(&store),
        Arc::clone(&catalog),
        registry_metrics,
        node_credentials,
    );
    let containerd = containerd_source(&config, &mut registry);
    let (p2p, p2p_metrics) = start_p2p(&config, &oci, &store, &catalog, &containerd).await?;
    let oci = Arc::new(with_sources(oci, &config, &containerd, &p2p, &mut registry));

    let bpf = load_and_attach(&config, listeners.v6.is_some())?;

    let parts = Parts {
        ca,
        oci,
        store,
        catalog,
        containerd,
        p2p,
        p2p_metrics,
        registry,
        bpf,
    };
    let running = serve(&config, observe(&config, parts), listeners);
    signals.wait().await;
    running.drain(config.drain_timeout).await;
    info!("stopped");
    Ok(())
}

/// Before anything touches the node (listeners, CA, store): a run that cannot attach must
/// leave nothing behind. Returns the data dir's lock, held for the whole run.
fn claim_node(config: &Config) -> Result<crate::store::datadir_lock::DataDirLock, AppError> {
    if !sys::has_bpf_privileges() {
        return Err(crate::hook::bpf::BpfError::NotPrivileged.into());
    }
    // Before anything else is written to the data dir (or attached): a second agent on the
    // same store stops here with one line naming the first.
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AppError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    Ok(crate::store::datadir_lock::acquire(&config.data_dir)?)
}

/// The sockets eddy accepts on: redirected IPv4 (and IPv6, if it can bind) connections, and
/// the admin endpoint.
struct Listeners {
    v4: TcpListener,
    v6: Option<TcpListener>,
    admin: TcpListener,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Self, AppError> {
        let v4 = bind("--listen", config.listen.into()).await?;
        let v6 = match bind("IPv6 listener", config.listen6).await {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(addr = %config.listen6, error = %e, "no IPv6 listener: native IPv6 destinations go direct");
                None
            }
        };
        let admin = bind("--admin", config.admin).await?;
        Ok(Listeners { v4, v6, admin })
    }
}

fn log_start(config: &Config) {
    info!(
        cgroup = %config.cgroup.path.display(),
        listen = %config.listen,
        ports = ?config.intercept_ports,
        registries = ?config.registries.hosts,
        registry_addrs = ?config.registries.addrs,
        admin = %config.admin,
        data_dir = %config.data_dir.display(),
        pin_dir = %config.pin_dir.display(),
        heartbeat_timeout_ms = config.heartbeat_timeout.as_millis() as u64,
        "starting eddy"
    );
    if !config.chains.is_empty() {
        info!(chains = ?config.chains.describe(), "registry chains");
    }
}

/// Open the store, start re-hashing what an earlier run left (in the background: open only
/// checks sizes), and open the catalog.
fn open_store(config: &Config) -> Result<(Arc<Store>, Arc<Catalog>), AppError> {
    let store = Arc::new(Store::open(&config.data_dir)?);
    tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let evicted = store.scrub().await;
            if evicted > 0 {
                warn!(
                    evicted,
                    "store scrub evicted blobs that did not match their digest"
                );
            }
        }
    });
    let catalog = Arc::new(Catalog::open(&config.data_dir)?);
    Ok((store, catalog))
}

/// SIGTERM and SIGINT, installed before anything is attached.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, AppError> {
        let term =
            tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signals)?;
        let int =
            tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
        Ok(Signals { term, int })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM: shutting down"),
            _ = self.int.recv() => info!("SIGINT: shutting down"),
        }
    }
}

/// containerd's content store as a source (None with --containerd-socket none). It is off
/// until containerd answers, which it learns in the background: start never waits for it.
fn containerd_source(
    config: &Config,
    registry: &mut MetricsRegistry,
) -> Option<Arc<ContainerdSource>> {
    config.containerd.as_ref().map(|c| {
        info!(socket = %c.socket.display(), namespaces = ?c.namespaces, "containerd source: connecting");
        ContainerdSource::new(c.socket.clone(), c.namespaces.clone(), registry)
    })
}

/// Start p2p if configured: before attaching, so a taken --p2p-listen port fails the start
/// with nothing attached. Content containerd learns is then advertised to peers at once.
async fn start_p2p(
    config: &Config,
    oci: &RegistryHandler,
    store: &Arc<Store>,
    catalog: &Arc<Catalog>,
    containerd: &Option<Arc<ContainerdSource>>,
) -> Result<(Option<P2p>, P2pMetrics), AppError> {
    let p2p_metrics = P2pMetrics::default();
    let share = Arc::new(NodeShare {
        store: Arc::clone(store),
        catalog: Arc::clone(catalog),
        visibility: oci.visibility(),
        containerd: containerd.clone(),
    });
    let p2p: Option<P2p> = match &config.p2p {
        Some(p2p_config) => Some(P2p::start(p2p_config.clone(), share, p2p_metrics.clone()).await?),
        None => None,
    };
    if let (Some(p2p), Some(source)) = (&p2p, containerd) {
        let (p2p, source) = (p2p.clone(), Arc::clone(source));
        tokio::spawn(async move {
            loop {
                source.changed().await;
                p2p.reconcile_soon();
            }
        });
    }
    Ok((p2p, p2p_metrics))
}

/// The registry handler with its sources (containerd, then peers), idle timeout and chains.
fn with_sources(
    oci: RegistryHandler,
    config: &Config,
    containerd: &Option<Arc<ContainerdSource>>,
    p2p: &Option<P2p>,
    registry: &mut MetricsRegistry,
) -> RegistryHandler {
    let peers = p2p.clone().map(|p2p| {
        Arc::new(Peers::with_single_flight(
            Arc::new(p2p) as Arc<dyn PeerNetwork>,
            config.single_flight,
        )) as Arc<dyn crate::sources::source::PeerSource>
    });
    let containerd = containerd
        .clone()
        .map(|c| c as Arc<dyn crate::sources::source::ContentSource>);
    let sources = Sources::new(containerd, peers);
    oci.with_sources(sources)
        .with_upstream_idle(config.upstream_idle_timeout)
        .with_chains(
            config.chains.clone(),
            crate::upstream::chain::ChainMetrics::register(registry),
        )
}

/// Load the eBPF programs and attach them: the last step that can fail. A failed attach
/// detaches and unpins what it attached, so the start leaves nothing behind.
fn load_and_attach(config: &Config, ipv6: bool) -> Result<Arc<Bpf>, AppError> {
    let mut bpf = Bpf::load(&config.hook(), ipv6)?;
    if let Some(log) = bpf.take_decision_log() {
        crate::hook::decision_log::spawn(log);
        info!("eBPF decision logs on (target eddy::bpf, debug)");
    }
    if let Err(e) = bpf.attach(&config.cgroup.path) {
        bpf.detach();
        bpf.unpin();
        return Err(e.into());
    }
    info!(cgroup = %config.cgroup.path.display(), "attached connect4, connect6 and sock_ops");
    Ok(Arc::new(bpf))
}

/// What the steps before serving built.
struct Parts {
    ca: Arc<Ca>,
    oci: Arc<RegistryHandler>,
    store: Arc<Store>,
    catalog: Arc<Catalog>,
    containerd: Option<Arc<ContainerdSource>>,
    p2p: Option<P2p>,
    p2p_metrics: P2pMetrics,
    registry: MetricsRegistry,
    bpf: Arc<Bpf>,
}

/// What serving runs, taken apart again by [`Running::drain`].
struct Running {
    admin_state: Arc<AdminState>,
    heartbeat: JoinHandle<()>,
    bpf: Arc<Bpf>,
    stop_tx: watch::Sender<bool>,
    acceptors: Vec<JoinHandle<()>>,
    connections: TaskTracker,
    admin_stop_tx: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
}

/// What serving starts from: the parts the proxy needs, and what the admin endpoint shows.
struct Observed {
    ca: Arc<Ca>,
    oci: Arc<RegistryHandler>,
    bpf: Arc<Bpf>,
    containerd: Option<Arc<ContainerdSource>>,
    metrics: ProxyMetrics,
    lifecycle: Arc<Lifecycle>,
    trust: Arc<TrustGate>,
    admin_state: Arc<AdminState>,
}

/// Register the remaining metrics, and gather them with the cache lifecycle and the trust
/// gate into the admin endpoint's state (not ready yet).
fn observe(config: &Config, mut parts: Parts) -> Observed {
    let registry = &mut parts.registry;
    let metrics = ProxyMetrics::register(registry);
    if parts.p2p.is_some() {
        parts.p2p_metrics.register_into(registry);
    }
    registry.register_collector(Box::new(BpfCounters(Arc::clone(&parts.bpf))));
    let lifecycle = Arc::new(
        Lifecycle::new(Arc::clone(&parts.store), config.cache_policy)
            .with_catalog(Arc::clone(&parts.catalog)),
    );
    registry.register_collector(Box::new(StoreGauges(Arc::clone(&lifecycle))));
    let trust = Arc::new(TrustGate::new(
        parts.ca.cert_der(),
        Host::real(),
        TrustMetrics::register(registry),
    ));
    let admin_state = Arc::new(AdminState {
        registry: parts.registry,
        ready: false.into(),
        trust: Some(Arc::clone(&trust)),
        lifecycle: Arc::clone(&lifecycle),
        p2p: parts.p2p,
        containerd: parts.containerd.clone(),
    });
    Observed {
        ca: parts.ca,
        oci: parts.oci,
        bpf: parts.bpf,
        containerd: parts.containerd,
        metrics,
        lifecycle,
        trust,
        admin_state,
    }
}

/// Start the background tasks and the admin endpoint, then accept redirected connections
/// and report ready.
fn serve(config: &Config, observed: Observed, listeners: Listeners) -> Running {
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(source) = &observed.containerd {
        tokio::spawn(Arc::clone(source).follow(stop_rx.clone()));
    }
    tokio::spawn(observed.lifecycle.run(stop_rx.clone()));
    let heartbeat = tokio::spawn(heartbeat(
        Arc::clone(&observed.bpf),
        config.heartbeat_interval(),
        stop_rx.clone(),
    ));
    // The admin server outlives the drain, so /readyz answers 503 (not connection refused)
    // while connections finish.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(
        listeners.admin,
        Arc::clone(&observed.admin_state),
        admin_stop_rx,
    ));

    let proxy = Arc::new(Proxy::new(ProxyParts {
        bpf: Arc::clone(&observed.bpf),
        metrics: observed.metrics,
        socket_mark: config.socket_mark,
        registries: config.registries.clone(),
        ca: observed.ca,
        registry: observed.oci,
        trust: observed.trust,
        shutdown: stop_rx.clone(),
    }));
    let connections = TaskTracker::new();
    let mut acceptors = vec![tokio::spawn(Arc::clone(&proxy).serve(
        listeners.v4,
        stop_rx.clone(),
        connections.clone(),
    ))];
    if let Some(l6) = listeners.v6 {
        acceptors.push(tokio::spawn(Arc::clone(&proxy).serve(
            l6,
            stop_rx.clone(),
            connections.clone(),
        )));
    }
    observed.admin_state.ready.store(true, Ordering::Relaxed);
    info!("ready");
    Running {
        admin_state: observed.admin_state,
        heartbeat,
        bpf: observed.bpf,
        stop_tx,
        acceptors,
        connections,
        admin_stop_tx,
        admin_task,
    }
}

impl Running {
    /// Stop redirecting first, then detach, then drain the connections already redirected to
    /// us (for at most `drain_timeout`), and only then unpin and stop the admin endpoint.
    async fn drain(self, drain_timeout: Duration) {
        self.admin_state.ready.store(false, Ordering::Relaxed);
        self.heartbeat.abort();
        self.bpf.stop_redirects();
        self.bpf.detach();
        info!("detached; draining connections");
        let _ = self.stop_tx.send(true);
        for a in self.acceptors {
            let _ = a.await;
        }
        self.connections.close();
        if tokio::time::timeout(drain_timeout, self.connections.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.connections.len(),
                "drain timeout; closing remaining connections"
            );
        }
        self.bpf.unpin();
        let _ = self.admin_stop_tx.send(true);
        let _ = self.admin_task.await;
    }
}

/// The node's CA (in `ca_dir`, see `TrustArgs::ca_dir`), constrained to the configured
/// registries unless told otherwise.
pub fn load_ca(
    ca_dir: &std::path::Path,
    registries: &Registries,
    unconstrained: bool,
) -> Result<Ca, TlsError> {
    let names = registries.names();
    Ca::load_or_create_in(ca_dir, (!unconstrained).then_some(names.as_slice()))
}

/// Bind with a deep accept queue: pulls start many connections at once, and an overflow
/// costs the client a 1 s SYN retransmit.
async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    let err = |source| AppError::Bind { what, addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

const LISTEN_BACKLOG: u32 = 4096;

/// Refresh the heartbeat until shutdown. A missed beat is harmless: the timeout spans
/// several intervals.
async fn heartbeat(bpf: Arc<Bpf>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => bpf.beat(),
            _ = stop.changed() => return,
        }
    }
}
