//! The local content-addressed blob store, and single-flight fills that tee upstream bytes to every
//! waiting reader while writing them to disk.
//!
//! Owns: the bytes under `<data_dir>/store` (layout and crash-consistency in `disk`), the index of
//! committed blobs (`index`, `blob`), fills and the readers that stream them as they grow (`fill`,
//! `download`, `reader`, crash-resume in `resume`), disk space (`space`), what is known about
//! cached content (`catalog`), the size and TTL policy (`lifecycle`), the store's gauges
//! (`metrics`) and its single owner (`datadir_lock`).
//!
//! May import only `oci` and `node`. Inside, imports point one way: `error` at the
//! bottom, then `disk`, `index`, `reader`, `blob`, `download`, `fill`; this file only re-exports
//! and wires them into [`Store`], and no file below imports from it (but `lifecycle`, a policy on
//! top of the [`Store`] API).
//!
//! A name only ever appears in `blobs/` by `rename` of a temp file whose length and sha256 were
//! verified and fsync'd, after its size sidecar in `meta/` was made durable: a crash at any point
//! leaves either no entry or a complete one. One process owns a store directory at a time
//! (`eddy run` holds the data dir's lock file).

mod blob;
pub mod catalog;
pub mod datadir_lock;
mod disk;
mod download;
mod error;
mod fill;
mod index;
pub mod lifecycle;
pub mod metrics;
mod reader;
pub mod resume;
mod space;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tracing::info;

use crate::oci::digest::Digest;

pub use blob::Blob;
pub use download::Fetched;
pub use error::{BoxError, StoreError};
pub use fill::Fill;
pub use index::{EntryInfo, EvictReason};
pub use space::MIN_FREE_BYTES;

use blob::Blobs;
use disk::Layout;
use fill::Fills;
use space::Space;

/// A handle on the store; clones share it.
#[derive(Clone)]
pub struct Store {
    blobs: Arc<Blobs>,
    fills: Arc<Fills>,
    space: Arc<Space>,
}

/// Counters for metrics and `GET /store`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StoreStats {
    pub bytes: u64,
    pub entries: u64,
    pub hits: u64,
    pub evicted_size: u64,
    pub evicted_ttl: u64,
    pub proxy_only: bool,
}

impl Store {
    /// Opens (creating if needed) the store under `<data_dir>/store`.
    ///
    /// Blobs found on disk are indexed if their sidecar exists and records their current size;
    /// anything else in `blobs/` is deleted, and `tmp/` is emptied but for resumable fills. Content is not re-hashed here, so
    /// open stays fast for a large store; see [`Store::scrub`].
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let layout = Arc::new(Layout::open(data_dir)?);
        let blobs = Arc::new(Blobs::load(layout.clone())?);
        let (bytes, entries) = blobs.totals();
        info!(root = %layout.root.display(), blobs = entries, bytes, "store opened");
        Ok(Store {
            space: Arc::new(Space::new(layout.blobs_dir.clone())),
            fills: Arc::new(Fills::new(layout, blobs.clone())),
            blobs,
        })
    }

    /// A committed blob, or None (then the caller fills it or goes elsewhere).
    ///
    /// Checks that the file still has the size recorded at commit, which catches truncation and
    /// replacement without reading the content. Same-size corruption is only caught by [`Store::scrub`]
    /// (or by the client, since containerd verifies every digest): hashing here would put a full read of
    /// the blob before its first byte on every cold start, for a failure mode (silent bit rot under an
    /// unchanged size) far rarer than the crash and disk-full cases the commit protocol already rules out.
    /// A hit extends the entry's TTL and moves it to the back of the LRU order.
    pub fn get(&self, digest: &Digest) -> Option<Blob> {
        self.blobs.get(digest)
    }

    /// The size of a committed blob, without counting a hit or opening it.
    pub fn contains(&self, digest: &Digest) -> Option<u64> {
        self.blobs.contains(digest)
    }

    /// Every committed entry, for the lifecycle policy.
    pub fn entries(&self) -> Vec<EntryInfo> {
        self.blobs.entries()
    }

    /// Evicts `digest` unless it is being served or was used after `seen_access` (the policy
    /// decided on a snapshot; a hit since then wins). Returns the bytes freed.
    pub fn evict(
        &self,
        digest: &Digest,
        seen_access: SystemTime,
        reason: EvictReason,
    ) -> Option<u64> {
        self.blobs.evict(digest, seen_access, reason)
    }

    pub fn stats(&self) -> StoreStats {
        let (bytes, entries) = self.blobs.totals();
        let c = &self.blobs.counters;
        StoreStats {
            bytes,
            entries,
            hits: c.hits.load(Ordering::Relaxed),
            evicted_size: c.evicted_size.load(Ordering::Relaxed),
            evicted_ttl: c.evicted_ttl.load(Ordering::Relaxed),
            proxy_only: self.space.proxy_only(),
        }
    }

    /// Resolves at the next commit.
    pub async fn next_commit(&self) {
        self.blobs.committed.notified().await
    }

    /// Whether a blob of `bytes` (0 if unknown) may be stored: the disk keeps [`MIN_FREE_BYTES`]
    /// free beyond it. With the disk below that floor the store is proxy-only (fills are relayed
    /// uncached); each change is logged once. A single blob too large for the room above the
    /// floor is relayed uncached too, but does not switch proxy-only on: the gauge and its log
    /// line follow the floor alone, so they do not flap between a large blob and a small one.
    pub fn admits(&self, bytes: u64) -> bool {
        self.space.admits(bytes)
    }

    /// Leaves proxy-only once the disk has room again (called by the lifecycle loop, since no fill
    /// may come to notice).
    pub fn refresh_proxy_only(&self) {
        self.space.refresh_proxy_only()
    }

    /// Starts a fill for `digest`, or joins the one in progress, or returns an already committed blob
    /// as a finished fill. `fetch` runs only in the first case.
    ///
    /// The download runs in its own task, so it completes (and commits) even if every reader goes
    /// away: the next pull of the same image then hits the cache. Must be called within a tokio runtime.
    pub fn fill<F, Fut, S, E1, E2>(&self, digest: &Digest, fetch: F) -> Fill
    where
        F: FnOnce(u64) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fetched<S>, E1>> + Send + 'static,
        S: Stream<Item = Result<Bytes, E2>> + Send + 'static,
        E1: Into<BoxError> + Send + 'static,
        E2: Into<BoxError> + Send + 'static,
    {
        self.fills.start(digest, fetch)
    }

    /// The fill in progress for `digest`, if any, without starting one (for serving peers from a
    /// download that is still running).
    pub fn in_flight(&self, digest: &Digest) -> Option<Fill> {
        self.fills.get(digest)
    }

    /// Free bytes on the store's filesystem (None if it cannot be read).
    pub fn free_bytes(&self) -> Option<u64> {
        self.space.free_bytes()
    }

    /// Removes the partial files of fills that are not running and were last written more than
    /// `idle` ago (a crashed run's fill of a blob nobody asked for again). Returns the bytes
    /// freed, or that would be freed when `dry_run`.
    pub fn remove_stale_partials(&self, idle: Duration, dry_run: bool) -> u64 {
        self.fills.remove_stale_partials(idle, dry_run)
    }

    /// Size of the store's filesystem (None if it cannot be read).
    pub fn fs_total_bytes(&self) -> Option<u64> {
        self.space.total_bytes()
    }

    /// How many fills are running (for the in-flight metric).
    pub fn in_flight_count(&self) -> usize {
        self.fills.count()
    }

    /// Total bytes of committed blobs.
    pub fn size_bytes(&self) -> u64 {
        self.blobs.size_bytes()
    }

    /// Every committed digest (for advertising to peers, and for GC).
    pub fn digests(&self) -> Vec<Digest> {
        self.blobs.digests()
    }

    /// Evicts a committed blob. Readers holding a [`Blob`] keep reading their open file. Returns whether
    /// it was present.
    pub fn remove(&self, digest: &Digest) -> bool {
        self.blobs.remove_if(digest, |_| true)
    }

    /// Re-hashes every blob not yet verified by this process (those found on disk at open) and evicts
    /// any whose content does not match its name. Meant to run in the background after open; returns
    /// how many were evicted.
    pub async fn scrub(&self) -> usize {
        self.blobs.scrub().await
    }
}

#[cfg(test)]
mod tests;
