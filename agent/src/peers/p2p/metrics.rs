//! The swarm's metrics, registered into eddy's registry like the other concerns'.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct P2pMetrics {
    pub peers: Gauge,
    pub dht_peers: Gauge,
    pub advertised_digests: Gauge,
    pub lookup_seconds: Histogram,
    pub peer_failures: Family<ReasonLabels, Counter>,
    /// Body bytes this node sent to peers (in-band and over the data port).
    pub sent_bytes: Counter,
    /// DHT requests other nodes sent this node (lookups, provider records, routing).
    pub dht_requests: Counter,
}

impl Default for P2pMetrics {
    fn default() -> Self {
        P2pMetrics {
            peers: Gauge::default(),
            dht_peers: Gauge::default(),
            advertised_digests: Gauge::default(),
            // 0.5 ms .. 4 s: lookups are bounded to tens of milliseconds by the caller.
            lookup_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            peer_failures: Family::default(),
            sent_bytes: Counter::default(),
            dht_requests: Counter::default(),
        }
    }
}

impl P2pMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        m.register_into(registry);
        m
    }

    /// Registers metrics made earlier (P2P starts before eddy's registry exists, so that a
    /// bad `--p2p-listen` fails before anything is attached).
    pub fn register_into(&self, registry: &mut Registry) {
        registry.register(
            "eddy_p2p_peers",
            "Peers this node is connected to",
            self.peers.clone(),
        );
        registry.register(
            "eddy_p2p_dht_peers",
            "Peers in this node's DHT routing table (provider records go to them)",
            self.dht_peers.clone(),
        );
        registry.register(
            "eddy_p2p_advertised_digests",
            "Digests this node provides in the DHT",
            self.advertised_digests.clone(),
        );
        registry.register(
            "eddy_p2p_lookup_seconds",
            "Time of provider lookups in the DHT (each bounded by its caller)",
            self.lookup_seconds.clone(),
        );
        registry.register(
            "eddy_peer_failures",
            "Failed peer fetches, by reason (connect, timeout, protocol, not_found, stall, reset, truncated, and the caller's digest_mismatch)",
            self.peer_failures.clone(),
        );
        registry.register(
            "eddy_p2p_sent_bytes",
            "Content bytes this node sent to peers (how a wave spreads over the nodes)",
            self.sent_bytes.clone(),
        );
        registry.register(
            "eddy_p2p_dht_requests",
            "DHT requests received from other nodes (the swarm's control traffic)",
            self.dht_requests.clone(),
        );
    }

    pub fn failure(&self, reason: &'static str) {
        self.peer_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
