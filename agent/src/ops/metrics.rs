//! Prometheus metrics (prometheus-client). Each concern registers its metrics into the
//! registry it is handed; there are no globals.
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::hook::bpf::Bpf;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

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
pub struct VerdictLabels {
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Route labels of `eddy_connections_total`.
pub mod route {
    /// Spliced to the original destination untouched.
    pub const PASSTHROUGH: &str = "passthrough";
    /// A registry connection spliced untouched because its client does not trust eddy's CA
    /// (the trust gate); served, not cached.
    pub const PASSTHROUGH_UNTRUSTED: &str = "passthrough_untrusted";
    /// Accepted, but no original destination was recorded for it (not a redirect).
    pub const NO_ORIG_DST: &str = "no_orig_dst";
    /// TLS terminated for a registry host; served by the registry handler.
    pub const REGISTRY_TLS: &str = "registry_tls";
    /// A plain-HTTP registry request; served by the registry handler.
    pub const REGISTRY_HTTP: &str = "registry_http";
}

/// Metrics of the proxy's connection handling.
#[derive(Clone, Default)]
pub struct ProxyMetrics {
    pub connections: Family<RouteLabels, Counter>,
    pub active: Gauge,
    pub upstream_connect_errors: Counter,
    pub bytes: Family<DirectionLabels, Counter>,
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "eddy_connections",
            "Connections accepted by the proxy, by route",
            m.connections.clone(),
        );
        registry.register(
            "eddy_active_connections",
            "Connections currently open through the proxy",
            m.active.clone(),
        );
        registry.register(
            "eddy_upstream_connect_errors",
            "Failed connects to an original destination",
            m.upstream_connect_errors.clone(),
        );
        registry.register(
            "eddy_passthrough_bytes",
            "Bytes spliced by passthrough connections (upload: client to upstream)",
            m.bytes.clone(),
        );
        m
    }

    pub fn connection(&self, route: &'static str) {
        self.connections.get_or_create(&RouteLabels { route }).inc();
    }
}

/// Metrics of the trust gate.
#[derive(Clone, Default)]
pub struct TrustMetrics {
    pub verdicts: Family<VerdictLabels, Counter>,
    pub rejections: Counter,
}

impl TrustMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "eddy_trust_verdicts",
            "Verdicts of the trust gate: once per client process, and per connection for clients it cannot identify",
            m.verdicts.clone(),
        );
        registry.register(
            "eddy_trust_rejections",
            "TLS handshakes in which a client rejected eddy's certificate (its executable in its cgroup is then passed through for a while)",
            m.rejections.clone(),
        );
        m
    }

    pub fn verdict(&self, verdict: &'static str) {
        self.verdicts
            .get_or_create(&VerdictLabels { verdict })
            .inc();
    }
}

/// Exports the eBPF per-CPU counters, read at scrape time.
#[derive(Debug)]
pub struct BpfCounters(pub Arc<Bpf>);

impl std::fmt::Debug for Bpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bpf")
    }
}

impl Collector for BpfCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "eddy_bpf_events",
            "Decisions of the connect hooks and sock_ops program, summed over CPUs",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (counter, value) in self.0.counters() {
            let labels = [("event", counter.name())];
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(value).encode(metric)?;
        }
        Ok(())
    }
}

pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
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

    pub fn request(&self, kind: &'static str, source: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { kind, source })
            .inc();
    }

    pub fn bytes(&self, source: &'static str, n: u64) {
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

/// Store size, its limit and in-flight fetches, read at scrape time.
pub struct StoreGauges(pub Arc<crate::store::lifecycle::Lifecycle>);

impl std::fmt::Debug for StoreGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreGauges")
    }
}

impl Collector for StoreGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let store = self.0.store();
        let stats = store.stats();
        let gauges = [
            (
                "eddy_store_entries",
                "Committed blobs and manifests in the store",
                stats.entries as i64,
            ),
            (
                "eddy_store_proxy_only",
                "1 while the disk is below the free-space floor and fills are relayed uncached",
                i64::from(stats.proxy_only),
            ),
            (
                "eddy_store_limit_bytes",
                "The store's size limit in bytes (--cache-max-size, resolved against the filesystem)",
                i64::try_from(self.0.limit_bytes()).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let hits = ConstCounter::new(stats.hits);
        let metric = encoder.encode_descriptor(
            "eddy_store_hits",
            "Lookups that found committed content in the store",
            None,
            hits.metric_type(),
        )?;
        hits.encode(metric)?;
        let mut family = encoder.encode_descriptor(
            "eddy_store_evictions",
            "Entries evicted by the lifecycle policy, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, value) in [("size", stats.evicted_size), ("ttl", stats.evicted_ttl)] {
            let labels = [("reason", reason)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let size = ConstGauge::new(stats.bytes as i64);
        let metric = encoder.encode_descriptor(
            "eddy_store_bytes",
            "Bytes of committed content in the store",
            None,
            size.metric_type(),
        )?;
        size.encode(metric)?;
        let inflight = ConstGauge::new(store.in_flight_count() as i64);
        let metric = encoder.encode_descriptor(
            "eddy_inflight_fetches",
            "Upstream fetches in progress (each shared by every client waiting for it)",
            None,
            inflight.metric_type(),
        )?;
        inflight.encode(metric)
    }
}
