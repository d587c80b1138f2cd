//! The proxy listener: accept redirected connections, recover their original destination
//! and hand them to a route. For now the only route is the transparent passthrough, which
//! splices bytes to the original destination untouched.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::{
    bpf::Bpf,
    metrics::{route, DirectionLabels, ProxyMetrics},
    upstream,
};

/// Splice buffer per direction. Larger than tokio's 8 KiB default: fewer syscalls for
/// layer-sized transfers.
const SPLICE_BUFFER: usize = 64 * 1024;

/// What every connection handler needs.
pub struct Proxy {
    pub bpf: Arc<Bpf>,
    pub metrics: ProxyMetrics,
    pub socket_mark: u32,
    next_id: AtomicU64,
}

impl Proxy {
    pub fn new(bpf: Arc<Bpf>, metrics: ProxyMetrics, socket_mark: u32) -> Self {
        Proxy {
            bpf,
            metrics,
            socket_mark,
            next_id: AtomicU64::new(1),
        }
    }

    /// Accept on `listener` until `shutdown` flips, then take what is already queued (those
    /// clients were redirected before the hooks were detached and expect an answer).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        tasks: TaskTracker,
    ) {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.spawn(stream, peer, &tasks),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        while let Ok(Ok((stream, peer))) =
            tokio::time::timeout(Duration::from_millis(20), listener.accept()).await
        {
            self.spawn(stream, peer, &tasks);
        }
    }

    fn spawn(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, tasks: &TaskTracker) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, client = %peer);
        tasks.spawn(Arc::clone(self).handle(stream, peer).instrument(span));
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let Ok(local) = client.local_addr() else {
            return;
        };
        let Some(orig) = self.bpf.take_orig_dst(peer, local) else {
            // Someone dialled the proxy port directly: there is nowhere to send it.
            self.metrics.connection(route::NO_ORIG_DST);
            debug!("no original destination recorded; closing");
            return;
        };
        self.metrics.connection(route::PASSTHROUGH);
        self.metrics.active.inc();
        if let Err(e) = self.passthrough(client, orig).await {
            debug!(dst = %orig, error = %e, "passthrough ended with an error");
        }
        self.metrics.active.dec();
    }

    async fn passthrough(&self, mut client: TcpStream, orig: SocketAddr) -> std::io::Result<()> {
        let _ = client.set_nodelay(true);
        let mut upstream = match upstream::connect(orig, self.socket_mark).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.upstream_connect_errors.inc();
                // Reset rather than close, so the client sees a failed connection as it
                // would have dialling direct, not an empty response.
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return Err(std::io::Error::other(e));
            }
        };
        debug!(dst = %orig, "passthrough");
        let (up, down) = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            SPLICE_BUFFER,
            SPLICE_BUFFER,
        )
        .await?;
        let bytes = &self.metrics.bytes;
        bytes
            .get_or_create(&DirectionLabels { direction: "upload" })
            .inc_by(up);
        bytes
            .get_or_create(&DirectionLabels {
                direction: "download",
            })
            .inc_by(down);
        Ok(())
    }
}
