//! Committed blobs: the [`Blob`] handle a hit hands out (an open file plus a lease that keeps the
//! entry from eviction while it is served), and [`Blobs`], which looks them up, records commits,
//! evicts and scrubs.
use std::fs::{self, File};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;
use tracing::{info, warn};

use super::disk::{hash_file, Layout};
use super::error::StoreError;
use super::index::{Entry, EntryInfo, EvictReason, Index};
use super::reader::{self, Progress, Source};
use crate::node::sync::lock;
use crate::oci::digest::Digest;

/// A committed blob. Holds its file open, so it stays readable even if evicted meanwhile.
#[derive(Clone, Debug)]
pub struct Blob {
    pub(super) digest: Digest,
    pub(super) len: u64,
    pub(super) file: Arc<File>,
    /// Keeps the entry from eviction while this handle (and so a response) is alive.
    pub(super) lease: Arc<()>,
}

impl Blob {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `[start, end)` (`end` None = to the end; an `end` past the blob is clamped). Errors if
    /// `start` is past the end.
    pub fn read_range(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        reader::read_range(self.source(), start, end)
    }

    /// This blob as a finished fill, for the one reader implementation.
    pub(super) fn source(&self) -> Source {
        let progress = Progress::committed(self.len, self.lease.clone());
        Source {
            digest: self.digest,
            file: Some(self.file.clone()),
            progress: watch::channel(progress).1,
        }
    }
}

/// Counters of what happened to committed blobs.
#[derive(Default)]
pub(super) struct Counters {
    pub hits: AtomicU64,
    pub evicted_size: AtomicU64,
    pub evicted_ttl: AtomicU64,
}

/// The committed blobs: the index over `blobs/`, and the files themselves.
pub(super) struct Blobs {
    pub layout: Arc<Layout>,
    pub index: Mutex<Index>,
    pub counters: Counters,
    /// Woken at every commit, so the size policy reacts to growth at once.
    pub committed: tokio::sync::Notify,
}

impl Blobs {
    /// Indexes what `layout` holds (see [`Layout::scan`]).
    pub fn load(layout: Arc<Layout>) -> Result<Blobs, StoreError> {
        let mut index = Index::default();
        for found in layout.scan()? {
            let entry = Entry::new(found.size, false, found.accessed);
            index.insert(found.digest, entry);
        }
        Ok(Blobs {
            layout,
            index: Mutex::new(index),
            counters: Counters::default(),
            committed: tokio::sync::Notify::new(),
        })
    }

    /// See `Store::get`.
    pub fn get(&self, digest: &Digest) -> Option<Blob> {
        let size = self.contains(digest)?;
        let file = self.open_checked(digest, size)?;
        let now = SystemTime::now();
        let (lease, persist) = lock(&self.index).entries.get_mut(digest)?.hit(now);
        if persist {
            let _ = file.set_times(fs::FileTimes::new().set_accessed(now));
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(Blob {
            digest: *digest,
            len: size,
            file: Arc::new(file),
            lease,
        })
    }

    /// The blob's file if it still has the recorded size; a blob truncated, replaced or deleted
    /// behind the store's back is forgotten.
    fn open_checked(&self, digest: &Digest, size: u64) -> Option<File> {
        let path = self.layout.blob_path(digest);
        // The open fd keeps the content readable even if the blob is evicted while being served.
        match File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((len, file)) if len == size => Some(file),
            Ok((len, _)) => {
                warn!(%digest, recorded = size, actual = len, "blob size changed on disk; evicting");
                self.remove_if(digest, |_| true);
                None
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                warn!(%digest, "committed blob deleted behind our back; forgetting it");
                self.remove_if(digest, |_| true);
                None
            }
            // Possibly transient (EMFILE, EIO): serve this request elsewhere, keep the blob.
            Err(err) => {
                warn!(%digest, %err, "committed blob unreadable");
                None
            }
        }
    }

    pub fn contains(&self, digest: &Digest) -> Option<u64> {
        lock(&self.index).entries.get(digest).map(|e| e.size)
    }

    /// Bytes and number of committed blobs, in one snapshot.
    pub fn totals(&self) -> (u64, u64) {
        let index = lock(&self.index);
        (index.total, index.entries.len() as u64)
    }

    pub fn size_bytes(&self) -> u64 {
        lock(&self.index).total
    }

    pub fn digests(&self) -> Vec<Digest> {
        lock(&self.index).entries.keys().copied().collect()
    }

    pub fn entries(&self) -> Vec<EntryInfo> {
        let index = lock(&self.index);
        index.entries.iter().map(|(d, e)| e.info(*d)).collect()
    }

    /// Indexes a blob a fill just committed (and verified).
    pub fn insert_committed(&self, blob: &Blob) {
        let entry = Entry::committed(blob.len, &blob.lease);
        lock(&self.index).insert(blob.digest, entry);
        info!(digest = %blob.digest, bytes = blob.len, "blob committed");
        // notify_one keeps a permit when nobody waits: the lifecycle loop (the one
        // waiter) may be busy evicting when this commit lands, and must still see it.
        self.committed.notify_one();
    }

    /// See `Store::evict`.
    pub fn evict(&self, digest: &Digest, seen: SystemTime, reason: EvictReason) -> Option<u64> {
        let size = self.contains(digest)?;
        if !self.remove_if(digest, |e| !e.in_use() && e.last_access <= seen) {
            return None;
        }
        let counter = match reason {
            EvictReason::Size => &self.counters.evicted_size,
            EvictReason::Ttl => &self.counters.evicted_ttl,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        info!(%digest, bytes = size, ?reason, "evicted");
        Some(size)
    }

    pub fn remove_if(&self, digest: &Digest, pred: impl FnOnce(&Entry) -> bool) -> bool {
        let mut index = lock(&self.index);
        if !index.remove_if(digest, pred) {
            return false;
        }
        // Unlinked under the index lock: a new fill for this digest can only start once the entry is
        // gone, and then it must not have its freshly committed file deleted by us.
        self.layout.remove(digest);
        true
    }

    /// See `Store::scrub`.
    pub async fn scrub(&self) -> usize {
        let unverified: Vec<Digest> = {
            let index = lock(&self.index);
            let unverified = index.entries.iter().filter(|(_, e)| !e.verified);
            unverified.map(|(d, _)| *d).collect()
        };
        let mut evicted = 0;
        for digest in unverified {
            let path = self.layout.blob_path(&digest);
            let actual = tokio::task::spawn_blocking(move || hash_file(&path)).await;
            match actual {
                Ok(Ok(actual)) if actual == digest => {
                    if let Some(entry) = lock(&self.index).entries.get_mut(&digest) {
                        entry.verified = true;
                    }
                }
                Ok(Ok(actual)) => {
                    warn!(%digest, %actual, "blob content does not match its name; evicting");
                    // Only if still the entry we hashed: it may have been evicted and refilled
                    // (verified) meanwhile.
                    evicted += usize::from(self.remove_if(&digest, |e| !e.verified));
                }
                // Gone or unreadable: `get` evicts it on next use if it is really broken.
                Ok(Err(err)) => warn!(%digest, %err, "scrub could not read blob"),
                Err(err) => warn!(%digest, %err, "scrub task failed"),
            }
        }
        evicted
    }
}
