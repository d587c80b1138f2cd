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

use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::{
    admin::{self, AdminState},
    bpf::Bpf,
    config::Config,
    metrics::{BpfCounters, ProxyMetrics},
    proxy::Proxy,
    sys,
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
    Bpf(#[from] crate::bpf::BpfError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

pub async fn run(config: Config) -> Result<(), AppError> {
    info!(
        cgroup = %config.cgroup.path.display(),
        listen = %config.listen,
        ports = ?config.intercept_ports,
        admin = %config.admin,
        data_dir = %config.data_dir.display(),
        pin_dir = %config.pin_dir.display(),
        heartbeat_timeout_ms = config.heartbeat_timeout.as_millis() as u64,
        "starting eddy"
    );
    sys::raise_nofile_limit();

    let listener = bind("--listen", config.listen.into()).await?;
    let listener6 = match TcpListener::bind(config.listen6).await {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(addr = %config.listen6, error = %e, "no IPv6 listener: native IPv6 destinations go direct");
            None
        }
    };
    let admin_listener = bind("--admin", config.admin).await?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AppError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AppError::Signals)?;

    let mut bpf = Bpf::load(&config)?;
    if let Err(e) = bpf.attach(&config.cgroup.path) {
        bpf.detach();
        bpf.unpin();
        return Err(e.into());
    }
    let bpf = Arc::new(bpf);
    info!(cgroup = %config.cgroup.path.display(), "attached connect4, connect6 and sock_ops");

    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry);
    registry.register_collector(Box::new(BpfCounters(Arc::clone(&bpf))));
    let admin_state = Arc::new(AdminState {
        registry,
        ready: false.into(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let heartbeat = tokio::spawn(heartbeat(Arc::clone(&bpf), config.heartbeat_interval(), stop_rx.clone()));
    let admin_task = tokio::spawn(admin::serve(admin_listener, Arc::clone(&admin_state), stop_rx.clone()));

    let proxy = Arc::new(Proxy::new(Arc::clone(&bpf), metrics, config.socket_mark));
    let connections = TaskTracker::new();
    let mut acceptors = vec![tokio::spawn(Arc::clone(&proxy).serve(listener, stop_rx.clone(), connections.clone()))];
    if let Some(l6) = listener6 {
        acceptors.push(tokio::spawn(Arc::clone(&proxy).serve(l6, stop_rx.clone(), connections.clone())));
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
    if tokio::time::timeout(config.drain_timeout, connections.wait()).await.is_err() {
        warn!(open = connections.len(), "drain timeout; closing remaining connections");
    }
    let _ = admin_task.await;
    bpf.unpin();
    info!("stopped");
    Ok(())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}

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
