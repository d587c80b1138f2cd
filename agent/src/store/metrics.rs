//! The store's metrics: size, limit, entries, hits, evictions and fills in flight, read from
//! the store at scrape time.
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

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
