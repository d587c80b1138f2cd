//! The listener's metrics: connections by route, active connections, passthrough bytes.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
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
