//! The in-memory index of committed blobs: size, last access (for LRU and TTL), whether this
//! process has hashed it, and the lease that keeps an entry being served from eviction.
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use crate::oci::digest::Digest;

/// A hit is written to the blob file's atime at most this often: LRU order survives a restart
/// to within this much, for one futimens per blob per interval.
const PERSIST_ACCESS_EVERY: Duration = Duration::from_secs(60);

/// Why content left the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictReason {
    Size,
    Ttl,
}

/// A committed entry as the lifecycle policy sees it.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub digest: Digest,
    pub size: u64,
    pub last_access: SystemTime,
    /// Being served right now (a `Blob` handle is alive): never evicted.
    pub in_use: bool,
}

#[derive(Default)]
pub(super) struct Index {
    pub entries: HashMap<Digest, Entry>,
    pub total: u64,
}

pub(super) struct Entry {
    pub size: u64,
    /// Hashed by this process: either filled here, or found at open and checked by `scrub`.
    pub verified: bool,
    /// Last hit (or commit); persisted as the blob file's atime, see [`PERSIST_ACCESS_EVERY`].
    pub last_access: SystemTime,
    persisted_access: SystemTime,
    /// Shared by every `Blob` handed out for this entry: alive means being served.
    lease: Weak<()>,
}

impl Entry {
    pub fn new(size: u64, verified: bool, last_access: SystemTime) -> Entry {
        Entry {
            size,
            verified,
            last_access,
            persisted_access: last_access,
            lease: Weak::new(),
        }
    }

    /// A fresh commit, held by the fill that made it.
    pub fn committed(size: u64, lease: &Arc<()>) -> Entry {
        Entry {
            lease: Arc::downgrade(lease),
            ..Entry::new(size, true, SystemTime::now())
        }
    }

    pub fn in_use(&self) -> bool {
        self.lease.strong_count() > 0
    }

    /// A hit at `now`: extends the TTL and moves the entry to the back of the LRU order. Returns
    /// the lease for the handle being served, and whether to persist the access time.
    pub fn hit(&mut self, now: SystemTime) -> (Arc<()>, bool) {
        self.last_access = now;
        let persist = now
            .duration_since(self.persisted_access)
            .is_ok_and(|d| d >= PERSIST_ACCESS_EVERY);
        if persist {
            self.persisted_access = now;
        }
        let lease = self.lease.upgrade().unwrap_or_else(|| {
            let lease = Arc::new(());
            self.lease = Arc::downgrade(&lease);
            lease
        });
        (lease, persist)
    }

    pub fn info(&self, digest: Digest) -> EntryInfo {
        EntryInfo {
            digest,
            size: self.size,
            last_access: self.last_access,
            in_use: self.in_use(),
        }
    }
}

impl Index {
    /// Adds (or, for a re-fill of an evicted-then-recreated entry, replaces) an entry, keeping the
    /// total honest.
    pub fn insert(&mut self, digest: Digest, entry: Entry) {
        self.total += entry.size;
        if let Some(old) = self.entries.insert(digest, entry) {
            self.total -= old.size;
        }
    }

    /// Removes the entry if `pred` holds for it; returns whether it did.
    pub fn remove_if(&mut self, digest: &Digest, pred: impl FnOnce(&Entry) -> bool) -> bool {
        if !self.entries.get(digest).is_some_and(pred) {
            return false;
        }
        let Some(entry) = self.entries.remove(digest) else {
            return false;
        };
        self.total -= entry.size;
        true
    }
}
