//! The trust gate's metrics: verdicts by kind, and clients passed through untrusted.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: &'static str,
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
