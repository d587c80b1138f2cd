//! Admin HTTP on localhost: /metrics (Prometheus text), /healthz, /readyz, /trust (the
//! clients that do not trust eddy's CA, as JSON, for `eddy status`), /peers (this node's P2P
//! identity and connected peers, JSON), and the store:
//! `GET /store` (size, entries, oldest access, proxy-only) and `POST /gc[?dry_run=1]` (JSON).
//! `GET /containerd` (the containerd source: socket, namespaces, connected, digest count, as
//! JSON) and `GET /containerd/digests` (the content digests it knows, one a line).
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};
use tracing::debug;

pub struct AdminState {
    pub registry: Registry,
    /// Attached and listening; false before setup completes and while draining.
    pub ready: AtomicBool,
    /// The trust gate whose untrusting clients `/trust` lists.
    pub trust: Option<Arc<crate::trust::TrustGate>>,
    pub lifecycle: Arc<crate::store::lifecycle::Lifecycle>,
    /// The P2P swarm whose peers `/peers` lists; None when P2P is off.
    pub p2p: Option<crate::peers::p2p::P2p>,
    /// containerd's content store as a source, for `/containerd`; None when turned off.
    pub containerd: Option<Arc<crate::sources::containerd::ContainerdSource>>,
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, &req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let json =
        |value: serde_json::Value| (StatusCode::OK, "application/json", format!("{value}\n"));
    let (status, content_type, body) = match req.uri().path() {
        "/store" if req.method() == Method::GET => {
            json(crate::store::lifecycle::store_status(&state.lifecycle))
        }
        "/gc" if req.method() == Method::POST => {
            let dry_run = req.uri().query().is_some_and(|q| {
                q.split('&')
                    .any(|kv| kv == "dry_run=1" || kv == "dry_run=true")
            });
            // Removing files blocks: off the runtime's threads, as the lifecycle loop does.
            let lifecycle = Arc::clone(&state.lifecycle);
            match tokio::task::spawn_blocking(move || lifecycle.collect(dry_run)).await {
                Ok(report) => json(serde_json::to_value(report).expect("GcReport serializes")),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("gc failed: {e}\n"),
                ),
            }
        }
        "/store" | "/gc" => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /store, POST /gc\n".to_string(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::ops::metrics::encode(&state.registry),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/containerd" | "/containerd/digests" if state.containerd.is_none() => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "containerd source off (--containerd-socket none)\n".to_string(),
        ),
        "/containerd" => json(
            serde_json::to_value(state.containerd.as_ref().map(|c| c.status()))
                .expect("ContainerdStatus serializes"),
        ),
        "/containerd/digests" => {
            let digests = state
                .containerd
                .as_ref()
                .map(|c| c.digests())
                .unwrap_or_default();
            let body: String = digests.iter().map(|d| format!("{d}\n")).collect();
            (StatusCode::OK, "text/plain", body)
        }
        "/trust" => match &state.trust {
            Some(gate) => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&gate.report()).unwrap_or_default(),
            ),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "no trust gate\n".to_string(),
            ),
        },
        "/peers" => match &state.p2p {
            Some(p2p) => json(serde_json::to_value(p2p.report()).expect("PeersReport serializes")),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "p2p is off (no --p2p-listen)\n".to_string(),
            ),
        },
        "/readyz" if state.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
