//! Disk space: whether a blob may be cached, and proxy-only mode, in which the disk is below its
//! free-space floor and fills are relayed uncached (a full disk must not fail a pull).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{info, warn};

/// Below this much free disk (beyond the blob itself), eddy stops caching and streams straight
/// from upstream: a full disk must not fail a pull.
pub const MIN_FREE_BYTES: u64 = 256 << 20;

/// The filesystem the store lives on.
pub(super) struct Space {
    dir: PathBuf,
    /// Below the free-space floor: fills are relayed uncached.
    proxy_only: AtomicBool,
}

impl Space {
    pub fn new(dir: PathBuf) -> Space {
        Space {
            dir,
            proxy_only: AtomicBool::new(false),
        }
    }

    pub fn proxy_only(&self) -> bool {
        self.proxy_only.load(Ordering::Relaxed)
    }

    /// See `Store::admits`.
    pub fn admits(&self, bytes: u64) -> bool {
        let free = self.free_bytes().unwrap_or(0);
        self.set_proxy_only(free < MIN_FREE_BYTES, free);
        let fits = free >= bytes.saturating_add(MIN_FREE_BYTES);
        if !fits && free >= MIN_FREE_BYTES {
            info!(
                bytes,
                free,
                floor = MIN_FREE_BYTES,
                "blob larger than the disk's room above its free-space floor: relayed uncached"
            );
        }
        fits
    }

    /// Leaves proxy-only once the disk has room again.
    pub fn refresh_proxy_only(&self) {
        if self.proxy_only() {
            let free = self.free_bytes().unwrap_or(0);
            self.set_proxy_only(free < MIN_FREE_BYTES, free);
        }
    }

    fn set_proxy_only(&self, on: bool, free: u64) {
        if self.proxy_only.swap(on, Ordering::Relaxed) != on {
            if on {
                warn!(
                    free,
                    floor = MIN_FREE_BYTES,
                    "disk below the free-space floor: proxy-only, fills are relayed uncached"
                );
            } else {
                info!(free, "disk has room again: caching resumes");
            }
        }
    }

    pub fn free_bytes(&self) -> Option<u64> {
        crate::node::sys::free_bytes(&self.dir).ok()
    }

    pub fn total_bytes(&self) -> Option<u64> {
        crate::node::sys::total_bytes(&self.dir).ok()
    }
}
