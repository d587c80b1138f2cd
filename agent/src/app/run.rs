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
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::{
    app::config::Config,
    hook::bpf::Bpf,
    hook::metrics::BpfCounters,
    listener::metrics::ProxyMetrics,
    listener::proxy::Proxy,
    listener::registries::Registries,
    node::sys,
    ops::admin::{self, AdminState},
    peers::share::NodeShare,
    peers::{PeerNetwork, Peers},
    registry::metrics::RegistryMetrics,
    registry::Handler as RegistryHandler,
    sources::containerd::ContainerdSource,
    sources::order::Sources,
    store::catalog::Catalog,
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

    // Before anything touches the node (listeners, CA, store): a run that cannot attach must
    // leave nothing behind.
    if !sys::has_bpf_privileges() {
        return Err(crate::hook::bpf::BpfError::NotPrivileged.into());
    }
    // Before anything else is written to the data dir (or attached): a second agent on the
    // same store stops here with one line naming the first.
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AppError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let _data_dir_lock = crate::store::datadir_lock::acquire(&config.data_dir)?;
    let listener = bind("--listen", config.listen.into()).await?;
    let listener6 = match bind("IPv6 listener", config.listen6).await {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(addr = %config.listen6, error = %e, "no IPv6 listener: native IPv6 destinations go direct");
            None
        }
    };
    let admin_listener = bind("--admin", config.admin).await?;
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
    let store = Arc::new(Store::open(&config.data_dir)?);
    // Re-hash what an earlier run left, in the background: open only checks sizes.
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
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signals)?;

    let mut registry = MetricsRegistry::default();
    let registry_metrics = RegistryMetrics::register(&mut registry);
    let oci = RegistryHandler::new(
        Upstream::new(upstream_tls, config.socket_mark),
        Arc::clone(&store),
        Arc::clone(&catalog),
        registry_metrics,
        node_credentials,
    );

    // containerd's content store as a source (None with --containerd-socket none). It is off
    // until containerd answers, which it learns in the background: start never waits for it.
    let containerd_source: Option<Arc<ContainerdSource>> = config.containerd.as_ref().map(|c| {
        info!(socket = %c.socket.display(), namespaces = ?c.namespaces, "containerd source: connecting");
        ContainerdSource::new(c.socket.clone(), c.namespaces.clone(), &mut registry)
    });
    // Before attaching: a taken --p2p-listen port fails the start with nothing attached.
    let p2p_metrics = crate::peers::p2p::P2pMetrics::default();
    let share = Arc::new(NodeShare {
        store: Arc::clone(&store),
        catalog: Arc::clone(&catalog),
        visibility: oci.visibility(),
        containerd: containerd_source.clone(),
    });
    let p2p: Option<crate::peers::p2p::P2p> = match &config.p2p {
        Some(p2p_config) => Some(
            crate::peers::p2p::P2p::start(p2p_config.clone(), share, p2p_metrics.clone()).await?,
        ),
        None => None,
    };
    if let (Some(p2p), Some(source)) = (&p2p, &containerd_source) {
        // Content containerd learned is advertised to peers at once.
        let (p2p, source) = (p2p.clone(), Arc::clone(source));
        tokio::spawn(async move {
            loop {
                source.changed().await;
                p2p.reconcile_soon();
            }
        });
    }
    let peers = p2p.clone().map(|p2p| {
        Arc::new(Peers::with_single_flight(
            Arc::new(p2p) as Arc<dyn PeerNetwork>,
            config.single_flight,
        )) as Arc<dyn crate::sources::source::PeerSource>
    });
    let sources = Sources::new(
        containerd_source
            .clone()
            .map(|c| c as Arc<dyn crate::sources::source::ContentSource>),
        peers,
    );
    let oci = Arc::new(
        oci.with_sources(sources)
            .with_upstream_idle(config.upstream_idle_timeout)
            .with_chains(
                config.chains.clone(),
                crate::upstream::chain::ChainMetrics::register(&mut registry),
            ),
    );

    let mut bpf = Bpf::load(&config.hook(), listener6.is_some())?;
    if let Some(log) = bpf.take_decision_log() {
        crate::hook::decision_log::spawn(log);
        info!("eBPF decision logs on (target eddy::bpf, debug)");
    }
    if let Err(e) = bpf.attach(&config.cgroup.path) {
        bpf.detach();
        bpf.unpin();
        return Err(e.into());
    }
    let bpf = Arc::new(bpf);
    info!(cgroup = %config.cgroup.path.display(), "attached connect4, connect6 and sock_ops");

    let metrics = ProxyMetrics::register(&mut registry);
    if p2p.is_some() {
        p2p_metrics.register_into(&mut registry);
    }
    registry.register_collector(Box::new(BpfCounters(Arc::clone(&bpf))));
    let lifecycle = Arc::new(
        crate::store::lifecycle::Lifecycle::new(Arc::clone(&store), config.cache_policy)
            .with_catalog(Arc::clone(&catalog)),
    );
    registry.register_collector(Box::new(StoreGauges(Arc::clone(&lifecycle))));
    let trust = Arc::new(TrustGate::new(
        ca.cert_der(),
        Host::real(),
        TrustMetrics::register(&mut registry),
    ));
    let admin_state = Arc::new(AdminState {
        registry,
        ready: false.into(),
        trust: Some(Arc::clone(&trust)),
        lifecycle: Arc::clone(&lifecycle),
        p2p: p2p.clone(),
        containerd: containerd_source.clone(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(source) = &containerd_source {
        tokio::spawn(Arc::clone(source).follow(stop_rx.clone()));
    }
    tokio::spawn(lifecycle.run(stop_rx.clone()));
    let heartbeat = tokio::spawn(heartbeat(
        Arc::clone(&bpf),
        config.heartbeat_interval(),
        stop_rx.clone(),
    ));
    // The admin server outlives the drain, so /readyz answers 503 (not connection refused)
    // while connections finish.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin_state),
        admin_stop_rx,
    ));

    let proxy = Arc::new(Proxy::new(
        Arc::clone(&bpf),
        metrics,
        config.socket_mark,
        config.registries.clone(),
        ca,
        oci,
        trust,
        stop_rx.clone(),
    ));
    let connections = TaskTracker::new();
    let mut acceptors = vec![tokio::spawn(Arc::clone(&proxy).serve(
        listener,
        stop_rx.clone(),
        connections.clone(),
    ))];
    if let Some(l6) = listener6 {
        acceptors.push(tokio::spawn(Arc::clone(&proxy).serve(
            l6,
            stop_rx.clone(),
            connections.clone(),
        )));
    }
    admin_state.ready.store(true, Ordering::Relaxed);
    info!("ready");

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }

    admin_state.ready.store(false, Ordering::Relaxed);
    heartbeat.abort();
    bpf.stop_redirects();
    bpf.detach();
    info!("detached; draining connections");
    let _ = stop_tx.send(true);
    for a in acceptors {
        let _ = a.await;
    }
    connections.close();
    if tokio::time::timeout(config.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "drain timeout; closing remaining connections"
        );
    }
    bpf.unpin();
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    info!("stopped");
    Ok(())
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
