//! The hooks' metrics: the eBPF programs' per-CPU decision counters, read at scrape time.
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
};

use crate::hook::bpf::Bpf;

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
