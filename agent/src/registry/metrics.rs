//! The registry handler's metrics: requests and bytes by source, upstream latency, stale
//! manifests served, and every error answer by reason.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::sources::source::SourceKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: &'static str,
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Metrics of the registry handler.
#[derive(Clone)]
pub struct RegistryMetrics {
    requests: Family<RequestLabels, Counter>,
    bytes: Family<SourceLabels, Counter>,
    upstream_latency: Family<KindLabels, Histogram>,
    stale_manifests: Counter,
    error_responses: Family<ReasonLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

impl RegistryMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = RegistryMetrics {
            requests: Family::default(),
            bytes: Family::default(),
            upstream_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            stale_manifests: Counter::default(),
            error_responses: Family::default(),
        };
        registry.register(
            "eddy_requests",
            "Registry API requests by kind (manifest, blob, other) and where the answer came from",
            m.requests.clone(),
        );
        registry.register(
            "eddy_bytes",
            "Content bytes received from upstream, and bytes served to clients from content already cached or being fetched for another client",
            m.bytes.clone(),
        );
        registry.register(
            "eddy_upstream_latency_seconds",
            "Time to upstream response headers, by request kind",
            m.upstream_latency.clone(),
        );
        registry.register(
            "eddy_stale_manifests_served",
            "Manifests by tag served from the last known record because upstream was unreachable",
            m.stale_manifests.clone(),
        );
        registry.register(
            "eddy_error_responses",
            "Error answers eddy itself gave a client (not upstream's own), by reason; each is logged at warn with its cause",
            m.error_responses.clone(),
        );
        m
    }

    pub fn error_response(&self, reason: &'static str) {
        self.error_responses
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn request(&self, kind: &'static str, source: SourceKind) {
        let source = source.label();
        self.requests
            .get_or_create(&RequestLabels { kind, source })
            .inc();
    }

    pub fn bytes(&self, source: SourceKind, n: u64) {
        let source = source.label();
        self.bytes.get_or_create(&SourceLabels { source }).inc_by(n);
    }

    pub fn upstream_latency(&self, kind: &'static str, elapsed: std::time::Duration) {
        self.upstream_latency
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
    }

    pub fn stale_manifest(&self) {
        self.stale_manifests.inc();
    }
}
