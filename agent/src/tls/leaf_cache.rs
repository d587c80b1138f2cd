//! The leaves one CA has minted, per registry name, and its per-IP server configs: a bounded
//! in-memory cache whose entries are re-minted before they near expiry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::error::TlsError;
use super::name::RegistryName;
use crate::node::sync::lock;

/// Registries per node are few; the bound only stops a stream of odd SNIs from growing memory.
const CAPACITY: usize = 1024;
/// Leaves live 90 days; re-mint with a month to spare, so a client never sees one about to expire.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Minted leaves and per-IP server configs of one CA.
pub(super) struct Leaves {
    pub(super) capacity: usize,
    pub(super) leaves: Mutex<HashMap<RegistryName, Cached>>,
    pub(super) ip_configs: Mutex<HashMap<IpAddr, Arc<ServerConfig>>>,
}

pub(super) struct Cached {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

impl Default for Leaves {
    fn default() -> Self {
        Leaves::with_capacity(CAPACITY)
    }
}

impl Leaves {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Leaves {
            capacity,
            leaves: Mutex::default(),
            ip_configs: Mutex::default(),
        }
    }

    /// The cached leaf for `name`, or a fresh one from `mint` if there is none or it is due for
    /// renewal. The lock is held while minting (about a millisecond): concurrent handshakes for a
    /// new name then share one leaf instead of minting several.
    pub(super) fn get_or_mint(
        &self,
        name: &RegistryName,
        now: SystemTime,
        mint: impl FnOnce() -> Result<(Arc<CertifiedKey>, SystemTime), TlsError>,
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        let mut leaves = lock(&self.leaves);
        if let Some(cached) = leaves.get(name) {
            if now < cached.renew_at {
                return Ok(cached.key.clone());
            }
        }
        let (key, not_after) = mint()?;
        if leaves.len() >= self.capacity && !leaves.contains_key(name) {
            // Evict the leaf closest to renewal: with equal lifetimes, the oldest.
            let oldest = leaves
                .iter()
                .min_by_key(|(_, c)| c.renew_at)
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                leaves.remove(&oldest);
            }
        }
        let renew_at = not_after.checked_sub(RENEW_BEFORE).unwrap_or(not_after);
        leaves.insert(
            name.clone(),
            Cached {
                key: key.clone(),
                renew_at,
            },
        );
        Ok(key)
    }
}
