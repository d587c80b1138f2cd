//! The Prometheus text encoding of eddy's metrics (prometheus-client). Each concern defines
//! and registers its own metrics (`listener::metrics`, `trust::metrics`, `hook::metrics`,
//! `registry::metrics`, `store::metrics`, `peers::p2p::metrics`, the chains' in
//! `upstream::chain`) into the registry `app` hands it; there are no globals. ops only
//! encodes.
use prometheus_client::registry::Registry;

pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
