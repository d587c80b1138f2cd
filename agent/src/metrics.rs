//! Prometheus metrics (prometheus-client). Each concern registers its metrics into the
//! registry it is handed; there are no globals.
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::bpf::Bpf;

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
    /// Accepted, but no original destination was recorded for it (not a redirect).
    pub const NO_ORIG_DST: &str = "no_orig_dst";
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
