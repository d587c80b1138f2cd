//! The local content-addressed blob store, and single-flight fills that tee upstream bytes to every
//! waiting reader while writing them to disk.
//!
//! Layout under `<data_dir>/store`:
//! - `blobs/sha256/<hex>`: committed blobs. A name only ever appears here by `rename` of a temp file
//!   whose length and sha256 were verified and fsync'd, so a crash at any point leaves either no entry
//!   or a complete one.
//! - `meta/sha256/<hex>.json`: a sidecar recording the committed size, written (and made durable)
//!   before the blob is renamed into place. It is the independent record `get` checks against.
//! - `tmp/<hex>.partial` (+ `.partial.json`): fills in progress, named by digest so that a
//!   restarted eddy resumes them from their checkpointed, re-verified prefix (see `resume`).
//!   Anything else in `tmp/` is cleared at open.
//!
//! One process owns a store directory at a time (`eddy run` holds the data dir's lock file).

pub mod catalog;
pub mod datadir_lock;
pub mod lifecycle;
pub mod metrics;
pub mod resume;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::oci::digest::Digest;

/// Bytes per positional read. Large enough that a warm blob streams at several GB/s (one blocking
/// task hop per chunk), small enough that a tee'd reader is never far behind the writer.
const READ_CHUNK: u64 = 256 * 1024;
/// Upper bound on upstream chunks batched into one write (only chunks that are already available are
/// batched, so batching never delays a reader).
const WRITE_BATCH: usize = 1024 * 1024;
/// Below this much free disk (beyond the blob itself), eddy stops caching and streams straight
/// from upstream: a full disk must not fail a pull.
pub const MIN_FREE_BYTES: u64 = 256 << 20;
/// A hit is written to the blob file's atime at most this often: LRU order survives a restart
/// to within this much, for one futimens per blob per interval.
const PERSIST_ACCESS_EVERY: Duration = Duration::from_secs(60);

/// Any error the upstream body or fetch may produce.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a fill's fetch returns. The fetch is given the length of the prefix the store already
/// holds (0 for a fresh fill) and may resume from it (`Range: bytes=N-`) or send the whole blob.
pub struct Fetched<S> {
    pub body: S,
    /// The blob's total length, if upstream announced it.
    pub len: Option<u64>,
    /// Where in the blob `body` starts: the prefix length it was asked for (a 206), or 0 (a
    /// 200: upstream ignored the range, and the store skips the bytes it already has).
    pub offset: u64,
    /// Readers see nothing until the whole blob is verified and committed. For sources that
    /// are not trusted to send the right bytes (peers): if verification fails, no client has
    /// seen a byte of it, and the handler can still go upstream for them.
    pub gated: bool,
}

impl<S> Fetched<S> {
    /// The whole blob from its first byte.
    pub fn whole(body: S, len: Option<u64>) -> Self {
        Fetched {
            body,
            len,
            offset: 0,
            gated: false,
        }
    }
}

/// Cloneable so a failed fill can hand the same error to every waiting reader.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("reading {digest}: {source}")]
    Read {
        digest: Digest,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("upstream fetch of {digest} failed: {source}")]
    Upstream {
        digest: Digest,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error("content does not match {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(
        "length of {digest} does not match: upstream announced {expected} bytes, sent {actual}"
    )]
    LengthMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("range {start}..{end:?} not satisfiable for {digest} of {len} bytes")]
    RangeNotSatisfiable {
        digest: Digest,
        start: u64,
        end: Option<u64>,
        len: u64,
    },
    #[error("fill of {digest} ended without a result (task panicked or runtime shut down)")]
    Aborted { digest: Digest },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

/// A handle on the store; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    blobs_dir: PathBuf,
    meta_dir: PathBuf,
    tmp_dir: PathBuf,
    index: Mutex<Index>,
    /// Fills in progress. Lock order: `inflight` before `index`.
    inflight: Mutex<HashMap<Digest, Fill>>,
    stats: Stats,
    /// Woken at every commit, so the size policy reacts to growth at once.
    committed: tokio::sync::Notify,
}

#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    evicted_size: AtomicU64,
    evicted_ttl: AtomicU64,
    /// Below the free-space floor: fills are relayed uncached.
    proxy_only: AtomicBool,
}

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
    /// Being served right now (a [`Blob`] handle is alive): never evicted.
    pub in_use: bool,
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

#[derive(Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    total: u64,
}

struct Entry {
    size: u64,
    /// Hashed by this process: either filled here, or found at open and checked by `scrub`.
    verified: bool,
    /// Last hit (or commit); persisted as the blob file's atime, see [`PERSIST_ACCESS_EVERY`].
    last_access: SystemTime,
    persisted_access: SystemTime,
    /// Shared by every [`Blob`] handed out for this entry: alive means being served.
    lease: Weak<()>,
}

impl Entry {
    fn new(size: u64, verified: bool, last_access: SystemTime) -> Entry {
        Entry {
            size,
            verified,
            last_access,
            persisted_access: last_access,
            lease: Weak::new(),
        }
    }

    fn lease(&mut self) -> Arc<()> {
        self.lease.upgrade().unwrap_or_else(|| {
            let lease = Arc::new(());
            self.lease = Arc::downgrade(&lease);
            lease
        })
    }
}

/// The sidecar in `meta/`. Unknown fields are ignored, so later versions can add some.
#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    size: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No critical section here can leave the data half-updated, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens (creating if needed) the store under `<data_dir>/store`.
    ///
    /// Blobs found on disk are indexed if their sidecar exists and records their current size;
    /// anything else in `blobs/` is deleted, and `tmp/` is emptied but for resumable fills. Content is not re-hashed here, so
    /// open stays fast for a large store; see [`Store::scrub`].
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let root = data_dir.join("store");
        let blobs_dir = root.join("blobs").join("sha256");
        let meta_dir = root.join("meta").join("sha256");
        let tmp_dir = root.join("tmp");
        for dir in [&blobs_dir, &meta_dir, &tmp_dir] {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }

        for entry in fs::read_dir(&tmp_dir).map_err(io_err("list", &tmp_dir))? {
            let path = entry.map_err(io_err("list", &tmp_dir))?.path();
            let resumable = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(resume::is_resumable_name);
            if resumable && path.is_file() {
                continue;
            }
            debug!(path = %path.display(), "removing leftover temp file");
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_err("remove", &path))?;
        }

        let mut index = Index::default();
        for entry in fs::read_dir(&blobs_dir).map_err(io_err("list", &blobs_dir))? {
            let entry = entry.map_err(io_err("list", &blobs_dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let digest = name
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok());
            let recorded = digest.and_then(|d| read_meta(&meta_dir, &d));
            let actual = entry.metadata().map_err(io_err("stat", &path))?;
            match (digest, recorded) {
                (Some(digest), Some(meta)) if actual.is_file() && actual.len() == meta.size => {
                    index.total += meta.size;
                    let accessed = actual
                        .accessed()
                        .or_else(|_| actual.modified())
                        .unwrap_or_else(|_| SystemTime::now());
                    index
                        .entries
                        .insert(digest, Entry::new(meta.size, false, accessed));
                }
                _ => {
                    warn!(path = %path.display(), "removing blob without a matching size record");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        // Sidecars whose blob is gone (a crash between the two renames, or an eviction interrupted).
        for entry in fs::read_dir(&meta_dir).map_err(io_err("list", &meta_dir))? {
            let path = entry.map_err(io_err("list", &meta_dir))?.path();
            let digest = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
            if !digest.is_some_and(|d| index.entries.contains_key(&d)) {
                let _ = fs::remove_file(&path);
            }
        }

        info!(root = %root.display(), blobs = index.entries.len(), bytes = index.total, "store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                blobs_dir,
                meta_dir,
                tmp_dir,
                index: Mutex::new(index),
                inflight: Mutex::new(HashMap::new()),
                stats: Stats::default(),
                committed: tokio::sync::Notify::new(),
            }),
        })
    }

    /// A committed blob, or None (then the caller fills it or goes elsewhere).
    ///
    /// Checks that the file still has the size recorded at commit, which catches truncation and
    /// replacement without reading the content. Same-size corruption is only caught by [`Store::scrub`]
    /// (or by the client, since containerd verifies every digest): hashing here would put a full read of
    /// the blob before its first byte on every cold start, for a failure mode (silent bit rot under an
    /// unchanged size) far rarer than the crash and disk-full cases the commit protocol already rules out.
    pub fn get(&self, digest: &Digest) -> Option<Blob> {
        let size = self.contains(digest)?;
        let path = self.inner.blob_path(digest);
        // The open fd keeps the content readable even if the blob is evicted while being served.
        let file = match File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((len, file)) if len == size => file,
            Ok((len, _)) => {
                warn!(%digest, recorded = size, actual = len, "blob size changed on disk; evicting");
                self.remove(digest);
                return None;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                warn!(%digest, "committed blob deleted behind our back; forgetting it");
                self.remove(digest);
                return None;
            }
            // Possibly transient (EMFILE, EIO): serve this request elsewhere, keep the blob.
            Err(err) => {
                warn!(%digest, %err, "committed blob unreadable");
                return None;
            }
        };
        // A hit: it extends the entry's TTL and moves it to the back of the LRU order.
        let now = SystemTime::now();
        let (lease, persist) = {
            let mut index = lock(&self.inner.index);
            let entry = index.entries.get_mut(digest)?;
            entry.last_access = now;
            let persist = now
                .duration_since(entry.persisted_access)
                .is_ok_and(|d| d >= PERSIST_ACCESS_EVERY);
            if persist {
                entry.persisted_access = now;
            }
            (entry.lease(), persist)
        };
        if persist {
            let _ = file.set_times(fs::FileTimes::new().set_accessed(now));
        }
        self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(Blob {
            digest: *digest,
            len: size,
            file: Arc::new(file),
            lease: Some(lease),
        })
    }

    /// The size of a committed blob, without counting a hit or opening it.
    pub fn contains(&self, digest: &Digest) -> Option<u64> {
        lock(&self.inner.index).entries.get(digest).map(|e| e.size)
    }

    /// Every committed entry, for the lifecycle policy.
    pub fn entries(&self) -> Vec<EntryInfo> {
        lock(&self.inner.index)
            .entries
            .iter()
            .map(|(digest, e)| EntryInfo {
                digest: *digest,
                size: e.size,
                last_access: e.last_access,
                in_use: e.lease.strong_count() > 0,
            })
            .collect()
    }

    /// Evicts `digest` unless it is being served or was used after `seen_access` (the policy
    /// decided on a snapshot; a hit since then wins). Returns the bytes freed.
    pub fn evict(
        &self,
        digest: &Digest,
        seen_access: SystemTime,
        reason: EvictReason,
    ) -> Option<u64> {
        let size = self.contains(digest)?;
        let removed = self.remove_if(digest, |e| {
            e.lease.strong_count() == 0 && e.last_access <= seen_access
        });
        if !removed {
            return None;
        }
        let counter = match reason {
            EvictReason::Size => &self.inner.stats.evicted_size,
            EvictReason::Ttl => &self.inner.stats.evicted_ttl,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        info!(%digest, bytes = size, ?reason, "evicted");
        Some(size)
    }

    pub fn stats(&self) -> StoreStats {
        let (bytes, entries) = {
            let index = lock(&self.inner.index);
            (index.total, index.entries.len() as u64)
        };
        let s = &self.inner.stats;
        StoreStats {
            bytes,
            entries,
            hits: s.hits.load(Ordering::Relaxed),
            evicted_size: s.evicted_size.load(Ordering::Relaxed),
            evicted_ttl: s.evicted_ttl.load(Ordering::Relaxed),
            proxy_only: s.proxy_only.load(Ordering::Relaxed),
        }
    }

    /// Resolves at the next commit.
    pub async fn next_commit(&self) {
        self.inner.committed.notified().await
    }

    /// Whether a blob of `bytes` (0 if unknown) may be stored: the disk keeps [`MIN_FREE_BYTES`]
    /// free beyond it. With the disk below that floor the store is proxy-only (fills are relayed
    /// uncached); each change is logged once. A single blob too large for the room above the
    /// floor is relayed uncached too, but does not switch proxy-only on: the gauge and its log
    /// line follow the floor alone, so they do not flap between a large blob and a small one.
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

    /// Leaves proxy-only once the disk has room again (called by the lifecycle loop, since no fill
    /// may come to notice).
    pub fn refresh_proxy_only(&self) {
        if self.inner.stats.proxy_only.load(Ordering::Relaxed) {
            let free = self.free_bytes().unwrap_or(0);
            self.set_proxy_only(free < MIN_FREE_BYTES, free);
        }
    }

    fn set_proxy_only(&self, on: bool, free: u64) {
        if self.inner.stats.proxy_only.swap(on, Ordering::Relaxed) != on {
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
        let mut inflight = lock(&self.inner.inflight);
        if let Some(fill) = inflight.get(digest) {
            return fill.clone();
        }
        // Checked under the inflight lock: a finishing fill indexes its blob before leaving `inflight`,
        // so there is no moment where a completed blob is in neither and would be fetched twice.
        if let Some(blob) = self.get(digest) {
            return Fill::committed(blob);
        }
        let (writer, tmp_path, read_file) = match self.inner.open_partial(digest) {
            Ok(files) => files,
            Err(err) => return Fill::failed(*digest, err),
        };
        let (tx, rx) = watch::channel(Progress {
            written: 0,
            len: None,
            started: false,
            gated: false,
            state: FillState::Running,
        });
        let fill = Fill {
            digest: *digest,
            file: Some(Arc::new(read_file)),
            progress: rx,
        };
        inflight.insert(*digest, fill.clone());
        drop(inflight);

        debug!(%digest, "fill started");
        let guard = FillGuard {
            inner: self.inner.clone(),
            digest: *digest,
            tmp_path,
            tx,
            finished: false,
        };
        tokio::spawn(run_fill(guard, writer, fill.file.clone(), fetch));
        fill
    }

    /// The fill in progress for `digest`, if any, without starting one (for serving peers from a
    /// download that is still running).
    pub fn in_flight(&self, digest: &Digest) -> Option<Fill> {
        lock(&self.inner.inflight).get(digest).cloned()
    }

    /// Free bytes on the store's filesystem (None if it cannot be read).
    pub fn free_bytes(&self) -> Option<u64> {
        crate::node::sys::free_bytes(&self.inner.blobs_dir).ok()
    }

    /// Removes the partial files of fills that are not running and were last written more than
    /// `idle` ago (a crashed run's fill of a blob nobody asked for again). Returns the bytes
    /// freed, or that would be freed when `dry_run`.
    pub fn remove_stale_partials(&self, idle: Duration, dry_run: bool) -> u64 {
        let Ok(dir) = fs::read_dir(&self.inner.tmp_dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut freed = 0;
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".partial")) else {
                continue;
            };
            let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            // Checked under the inflight lock, which a fill holds while it opens its partial.
            let inflight = lock(&self.inner.inflight);
            if age < idle || inflight.contains_key(&digest) {
                continue;
            }
            freed += meta.len();
            if !dry_run {
                info!(%digest, bytes = meta.len(), "removing a stale partial fill");
                resume::discard(&entry.path());
            }
        }
        freed
    }

    /// Size of the store's filesystem (None if it cannot be read).
    pub fn fs_total_bytes(&self) -> Option<u64> {
        crate::node::sys::total_bytes(&self.inner.blobs_dir).ok()
    }

    /// How many fills are running (for the in-flight metric).
    pub fn in_flight_count(&self) -> usize {
        lock(&self.inner.inflight).len()
    }

    /// Total bytes of committed blobs.
    pub fn size_bytes(&self) -> u64 {
        lock(&self.inner.index).total
    }

    /// Every committed digest (for advertising to peers, and for GC).
    pub fn digests(&self) -> Vec<Digest> {
        lock(&self.inner.index).entries.keys().copied().collect()
    }

    /// Evicts a committed blob. Readers holding a [`Blob`] keep reading their open file. Returns whether
    /// it was present.
    pub fn remove(&self, digest: &Digest) -> bool {
        self.remove_if(digest, |_| true)
    }

    fn remove_if(&self, digest: &Digest, pred: impl FnOnce(&Entry) -> bool) -> bool {
        let mut index = lock(&self.inner.index);
        if !index.entries.get(digest).is_some_and(pred) {
            return false;
        }
        let Some(entry) = index.entries.remove(digest) else {
            return false;
        };
        index.total -= entry.size;
        // Unlinked under the index lock: a new fill for this digest can only start once the entry is
        // gone, and then it must not have its freshly committed file deleted by us.
        let _ = fs::remove_file(self.inner.blob_path(digest));
        let _ = fs::remove_file(self.inner.meta_path(digest));
        true
    }

    /// Re-hashes every blob not yet verified by this process (those found on disk at open) and evicts
    /// any whose content does not match its name. Meant to run in the background after open; returns
    /// how many were evicted.
    pub async fn scrub(&self) -> usize {
        let unverified: Vec<Digest> = {
            let index = lock(&self.inner.index);
            index
                .entries
                .iter()
                .filter(|(_, e)| !e.verified)
                .map(|(d, _)| *d)
                .collect()
        };
        let mut evicted = 0;
        for digest in unverified {
            let path = self.inner.blob_path(&digest);
            let actual = tokio::task::spawn_blocking(move || hash_file(&path)).await;
            match actual {
                Ok(Ok(actual)) if actual == digest => {
                    if let Some(entry) = lock(&self.inner.index).entries.get_mut(&digest) {
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

impl Inner {
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir.join(digest.hex())
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.meta_dir.join(format!("{}.json", digest.hex()))
    }

    /// The fill's partial file, created or (after a crash) reopened as it is: a write handle
    /// for the fill, and a separate read handle shared by readers. The read handle is opened now,
    /// by path, so it follows the inode through the commit rename (and stays valid if a failed
    /// fill unlinks it): readers never race the rename. Only one fill per digest runs at a time
    /// (`inflight`), and one process owns the store, so the stable name has one writer.
    fn open_partial(&self, digest: &Digest) -> Result<(File, PathBuf, File), StoreError> {
        let path = resume::partial_path(&self.tmp_dir, digest);
        let writer = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let reader = File::open(&path).map_err(io_err("open", &path))?;
        Ok((writer, path, reader))
    }

    /// Makes a verified temp file the committed blob. Sidecar first, then the blob: once the blob's
    /// name is durable its size record is too, and a crash in between leaves only an orphan sidecar,
    /// which open removes.
    fn commit(
        &self,
        digest: &Digest,
        tmp_path: &Path,
        writer: &File,
        size: u64,
    ) -> Result<(), StoreError> {
        writer.sync_all().map_err(io_err("fsync", tmp_path))?;

        let meta_tmp = meta_tmp_path(tmp_path);
        let meta = serde_json::to_vec(&Meta { size }).expect("Meta serializes");
        let mut f = File::create(&meta_tmp).map_err(io_err("create", &meta_tmp))?;
        f.write_all(&meta)
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &meta_tmp))?;
        let meta_path = self.meta_path(digest);
        fs::rename(&meta_tmp, &meta_path).map_err(io_err("rename", &meta_path))?;
        sync_dir(&self.meta_dir)?;

        let blob_path = self.blob_path(digest);
        fs::rename(tmp_path, &blob_path).map_err(io_err("rename", &blob_path))?;
        let _ = fs::remove_file(resume::checkpoint_path(tmp_path));
        sync_dir(&self.blobs_dir)
    }
}

/// The sidecar's temp file, next to the fill's own so that failure cleanup finds it.
fn meta_tmp_path(tmp_path: &Path) -> PathBuf {
    let mut name = tmp_path.as_os_str().to_owned();
    name.push(".meta");
    PathBuf::from(name)
}

fn read_meta(meta_dir: &Path, digest: &Digest) -> Option<Meta> {
    let raw = fs::read(meta_dir.join(format!("{}.json", digest.hex()))).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// A rename is durable only once its directory is fsync'd.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(Digest::from_sha256(hasher.finalize().into())),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// A committed blob. Holds its file open, so it stays readable even if evicted meanwhile.
#[derive(Clone, Debug)]
pub struct Blob {
    digest: Digest,
    len: u64,
    file: Arc<File>,
    /// Keeps the entry from eviction while this handle (and so a response) is alive.
    lease: Option<Arc<()>>,
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
        // A committed blob is a finished fill; one reader implementation serves both.
        Fill::committed(self.clone()).read_range(start, end)
    }
}

/// A handle on a download in progress (or finished). Clones observe the same download.
#[derive(Clone)]
pub struct Fill {
    digest: Digest,
    /// Read handle on the temp file (which becomes the committed blob). None only for a fill that
    /// failed before it had a file.
    file: Option<Arc<File>>,
    progress: watch::Receiver<Progress>,
}

#[derive(Clone)]
struct Progress {
    /// Bytes written to the file; readers never read past this.
    written: u64,
    /// The total length, once upstream announced it (or the fill committed).
    len: Option<u64>,
    /// Upstream answered with a body: bytes may start to flow, even when `len` is unknown.
    started: bool,
    /// See `Fetched::gated`: nothing is readable before the commit.
    gated: bool,
    state: FillState,
}

#[derive(Clone)]
enum FillState {
    Running,
    Committed(Blob),
    Failed(StoreError),
}

impl Fill {
    fn committed(blob: Blob) -> Fill {
        let progress = Progress {
            written: blob.len,
            len: Some(blob.len),
            started: true,
            gated: false,
            state: FillState::Committed(blob.clone()),
        };
        Fill {
            digest: blob.digest,
            file: Some(blob.file),
            progress: watch::channel(progress).1,
        }
    }

    fn failed(digest: Digest, err: StoreError) -> Fill {
        let progress = Progress {
            written: 0,
            len: None,
            started: false,
            gated: false,
            state: FillState::Failed(err),
        };
        Fill {
            digest,
            file: None,
            progress: watch::channel(progress).1,
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Waits until upstream has answered with a body; returns the total length if upstream
    /// announced it. Bytes can be streamed from here on even when the length is unknown.
    pub async fn started(&self) -> Result<Option<u64>, StoreError> {
        let p = self
            .wait_for(|p| (p.started && !p.gated) || !matches!(p.state, FillState::Running))
            .await?;
        match p.state {
            FillState::Failed(err) => Err(err),
            _ => Ok(p.len),
        }
    }

    /// Waits until the total length is known: announced by upstream, or the fill finished.
    // Async and fallible, unlike a collection's: an `is_empty` would only be `len().await? == 0`.
    #[allow(clippy::len_without_is_empty)]
    pub async fn len(&self) -> Result<u64, StoreError> {
        let p = self
            .wait_for(|p| p.len.is_some() || !matches!(p.state, FillState::Running))
            .await?;
        match (p.state, p.len) {
            (FillState::Failed(err), _) => Err(err),
            (_, Some(len)) => Ok(len),
            // Unreachable: a commit always sets `len`.
            (_, None) => Err(StoreError::Aborted {
                digest: self.digest,
            }),
        }
    }

    /// Resolves when the blob is committed, or with the fill's error.
    pub async fn done(&self) -> Result<Blob, StoreError> {
        match self
            .wait_for(|p| !matches!(p.state, FillState::Running))
            .await?
            .state
        {
            FillState::Committed(blob) => Ok(blob),
            FillState::Failed(err) => Err(err),
            FillState::Running => Err(StoreError::Aborted {
                digest: self.digest,
            }),
        }
    }

    async fn wait_for(&self, f: impl FnMut(&Progress) -> bool) -> Result<Progress, StoreError> {
        let mut rx = self.progress.clone();
        let p = rx.wait_for(f).await.map_err(|_| StoreError::Aborted {
            digest: self.digest,
        })?;
        Ok(p.clone())
    }

    /// Streams bytes `[start, end)` (`end` None = to the end; clamped to the blob) as they are written.
    ///
    /// When the read's end is known, its last chunk is held back until the fill has verified and
    /// committed the blob: a client given a Content-Length treats the final byte as "body complete",
    /// so it must never get there on content that then fails verification. Without a known end the
    /// response is chunked, and the error terminates it before the final chunk instead.
    pub fn read_range(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        let reader = Reader {
            fill: self.clone(),
            rx: self.progress.clone(),
            start,
            pos: start,
            end,
            finished: false,
        };
        futures_util::stream::unfold(reader, |mut r| async move {
            r.next().await.map(|item| (item, r))
        })
    }
}

struct Reader {
    fill: Fill,
    rx: watch::Receiver<Progress>,
    start: u64,
    pos: u64,
    end: Option<u64>,
    finished: bool,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<Bytes, StoreError>> {
        if self.finished {
            return None;
        }
        let item = self.step().await.transpose();
        self.finished = !matches!(item, Some(Ok(_)));
        item
    }

    async fn step(&mut self) -> Result<Option<Bytes>, StoreError> {
        let digest = self.fill.digest;
        loop {
            let (written, len, committed) = {
                let p = self.rx.borrow_and_update();
                match &p.state {
                    FillState::Failed(err) => return Err(err.clone()),
                    FillState::Running if p.gated => (0, None, false),
                    state => (p.written, p.len, matches!(state, FillState::Committed(_))),
                }
            };
            if let Some(len) = len {
                if self.start > len || self.end.is_some_and(|end| end < self.start) {
                    return Err(StoreError::RangeNotSatisfiable {
                        digest,
                        start: self.start,
                        end: self.end,
                        len,
                    });
                }
            }
            let end = match (self.end, len) {
                (Some(end), Some(len)) => Some(end.min(len)),
                (end, len) => end.or(len),
            };
            if committed && end == Some(self.pos) {
                return Ok(None);
            }
            let available = end.map_or(written, |end| end.min(written));
            if available > self.pos {
                let n = (available - self.pos).min(READ_CHUNK);
                let is_last = end == Some(self.pos + n);
                if committed || !is_last {
                    let file = self
                        .fill
                        .file
                        .clone()
                        .ok_or(StoreError::Aborted { digest })?;
                    let bytes = pread(file, self.pos, n, digest).await?;
                    self.pos += n;
                    return Ok(Some(bytes));
                }
            }
            // Nothing new to hand out yet: wait for the writer (or the verdict on the last chunk).
            if self.rx.changed().await.is_err() {
                return Err(StoreError::Aborted { digest });
            }
        }
    }
}

/// A positional read (no shared cursor, so any number of readers share one fd) off the runtime.
async fn pread(
    file: Arc<File>,
    offset: u64,
    len: u64,
    digest: Digest,
) -> Result<Bytes, StoreError> {
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)
            .map(|()| Bytes::from(buf))
    })
    .await
    .unwrap_or_else(|join| Err(io::Error::other(join)));
    read.map_err(|source| StoreError::Read {
        digest,
        source: Arc::new(source),
    })
}

/// Owns a fill's terminal bookkeeping, so it also happens if the task panics or is dropped at shutdown.
struct FillGuard {
    inner: Arc<Inner>,
    digest: Digest,
    tmp_path: PathBuf,
    tx: watch::Sender<Progress>,
    finished: bool,
}

impl FillGuard {
    fn finish(&mut self, result: Result<Blob, StoreError>) {
        self.finished = true;
        let digest = self.digest;
        match &result {
            Ok(blob) => {
                let mut index = lock(&self.inner.index);
                index.total += blob.len;
                let mut entry = Entry::new(blob.len, true, SystemTime::now());
                if let Some(lease) = &blob.lease {
                    entry.lease = Arc::downgrade(lease);
                }
                // A re-fill of an evicted-then-recreated entry replaces it; keep the total honest.
                if let Some(old) = index.entries.insert(digest, entry) {
                    index.total -= old.size;
                }
                drop(index);
                info!(%digest, bytes = blob.len, "blob committed");
                // notify_one keeps a permit when nobody waits: the lifecycle loop (the one
                // waiter) may be busy evicting when this commit lands, and must still see it.
                self.inner.committed.notify_one();
            }
            Err(err) => {
                // Before readers learn of the failure, so a retry never sees this attempt's leftovers.
                // A fill cut short by shutdown keeps its partial: the next run resumes it. Any other
                // failure (a mismatch, upstream refusing) starts the next attempt from zero.
                if !matches!(err, StoreError::Aborted { .. }) {
                    resume::discard(&self.tmp_path);
                }
                let _ = fs::remove_file(meta_tmp_path(&self.tmp_path));
                // A fetch that never started is upstream saying no (a 401 before the client
                // authenticates is routine); its caller relays that. A fill that started and
                // then failed is worth a warning.
                if self.tx.borrow().started {
                    warn!(%digest, %err, "fill failed");
                } else {
                    debug!(%digest, %err, "fill did not start");
                }
            }
        }
        // Leave `inflight` before announcing the result: a caller that sees the failure and retries must
        // start a new fetch, not join this one. (On success the index already answers.)
        {
            let mut inflight = lock(&self.inner.inflight);
            if inflight
                .get(&digest)
                .is_some_and(|f| f.progress.same_channel(&self.tx.subscribe()))
            {
                inflight.remove(&digest);
            }
        }
        self.tx.send_modify(|p| {
            if let Ok(blob) = &result {
                p.len = Some(blob.len);
            }
            p.state = match result {
                Ok(blob) => FillState::Committed(blob),
                Err(err) => FillState::Failed(err),
            };
        });
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(Err(StoreError::Aborted {
                digest: self.digest,
            }));
        }
    }
}

async fn run_fill<F, Fut, S, E1, E2>(
    mut guard: FillGuard,
    writer: File,
    read_file: Option<Arc<File>>,
    fetch: F,
) where
    F: FnOnce(u64) -> Fut,
    Fut: Future<Output = Result<Fetched<S>, E1>>,
    S: Stream<Item = Result<Bytes, E2>>,
    E1: Into<BoxError> + Send,
    E2: Into<BoxError> + Send,
{
    let result = download(&guard, writer, fetch).await;
    let result = result.and_then(|len| {
        let file = read_file.ok_or(StoreError::Aborted {
            digest: guard.digest,
        })?;
        Ok(Blob {
            digest: guard.digest,
            len,
            file,
            lease: Some(Arc::new(())),
        })
    });
    guard.finish(result);
}

/// A batch being hashed and written on a blocking thread; its task hands the hasher back.
struct InFlightWrite {
    len: u64,
    task: tokio::task::JoinHandle<io::Result<Sha256>>,
}

/// Waits for the batch in flight, if any: takes the hasher back, counts its bytes as
/// written and tells the fill's readers, whose preads find them in the file from now on.
async fn finish_write(
    in_flight: &mut Option<InFlightWrite>,
    hasher: &mut Option<Sha256>,
    written: &mut u64,
    guard: &FillGuard,
) -> Result<(), StoreError> {
    let Some(write) = in_flight.take() else {
        return Ok(());
    };
    let done = write.task.await;
    write_done(done, write.len, hasher, written, guard)
}

/// A batch's write ended: the hasher comes back and its `len` bytes count as written.
fn write_done(
    done: Result<io::Result<Sha256>, tokio::task::JoinError>,
    len: u64,
    hasher: &mut Option<Sha256>,
    written: &mut u64,
    guard: &FillGuard,
) -> Result<(), StoreError> {
    let back = done
        .unwrap_or_else(|join| Err(io::Error::other(join)))
        .map_err(io_err("write", &guard.tmp_path))?;
    *hasher = Some(back);
    *written += len;
    guard.tx.send_modify(|p| p.written = *written);
    Ok(())
}

/// Streams upstream into the partial file (after the verified prefix a crashed run left), hashing
/// as it goes and checkpointing now and then, then verifies and commits. Returns the committed
/// length.
async fn download<F, Fut, S, E1, E2>(
    guard: &FillGuard,
    writer: File,
    fetch: F,
) -> Result<u64, StoreError>
where
    F: FnOnce(u64) -> Fut,
    Fut: Future<Output = Result<Fetched<S>, E1>>,
    S: Stream<Item = Result<Bytes, E2>>,
    E1: Into<BoxError> + Send,
    E2: Into<BoxError> + Send,
{
    let digest = guard.digest;
    let upstream = |err: BoxError| StoreError::Upstream {
        digest,
        source: Arc::from(err),
    };
    let writer = Arc::new(writer);

    let prefix = {
        let (w, path) = (writer.clone(), guard.tmp_path.clone());
        tokio::task::spawn_blocking(move || resume::recover(&path, &w))
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join)))
            .map_err(io_err("resume", &guard.tmp_path))?
    };
    if prefix.len > 0 {
        info!(%digest, bytes = prefix.len, "resuming a fill from its verified prefix");
    }
    let Fetched {
        body,
        len,
        offset,
        gated,
    } = fetch(prefix.len).await.map_err(|e| upstream(e.into()))?;
    // Bytes at the front of the body that the prefix already holds (upstream ignored the Range).
    let mut skip = match offset {
        0 => prefix.len,
        o if o == prefix.len => 0,
        o => {
            let odd: BoxError = format!(
                "upstream sent the blob from byte {o}, asked from {}",
                prefix.len
            )
            .into();
            return Err(upstream(odd));
        }
    };
    if let Some(expected) = len.filter(|&l| l < prefix.len) {
        return Err(StoreError::LengthMismatch {
            digest,
            expected,
            actual: prefix.len,
        });
    }
    guard.tx.send_modify(|p| {
        p.len = len;
        p.started = true;
        p.gated = gated;
        p.written = prefix.len;
    });

    // Fused: the batching below may see the end, after which the stream must not be polled again.
    let mut body = pin!(body.fuse());
    let mut hasher = Some(prefix.hasher);
    let mut written = prefix.len;
    let mut checkpointed = prefix.len;
    // One batch is hashed and written on a blocking thread while the next one is read (and,
    // for TLS or a peer's data port, decrypted) here: the two overlap on two cores instead
    // of taking turns.
    let mut in_flight: Option<InFlightWrite> = None;
    loop {
        // The next chunk; a write that completes meanwhile is published at once, so readers
        // streaming from this fill never wait for the next chunk to see the last one.
        let next = loop {
            let Some(write) = in_flight.as_mut() else {
                break body.next().await;
            };
            tokio::select! {
                done = &mut write.task => {
                    let len = write.len;
                    in_flight = None;
                    write_done(done, len, &mut hasher, &mut written, guard)?;
                }
                next = body.next() => break next,
            }
        };
        let Some(first) = next else {
            break;
        };
        // Batch whatever else is already buffered, so a fast upstream costs one blocking hop per
        // ~1 MiB rather than per 16 KiB frame, without ever waiting for more data.
        let (mut batch, mut batch_len, mut failed) = match first {
            Ok(chunk) => {
                let len = chunk.len();
                (vec![chunk], len, None)
            }
            Err(e) => (Vec::new(), 0, Some(e)),
        };
        while failed.is_none() && batch_len < WRITE_BATCH {
            match body.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    batch_len += chunk.len();
                    batch.push(chunk);
                }
                Some(Some(Err(e))) => failed = Some(e),
                _ => break,
            }
        }
        if let Some(e) = failed {
            // The batch in flight is finished first, so a resume keeps its bytes.
            finish_write(&mut in_flight, &mut hasher, &mut written, guard).await?;
            return Err(upstream(e.into()));
        }
        if skip > 0 {
            for chunk in batch.iter_mut() {
                let n = skip.min(chunk.len() as u64);
                *chunk = chunk.slice(n as usize..);
                skip -= n;
            }
            batch_len = batch.iter().map(Bytes::len).sum();
            if batch_len == 0 {
                continue;
            }
        }
        // The previous batch is in the file (and its bytes in the hash) before this one goes.
        finish_write(&mut in_flight, &mut hasher, &mut written, guard).await?;
        if let Some(expected) = len {
            if written + batch_len as u64 > expected {
                return Err(StoreError::LengthMismatch {
                    digest,
                    expected,
                    actual: written + batch_len as u64,
                });
            }
        }
        let checkpoint = written + batch_len as u64 - checkpointed >= resume::CHECKPOINT_EVERY;
        if checkpoint {
            checkpointed = written + batch_len as u64;
        }
        // Hashing a MiB takes long enough to stall other tasks, so it rides the blocking hop too.
        let w = writer.clone();
        let tmp_path = guard.tmp_path.clone();
        let at = written;
        let mut batch_hasher = hasher.take().expect("the hasher is back after each write");
        in_flight = Some(InFlightWrite {
            len: batch_len as u64,
            task: tokio::task::spawn_blocking(move || {
                let mut pos = at;
                for chunk in &batch {
                    batch_hasher.update(chunk);
                    w.write_all_at(chunk, pos)?;
                    pos += chunk.len() as u64;
                }
                if checkpoint {
                    // Best effort: a missed checkpoint only means more to fetch after a crash.
                    if let Err(err) = resume::write_checkpoint(&tmp_path, pos, &batch_hasher) {
                        debug!(%err, "fill checkpoint not written");
                    }
                }
                Ok(batch_hasher)
            }),
        });
    }
    finish_write(&mut in_flight, &mut hasher, &mut written, guard).await?;
    let hasher = hasher.expect("the hasher is back after the last write");
    if skip > 0 {
        let short: BoxError = "upstream's body ended inside the prefix already held".into();
        return Err(upstream(short));
    }

    if let Some(expected) = len.filter(|&l| l != written) {
        return Err(StoreError::LengthMismatch {
            digest,
            expected,
            actual: written,
        });
    }
    let actual = Digest::from_sha256(hasher.finalize().into());
    if actual != digest {
        return Err(StoreError::DigestMismatch {
            expected: digest,
            actual,
        });
    }

    let inner = guard.inner.clone();
    let tmp_path = guard.tmp_path.clone();
    tokio::task::spawn_blocking(move || inner.commit(&digest, &tmp_path, &writer, written))
        .await
        .unwrap_or_else(|join| Err(io_err("commit", &guard.tmp_path)(io::Error::other(join))))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    const T: Duration = Duration::from_secs(10);

    type Chunk = Result<Bytes, io::Error>;
    type FetchFut = futures_util::future::Ready<
        Result<Fetched<futures_util::stream::BoxStream<'static, Chunk>>, io::Error>,
    >;

    fn content(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
            .collect()
    }

    /// An upstream whose body the test feeds chunk by chunk, counting how often it is fetched.
    #[derive(Clone)]
    struct FakeUpstream {
        calls: Arc<AtomicUsize>,
        body: Arc<Mutex<Option<mpsc::UnboundedReceiver<Chunk>>>>,
        len: Option<u64>,
    }

    impl FakeUpstream {
        fn new(len: Option<u64>) -> (FakeUpstream, mpsc::UnboundedSender<Chunk>) {
            let (tx, rx) = mpsc::unbounded_channel();
            let up = FakeUpstream {
                calls: Arc::default(),
                body: Arc::new(Mutex::new(Some(rx))),
                len,
            };
            (up, tx)
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        /// Always the whole body, as an upstream that ignores Range does.
        fn fetch(&self) -> impl FnOnce(u64) -> FetchFut + Send + 'static {
            let up = self.clone();
            move |_from| {
                up.calls.fetch_add(1, Ordering::SeqCst);
                let mut rx = lock(&up.body).take().expect("body fetched twice");
                let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
                futures_util::future::ready(Ok(Fetched::whole(body.boxed(), up.len)))
            }
        }
    }

    /// A whole body at once, in 7000-byte chunks (deliberately not aligned to anything).
    fn fetch_bytes(
        data: Vec<u8>,
        len: Option<u64>,
    ) -> impl FnOnce(u64) -> FetchFut + Send + 'static {
        move |_from| {
            let chunks: Vec<Chunk> = data
                .chunks(7000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            futures_util::future::ready(Ok(Fetched::whole(
                futures_util::stream::iter(chunks).boxed(),
                len,
            )))
        }
    }

    /// An upstream that honours Range: the body from the asked offset, recording each offset.
    fn fetch_range(
        data: Vec<u8>,
        asked: Arc<Mutex<Vec<u64>>>,
    ) -> impl FnOnce(u64) -> FetchFut + Send + 'static {
        move |from| {
            lock(&asked).push(from);
            let len = Some(data.len() as u64);
            let chunks: Vec<Chunk> = data[from as usize..]
                .chunks(7000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            futures_util::future::ready(Ok(Fetched {
                body: futures_util::stream::iter(chunks).boxed(),
                len,
                offset: from,
                gated: false,
            }))
        }
    }

    async fn collect(
        stream: impl Stream<Item = Result<Bytes, StoreError>>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut stream = pin!(stream);
        let mut out = Vec::new();
        while let Some(chunk) = timeout(T, stream.next()).await.expect("read stalled") {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    fn dir_entries(path: &Path) -> Vec<PathBuf> {
        fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// After a failed fill: nothing committed, nothing left behind, nothing in flight.
    fn assert_clean(store: &Store, root: &Path, digest: &Digest) {
        assert!(store.get(digest).is_none());
        assert!(store.in_flight(digest).is_none());
        assert_eq!(store.size_bytes(), 0);
        for sub in ["tmp", "blobs/sha256", "meta/sha256"] {
            assert_eq!(
                dir_entries(&root.join("store").join(sub)),
                Vec::<PathBuf>::new(),
                "{sub}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fills_share_one_fetch_and_stream_progressively() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(3 * READ_CHUNK as usize + 12345);
        let digest = Digest::of(&data);
        let (up, tx) = FakeUpstream::new(Some(data.len() as u64));

        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let (first_tx, mut first_rx) = mpsc::unbounded_channel();
        let mut readers = Vec::new();
        for _ in 0..8 {
            let (store, fetch, barrier, first_tx) =
                (store.clone(), up.fetch(), barrier.clone(), first_tx.clone());
            readers.push(tokio::spawn(async move {
                barrier.wait().await;
                let fill = store.fill(&digest, fetch);
                let mut stream = pin!(fill.read_range(0, None));
                let mut got = Vec::new();
                while let Some(chunk) = stream.next().await {
                    if got.is_empty() {
                        first_tx.send(()).unwrap();
                    }
                    got.extend_from_slice(&chunk.unwrap());
                }
                got
            }));
        }

        // Only the first chunk: every reader must get it while upstream still holds back the rest.
        tx.send(Ok(Bytes::copy_from_slice(&data[..1000]))).unwrap();
        for _ in 0..8 {
            timeout(T, first_rx.recv())
                .await
                .expect("reader got no early bytes")
                .unwrap();
        }
        for chunk in data[1000..].chunks(64 * 1024) {
            tx.send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
        }
        drop(tx);

        for reader in readers {
            assert!(timeout(T, reader).await.unwrap().unwrap() == data);
        }
        assert_eq!(up.calls(), 1);
        assert_eq!(store.get(&digest).unwrap().len(), data.len() as u64);
        assert_eq!(store.size_bytes(), data.len() as u64);
        assert!(store.in_flight(&digest).is_none());
        assert_eq!(
            dir_entries(&dir.path().join("store/tmp")),
            Vec::<PathBuf>::new()
        );
    }

    #[tokio::test]
    async fn a_commit_while_nobody_waits_is_still_seen_by_the_next_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(1000);
        let digest = Digest::of(&data);
        let (up, tx) = FakeUpstream::new(Some(data.len() as u64));
        let fill = store.fill(&digest, up.fetch());
        tx.send(Ok(Bytes::from(data.clone()))).unwrap();
        drop(tx);
        assert_eq!(collect(fill.read_range(0, None)).await.unwrap(), data);
        // Committed before anyone called next_commit (the lifecycle was busy).
        timeout(T, store.next_commit())
            .await
            .expect("the commit was lost");
    }

    #[tokio::test]
    async fn final_chunk_is_held_until_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(READ_CHUNK as usize + 100);
        let digest = Digest::of(&data);
        let (up, tx) = FakeUpstream::new(Some(data.len() as u64));
        let fill = store.fill(&digest, up.fetch());
        // All bytes, but the body has not ended, so the hash is not checked yet.
        tx.send(Ok(Bytes::from(data.clone()))).unwrap();

        let mut stream = pin!(fill.read_range(0, None));
        let first = timeout(T, stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.len(), READ_CHUNK as usize);
        assert!(
            timeout(Duration::from_millis(200), stream.next())
                .await
                .is_err(),
            "the final chunk must wait for verification"
        );
        drop(tx);
        let rest = collect(stream).await.unwrap();
        assert_eq!([&first[..], &rest[..]].concat(), data);
    }

    #[tokio::test]
    async fn read_range_during_fill_and_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(2 * READ_CHUNK as usize + 5000);
        let len = data.len() as u64;
        let digest = Digest::of(&data);
        let (up, tx) = FakeUpstream::new(Some(len));
        let fill = store.fill(&digest, up.fetch());
        assert_eq!(timeout(T, fill.len()).await.unwrap().unwrap(), len);

        let half = data.len() / 2;
        tx.send(Ok(Bytes::copy_from_slice(&data[..half]))).unwrap();
        // A bounded range starting mid-way gets its first bytes while the fill is still running.
        let mut bounded = Box::pin(fill.read_range(100, Some(300_000)));
        let first = timeout(T, bounded.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(&first[..], &data[100..100 + READ_CHUNK as usize]);
        // Ranges that start beyond what has been written wait for it.
        let tail = tokio::spawn(collect(fill.read_range(half as u64 + 10, None)));
        let last_byte = tokio::spawn(collect(fill.read_range(len - 1, Some(len))));
        for chunk in data[half..].chunks(10_000) {
            tx.send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
        }
        drop(tx);
        let rest = collect(bounded).await.unwrap();
        assert_eq!([&first[..], &rest[..]].concat(), &data[100..300_000]);
        assert_eq!(tail.await.unwrap().unwrap(), &data[half + 10..]);
        assert_eq!(last_byte.await.unwrap().unwrap(), &data[data.len() - 1..]);

        let blob = timeout(T, fill.done()).await.unwrap().unwrap();
        let same = store.get(&digest).unwrap();
        for blob in [blob, same] {
            assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
            assert_eq!(
                collect(blob.read_range(5, Some(10))).await.unwrap(),
                &data[5..10]
            );
            assert_eq!(
                collect(blob.read_range(len - 3, None)).await.unwrap(),
                &data[data.len() - 3..]
            );
            assert_eq!(collect(blob.read_range(len, None)).await.unwrap(), b"");
            // An end past the blob is clamped, as HTTP does for last-byte-pos.
            assert_eq!(
                collect(blob.read_range(0, Some(len + 100))).await.unwrap(),
                data
            );
            let err = collect(blob.read_range(len + 1, None)).await.unwrap_err();
            assert!(
                matches!(err, StoreError::RangeNotSatisfiable { .. }),
                "{err}"
            );
            let err = collect(blob.read_range(10, Some(5))).await.unwrap_err();
            assert!(
                matches!(err, StoreError::RangeNotSatisfiable { .. }),
                "{err}"
            );
        }
        // The fill handle keeps working after commit too.
        assert_eq!(
            collect(fill.read_range(7, Some(70_000))).await.unwrap(),
            &data[7..70_000]
        );
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test]
    async fn an_unknown_length_fill_starts_before_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(50_000);
        let digest = Digest::of(&data);
        let (up, tx) = FakeUpstream::new(None);
        let fill = store.fill(&digest, up.fetch());
        // Upstream has answered but sent nothing yet: the fill has started, length unknown.
        assert_eq!(fill.started().await.unwrap(), None);
        tx.send(Ok(Bytes::copy_from_slice(&data))).unwrap();
        drop(tx);
        assert_eq!(fill.len().await.unwrap(), data.len() as u64);
        assert_eq!(fill.started().await.unwrap(), Some(data.len() as u64));
    }

    #[tokio::test]
    async fn unknown_length_is_learned_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(50_000);
        let digest = Digest::of(&data);
        let (up, tx) = FakeUpstream::new(None);
        let fill = store.fill(&digest, up.fetch());
        let len = tokio::spawn({
            let fill = fill.clone();
            async move { fill.len().await }
        });
        let mut stream = Box::pin(fill.read_range(0, None));
        tx.send(Ok(Bytes::copy_from_slice(&data[..20_000])))
            .unwrap();
        // Without a known end nothing is held back: the body is chunked, and a failure cuts it short.
        let first = timeout(T, stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(&first[..], &data[..20_000]);
        assert!(!len.is_finished());
        tx.send(Ok(Bytes::copy_from_slice(&data[20_000..])))
            .unwrap();
        drop(tx);
        assert_eq!(collect(stream).await.unwrap(), &data[20_000..]);
        assert_eq!(
            timeout(T, len).await.unwrap().unwrap().unwrap(),
            data.len() as u64
        );
    }

    #[tokio::test]
    async fn dropped_readers_do_not_abort_the_fill() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(300_000);
        let digest = Digest::of(&data);
        let (up, tx) = FakeUpstream::new(Some(data.len() as u64));
        let fill = store.fill(&digest, up.fetch());
        let mut stream = Box::pin(fill.read_range(0, None));
        tx.send(Ok(Bytes::copy_from_slice(&data[..1000]))).unwrap();
        timeout(T, stream.next()).await.unwrap().unwrap().unwrap();
        // The client goes away: its stream and every handle on the fill.
        drop(stream);
        drop(fill);
        for chunk in data[1000..].chunks(4096) {
            tx.send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
        }
        drop(tx);
        // A later request joins the running fill or finds the committed blob; it never refetches.
        let (unused, _tx) = FakeUpstream::new(None);
        let blob = timeout(T, store.fill(&digest, unused.fetch()).done())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(unused.calls(), 0);
        assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
        assert!(store.get(&digest).is_some());
    }

    #[tokio::test]
    async fn digest_mismatch_fails_cleanly_and_a_retry_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(100_000);
        let digest = Digest::of(&data);
        let mut wrong = data.clone();
        wrong[54_321] ^= 1;

        let fill = store.fill(&digest, fetch_bytes(wrong, Some(data.len() as u64)));
        let reader = tokio::spawn(collect(fill.read_range(0, None)));
        let err = timeout(T, fill.done()).await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let err = reader.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(collect(fill.read_range(0, None)).await.is_err());
        assert_clean(&store, dir.path(), &digest);

        let blob = store
            .fill(&digest, fetch_bytes(data.clone(), None))
            .done()
            .await
            .unwrap();
        assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
        assert_eq!(store.size_bytes(), data.len() as u64);
    }

    /// A gated fill (bytes from a peer) shows readers nothing before the commit: corrupt
    /// bytes fail the fill before any client got a byte of them.
    #[tokio::test]
    async fn a_gated_fill_hands_out_nothing_before_it_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(300_000);
        let digest = Digest::of(&data);
        let gated = |bytes: Vec<u8>| {
            let len = Some(bytes.len() as u64);
            move |_from: u64| {
                let chunks: Vec<Chunk> = bytes
                    .chunks(7000)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                futures_util::future::ready(Ok::<_, io::Error>(Fetched {
                    body: futures_util::stream::iter(chunks).boxed(),
                    len,
                    offset: 0,
                    gated: true,
                }))
            }
        };
        let mut wrong = data.clone();
        wrong[123] ^= 1;
        let fill = store.fill(&digest, gated(wrong));
        let mut reader = Box::pin(fill.read_range(0, None));
        let first = timeout(T, reader.next()).await.unwrap().unwrap();
        assert!(matches!(first, Err(StoreError::DigestMismatch { .. })));
        assert!(timeout(T, fill.started()).await.unwrap().is_err());
        assert_clean(&store, dir.path(), &digest);

        let fill = store.fill(&digest, gated(data.clone()));
        assert_eq!(
            timeout(T, fill.started()).await.unwrap().unwrap(),
            Some(data.len() as u64)
        );
        assert!(
            store.get(&digest).is_some(),
            "started() waited for the commit"
        );
        assert_eq!(collect(fill.read_range(0, None)).await.unwrap(), data);
    }

    #[tokio::test]
    async fn length_mismatch_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(20_000);
        let digest = Digest::of(&data);
        for announced in [10_000, 30_000] {
            let fill = store.fill(&digest, fetch_bytes(data.clone(), Some(announced)));
            let err = timeout(T, fill.done()).await.unwrap().unwrap_err();
            assert!(
                matches!(err, StoreError::LengthMismatch { expected, .. } if expected == announced),
                "{err}"
            );
            assert_clean(&store, dir.path(), &digest);
        }
    }

    #[tokio::test]
    async fn upstream_error_fails_cleanly_and_a_retry_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = content(100_000);
        let digest = Digest::of(&data);

        // Mid-stream.
        let (up, tx) = FakeUpstream::new(Some(data.len() as u64));
        let fill = store.fill(&digest, up.fetch());
        let mut stream = Box::pin(fill.read_range(0, None));
        tx.send(Ok(Bytes::copy_from_slice(&data[..40_000])))
            .unwrap();
        let first = timeout(T, stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(&first[..], &data[..40_000]);
        tx.send(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "reset by peer",
        )))
        .unwrap();
        let err = collect(stream).await.unwrap_err();
        assert!(matches!(err, StoreError::Upstream { .. }), "{err}");
        assert!(err.to_string().contains("reset by peer"), "{err}");
        assert!(fill.done().await.is_err());
        assert_clean(&store, dir.path(), &digest);

        // At the fetch itself (say, upstream answered 503).
        let fill = store.fill(&digest, |_| async {
            Err::<Fetched<futures_util::stream::Empty<Chunk>>, _>(io::Error::other("503"))
        });
        assert!(matches!(fill.len().await, Err(StoreError::Upstream { .. })));
        assert!(matches!(
            fill.done().await,
            Err(StoreError::Upstream { .. })
        ));
        assert_clean(&store, dir.path(), &digest);

        let blob = store.fill(&digest, fetch_bytes(data.clone(), Some(data.len() as u64)));
        assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
        assert!(store.get(&digest).is_some());
    }

    /// A partial file and checkpoint as a killed eddy leaves them: `written` bytes of `data`, the
    /// first `checkpointed` of them recorded.
    fn crashed_fill(dir: &Path, data: &[u8], written: usize, checkpointed: usize) -> PathBuf {
        let tmp = dir.join("store/tmp");
        fs::create_dir_all(&tmp).unwrap();
        let partial = resume::partial_path(&tmp, &Digest::of(data));
        fs::write(&partial, &data[..written]).unwrap();
        let prefix = Sha256::new().chain_update(&data[..checkpointed]);
        resume::write_checkpoint(&partial, checkpointed as u64, &prefix).unwrap();
        partial
    }

    #[tokio::test]
    async fn a_crashed_fill_resumes_from_its_verified_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(300_000);
        let digest = Digest::of(&data);
        let partial = crashed_fill(dir.path(), &data, 180_000, 150_000);
        let store = Store::open(dir.path()).unwrap();
        assert!(partial.exists(), "open must keep a resumable partial");
        let asked = Arc::new(Mutex::new(Vec::new()));
        let fill = store.fill(&digest, fetch_range(data.clone(), asked.clone()));
        // A reader from byte 0 gets the prefix from disk and the rest from upstream.
        assert_eq!(collect(fill.read_range(0, None)).await.unwrap(), data);
        fill.done().await.unwrap();
        assert_eq!(*lock(&asked), vec![150_000]);
        assert_eq!(
            dir_entries(&dir.path().join("store/tmp")),
            Vec::<PathBuf>::new()
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.scrub().await, 0);
        assert!(store.get(&digest).is_some());
    }

    #[tokio::test]
    async fn a_corrupt_prefix_is_discarded_and_the_fill_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(300_000);
        let digest = Digest::of(&data);
        let partial = crashed_fill(dir.path(), &data, 200_000, 200_000);
        // Bit rot (or a power loss before the bytes were durable) inside the checkpointed prefix.
        let f = OpenOptions::new().write(true).open(&partial).unwrap();
        f.write_all_at(&[0u8; 4096], 65_536).unwrap();
        drop(f);
        let store = Store::open(dir.path()).unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let fill = store.fill(&digest, fetch_range(data.clone(), asked.clone()));
        assert_eq!(collect(fill.read_range(0, None)).await.unwrap(), data);
        fill.done().await.unwrap();
        assert_eq!(
            *lock(&asked),
            vec![0],
            "a corrupt prefix must be fetched again"
        );
        assert_eq!(store.scrub().await, 0);
    }

    #[tokio::test]
    async fn upstream_ignoring_the_range_still_completes_the_fill() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(300_000);
        let digest = Digest::of(&data);
        crashed_fill(dir.path(), &data, 100_000, 100_000);
        let store = Store::open(dir.path()).unwrap();
        // A 200 with the whole body: the store skips the 100,000 bytes it already holds.
        let fill = store.fill(&digest, fetch_bytes(data.clone(), Some(data.len() as u64)));
        let tail = collect(fill.read_range(250_000, None)).await.unwrap();
        assert_eq!(tail, &data[250_000..]);
        let blob = fill.done().await.unwrap();
        assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
    }

    #[tokio::test]
    async fn a_failed_fill_does_not_leave_a_partial_to_resume() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(100_000);
        let digest = Digest::of(&data);
        crashed_fill(dir.path(), &data, 60_000, 60_000);
        let store = Store::open(dir.path()).unwrap();
        let mut wrong = data.clone();
        wrong[90_000] ^= 1;
        let asked = Arc::new(Mutex::new(Vec::new()));
        let fill = store.fill(&digest, fetch_range(wrong, asked.clone()));
        assert!(matches!(
            fill.done().await,
            Err(StoreError::DigestMismatch { .. })
        ));
        assert_eq!(*lock(&asked), vec![60_000]);
        assert_clean(&store, dir.path(), &digest);
        // The next attempt starts from zero.
        let asked = Arc::new(Mutex::new(Vec::new()));
        store
            .fill(&digest, fetch_range(data.clone(), asked.clone()))
            .done()
            .await
            .unwrap();
        assert_eq!(*lock(&asked), vec![0]);
    }

    /// A runtime torn down mid-fill (as at shutdown) keeps the partial and its checkpoints; the
    /// next store resumes from the last checkpoint.
    #[test]
    fn a_fill_interrupted_by_shutdown_is_resumed_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(3 * resume::CHECKPOINT_EVERY as usize);
        let digest = Digest::of(&data);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = Store::open(dir.path()).unwrap();
            let (up, tx) = FakeUpstream::new(Some(data.len() as u64));
            let fill = store.fill(&digest, up.fetch());
            let half = data.len() / 2;
            for chunk in data[..half].chunks(64 * 1024) {
                tx.send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
            }
            let got = collect_n(fill.read_range(0, None), half).await;
            assert_eq!(got, &data[..half]);
            std::mem::forget(tx);
        });
        drop(rt);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = Store::open(dir.path()).unwrap();
            let asked = Arc::new(Mutex::new(Vec::new()));
            let blob = store
                .fill(&digest, fetch_range(data.clone(), asked.clone()))
                .done()
                .await
                .unwrap();
            let from = lock(&asked).clone();
            assert_eq!(from.len(), 1);
            assert!(
                from[0] >= resume::CHECKPOINT_EVERY && from[0] <= data.len() as u64 / 2,
                "resumed from {from:?}"
            );
            assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
        });
    }

    async fn collect_n(stream: impl Stream<Item = Result<Bytes, StoreError>>, n: usize) -> Vec<u8> {
        let mut stream = pin!(stream);
        let mut out = Vec::new();
        while out.len() < n {
            let chunk = timeout(T, stream.next()).await.expect("read stalled");
            out.extend_from_slice(&chunk.unwrap().unwrap());
        }
        out
    }

    #[test]
    fn a_blob_too_large_for_the_disk_is_refused_without_switching_proxy_only_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let free = store.free_bytes().unwrap();
        assert!(free > 2 * MIN_FREE_BYTES, "the test needs a disk with room");
        assert!(!store.admits(free), "a blob as large as the free space");
        assert!(
            !store.stats().proxy_only,
            "one large blob is not a full disk"
        );
        assert!(store.admits(1 << 20), "a small blob right after it");
        assert!(!store.stats().proxy_only);
    }

    #[tokio::test]
    async fn eviction_spares_content_in_use_and_content_hit_since_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (content(10_000), content(20_000));
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        // A fill's reader keeps the fresh blob in use after commit.
        let fill = store.fill(&da, fetch_bytes(a.clone(), None));
        fill.done().await.unwrap();
        store
            .fill(&db, fetch_bytes(b.clone(), None))
            .done()
            .await
            .unwrap();
        let seen = |d: &Digest| {
            store
                .entries()
                .into_iter()
                .find(|e| e.digest == *d)
                .unwrap()
        };
        assert!(seen(&da).in_use && !seen(&db).in_use);
        assert_eq!(
            store.evict(&da, seen(&da).last_access, EvictReason::Size),
            None
        );
        drop(fill);
        // Served from the store: in use while the handle lives.
        let blob = store.get(&da).unwrap();
        assert!(seen(&da).in_use);
        assert_eq!(
            store.evict(&da, seen(&da).last_access, EvictReason::Size),
            None
        );
        drop(blob);
        assert_eq!(
            store.evict(&da, seen(&da).last_access, EvictReason::Size),
            Some(10_000)
        );
        assert!(store.get(&da).is_none());
        // A hit after the policy's snapshot wins.
        let planned = seen(&db).last_access;
        std::thread::sleep(Duration::from_millis(5));
        drop(store.get(&db).unwrap());
        assert_eq!(store.evict(&db, planned, EvictReason::Ttl), None);
        assert_eq!(
            store.evict(&db, seen(&db).last_access, EvictReason::Ttl),
            Some(20_000)
        );
        let stats = store.stats();
        assert_eq!((stats.bytes, stats.entries), (0, 0));
        assert_eq!((stats.evicted_size, stats.evicted_ttl), (1, 1));
        assert_eq!(stats.hits, 2);
        // An evicted digest is a plain miss: the next fill fetches it again.
        let (up, tx) = FakeUpstream::new(Some(a.len() as u64));
        tx.send(Ok(Bytes::copy_from_slice(&a))).unwrap();
        drop(tx);
        store.fill(&da, up.fetch()).done().await.unwrap();
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test]
    async fn access_times_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(1_000);
        let digest = Digest::of(&data);
        let old = SystemTime::now() - Duration::from_secs(3600);
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .fill(&digest, fetch_bytes(data, None))
                .done()
                .await
                .unwrap();
        }
        let path = dir.path().join("store/blobs/sha256").join(digest.hex());
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_times(fs::FileTimes::new().set_accessed(old))
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entry = store.entries().pop().unwrap();
        assert_eq!(entry.last_access, old);
        // A hit long after the last persisted access is written back to the file.
        drop(store.get(&digest).unwrap());
        let accessed = fs::metadata(&path).unwrap().accessed().unwrap();
        assert!(accessed > old + Duration::from_secs(3000), "{accessed:?}");
    }

    #[tokio::test]
    async fn stale_partials_are_removed_but_running_fills_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(50_000);
        let partial = crashed_fill(dir.path(), &data, 20_000, 20_000);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.remove_stale_partials(Duration::from_secs(3600), false),
            0
        );
        assert_eq!(store.remove_stale_partials(Duration::ZERO, true), 20_000);
        assert!(partial.exists());
        // A running fill's partial is left alone.
        let (up, tx) = FakeUpstream::new(None);
        let fill = store.fill(&Digest::of(&data), up.fetch());
        assert_eq!(store.remove_stale_partials(Duration::ZERO, false), 0);
        drop((fill, tx));
        timeout(T, async {
            while store.in_flight_count() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let other = content(30_000);
        let stale = crashed_fill(dir.path(), &other, 10_000, 10_000);
        assert_eq!(store.remove_stale_partials(Duration::ZERO, false), 10_000);
        assert!(!stale.exists() && !resume::checkpoint_path(&stale).exists());
    }

    #[tokio::test]
    async fn open_clears_tmp_and_distrusts_unrecorded_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let data = content(70_000);
        let digest = Digest::of(&data);
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .fill(&digest, fetch_bytes(data.clone(), None))
                .done()
                .await
                .unwrap();
        }
        // What a killed process or a stray writer might leave behind.
        fs::write(
            root.join("tmp").join(format!("{}.0123", digest.hex())),
            b"partial",
        )
        .unwrap();
        fs::create_dir(root.join("tmp/somedir")).unwrap();
        let unrecorded = Digest::of(b"no sidecar");
        fs::write(
            root.join("blobs/sha256").join(unrecorded.hex()),
            b"no sidecar",
        )
        .unwrap();
        fs::write(root.join("blobs/sha256/not-a-digest"), b"junk").unwrap();
        let orphan = Digest::of(b"orphan");
        fs::write(
            root.join("meta/sha256")
                .join(format!("{}.json", orphan.hex())),
            b"{\"size\":6}",
        )
        .unwrap();

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(dir_entries(&root.join("tmp")), Vec::<PathBuf>::new());
        assert_eq!(
            dir_entries(&root.join("blobs/sha256")),
            vec![root.join("blobs/sha256").join(digest.hex())]
        );
        assert_eq!(dir_entries(&root.join("meta/sha256")).len(), 1);
        assert!(store.get(&unrecorded).is_none());
        assert_eq!(store.digests(), vec![digest]);
        assert_eq!(store.size_bytes(), data.len() as u64);
        let blob = store.get(&digest).unwrap();
        assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);

        // A sidecar that disagrees with the file: not loaded.
        drop(store);
        fs::write(
            root.join("meta/sha256")
                .join(format!("{}.json", digest.hex())),
            b"{\"size\":1}",
        )
        .unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.get(&digest).is_none());
        assert_eq!(store.size_bytes(), 0);
        assert_eq!(
            dir_entries(&root.join("blobs/sha256")),
            Vec::<PathBuf>::new()
        );
    }

    #[tokio::test]
    async fn corrupted_blobs_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("store/blobs/sha256");
        let (a, b) = (content(10_000), content(20_000));
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .fill(&da, fetch_bytes(a.clone(), None))
                .done()
                .await
                .unwrap();
            store
                .fill(&db, fetch_bytes(b.clone(), None))
                .done()
                .await
                .unwrap();
            assert_eq!(store.size_bytes(), 30_000);
        }
        let store = Store::open(dir.path()).unwrap();

        // Truncated under a running store: `get` notices the size and evicts.
        File::options()
            .write(true)
            .open(blobs.join(da.hex()))
            .unwrap()
            .set_len(5)
            .unwrap();
        assert!(store.get(&da).is_none());
        assert!(!blobs.join(da.hex()).exists());
        assert_eq!(store.size_bytes(), 20_000);

        // Same size, different content: `get` does not hash (see there); the scrub catches it.
        let mut corrupt = b.clone();
        corrupt[0] ^= 0xff;
        fs::write(blobs.join(db.hex()), &corrupt).unwrap();
        assert!(store.get(&db).is_some());
        assert_eq!(store.scrub().await, 1);
        assert!(store.get(&db).is_none());
        assert_eq!(store.size_bytes(), 0);

        // Healthy blobs survive a scrub, and a refill after eviction works.
        store
            .fill(&db, fetch_bytes(b.clone(), None))
            .done()
            .await
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.scrub().await, 0);
        assert_eq!(
            collect(store.get(&db).unwrap().read_range(0, None))
                .await
                .unwrap(),
            b
        );
    }

    #[tokio::test]
    async fn size_bytes_tracks_commits_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.size_bytes(), 0);
        let (a, b) = (content(1_000), content(2_345));
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        store.fill(&da, fetch_bytes(a, None)).done().await.unwrap();
        store.fill(&db, fetch_bytes(b, None)).done().await.unwrap();
        assert_eq!(store.size_bytes(), 3_345);
        // Filling what is already committed fetches nothing and counts nothing twice.
        let (unused, _tx) = FakeUpstream::new(None);
        store.fill(&da, unused.fetch()).done().await.unwrap();
        assert_eq!(unused.calls(), 0);
        assert_eq!(store.size_bytes(), 3_345);
        assert!(store.remove(&da));
        assert!(!store.remove(&da));
        assert_eq!(store.size_bytes(), 2_345);
        // Empty blobs (config-less artifacts do exist) are fine too.
        let empty = Digest::of(b"");
        let blob = store
            .fill(&empty, fetch_bytes(Vec::new(), Some(0)))
            .done()
            .await
            .unwrap();
        assert!(blob.is_empty());
        assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), b"");
    }

    /// Throughput figures, not assertions (house style: no wall-time asserts in tests). Run with
    /// `cargo test -p agent --release --lib store::tests::throughput -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn throughput() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = Bytes::from(content(512 * 1024 * 1024));
        let digest = Digest::of(&data);
        let len = data.len() as u64;
        let gbps = |start: Instant| len as f64 / start.elapsed().as_secs_f64() / 1e9;

        let chunks: Vec<Chunk> = (0..data.len())
            .step_by(16 * 1024)
            .map(|i| Ok(data.slice(i..i + 16 * 1024)))
            .collect();
        let start = Instant::now();
        let fill = store.fill(&digest, move |_| async move {
            Ok::<_, io::Error>(Fetched::whole(
                futures_util::stream::iter(chunks),
                Some(len),
            ))
        });
        let mut tee = pin!(fill.read_range(0, None));
        let mut n = 0;
        while let Some(chunk) = tee.next().await {
            let before = n as u64;
            n += chunk.unwrap().len();
            if before + READ_CHUNK < len && n as u64 + READ_CHUNK >= len {
                // The final chunk waits for verification and the fsync.
                println!(
                    "cold fill, tee'd reader, before commit: {:.2} GB/s",
                    gbps(start)
                );
            }
        }
        println!(
            "cold fill including fsync + commit: {:.2} GB/s",
            gbps(start)
        );
        assert_eq!(n as u64, len);
        fill.done().await.unwrap();

        for _ in 0..3 {
            let start = Instant::now();
            let mut stream = pin!(store.get(&digest).unwrap().read_range(0, None));
            let mut n = 0;
            while let Some(chunk) = stream.next().await {
                n += chunk.unwrap().len();
            }
            assert_eq!(n as u64, len);
            println!(
                "warm read of a committed 512 MiB blob: {:.2} GB/s",
                gbps(start)
            );
        }
    }
}
