//! Single-flight fills: one download per digest at a time, joined by every request for it, run in
//! its own task so it completes (and commits) even when every reader has gone away.
use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::blob::{Blob, Blobs};
use super::disk::Layout;
use super::download::{download, Fetched, Target};
use super::error::{BoxError, StoreError};
use super::reader::{self, Phase, Progress, Source};
use super::resume;
use crate::node::sync::lock;
use crate::oci::digest::Digest;

/// A handle on a download in progress (or finished). Clones observe the same download.
#[derive(Clone)]
pub struct Fill {
    digest: Digest,
    /// Read handle on the temp file (which becomes the committed blob). None only for a fill that
    /// failed before it had a file.
    file: Option<Arc<File>>,
    progress: watch::Receiver<Progress>,
}

impl Fill {
    fn committed(blob: Blob) -> Fill {
        let Source {
            digest,
            file,
            progress,
        } = blob.source();
        Fill {
            digest,
            file,
            progress,
        }
    }

    fn failed(digest: Digest, err: StoreError) -> Fill {
        Fill {
            digest,
            file: None,
            progress: watch::channel(Progress::failed(err)).1,
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Waits until upstream has answered with a body; returns the total length if upstream
    /// announced it. Bytes can be streamed from here on even when the length is unknown.
    pub async fn started(&self) -> Result<Option<u64>, StoreError> {
        let p = self
            .wait_for(|p| (p.started && !p.gated) || !p.is_running())
            .await?;
        match p.phase {
            Phase::Failed(err) => Err(err),
            _ => Ok(p.len),
        }
    }

    /// Waits until the total length is known: announced by upstream, or the fill finished.
    // Async and fallible, unlike a collection's: an `is_empty` would only be `len().await? == 0`.
    #[allow(clippy::len_without_is_empty)]
    pub async fn len(&self) -> Result<u64, StoreError> {
        let p = self
            .wait_for(|p| p.len.is_some() || !p.is_running())
            .await?;
        match (p.phase, p.len) {
            (Phase::Failed(err), _) => Err(err),
            (_, Some(len)) => Ok(len),
            // Unreachable: a commit always sets `len`.
            (_, None) => Err(self.aborted()),
        }
    }

    /// Resolves when the blob is committed, or with the fill's error.
    pub async fn done(&self) -> Result<Blob, StoreError> {
        let p = self.wait_for(|p| !p.is_running()).await?;
        match (p.phase, p.len, &self.file) {
            (Phase::Committed(lease), Some(len), Some(file)) => Ok(Blob {
                digest: self.digest,
                len,
                file: file.clone(),
                lease,
            }),
            (Phase::Failed(err), _, _) => Err(err),
            _ => Err(self.aborted()),
        }
    }

    async fn wait_for(&self, f: impl FnMut(&Progress) -> bool) -> Result<Progress, StoreError> {
        let mut rx = self.progress.clone();
        let p = rx.wait_for(f).await.map_err(|_| self.aborted())?;
        Ok(p.clone())
    }

    fn aborted(&self) -> StoreError {
        StoreError::Aborted {
            digest: self.digest,
        }
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
        let source = Source {
            digest: self.digest,
            file: self.file.clone(),
            progress: self.progress.clone(),
        };
        reader::read_range(source, start, end)
    }
}

/// The fills in flight, and what they commit into.
pub(super) struct Fills {
    layout: Arc<Layout>,
    blobs: Arc<Blobs>,
    /// Lock order: `inflight` before the blobs' index.
    inflight: Mutex<HashMap<Digest, Fill>>,
}

impl Fills {
    pub fn new(layout: Arc<Layout>, blobs: Arc<Blobs>) -> Fills {
        Fills {
            layout,
            blobs,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// See `Store::fill`.
    pub fn start<F, Fut, S, E1, E2>(self: &Arc<Self>, digest: &Digest, fetch: F) -> Fill
    where
        F: FnOnce(u64) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fetched<S>, E1>> + Send + 'static,
        S: Stream<Item = Result<Bytes, E2>> + Send + 'static,
        E1: Into<BoxError> + Send + 'static,
        E2: Into<BoxError> + Send + 'static,
    {
        let mut inflight = lock(&self.inflight);
        if let Some(fill) = inflight.get(digest) {
            return fill.clone();
        }
        // Checked under the inflight lock: a finishing fill indexes its blob before leaving `inflight`,
        // so there is no moment where a completed blob is in neither and would be fetched twice.
        if let Some(blob) = self.blobs.get(digest) {
            return Fill::committed(blob);
        }
        let partial = match self.layout.open_partial(digest) {
            Ok(partial) => partial,
            Err(err) => return Fill::failed(*digest, err),
        };
        let (tx, rx) = watch::channel(Progress::running());
        let fill = Fill {
            digest: *digest,
            file: Some(Arc::new(partial.reader)),
            progress: rx,
        };
        inflight.insert(*digest, fill.clone());
        drop(inflight);

        debug!(%digest, "fill started");
        let guard = FillGuard {
            fills: self.clone(),
            digest: *digest,
            partial: partial.path,
            tx,
            finished: false,
        };
        tokio::spawn(run_fill(guard, partial.writer, fill.file.clone(), fetch));
        fill
    }

    pub fn get(&self, digest: &Digest) -> Option<Fill> {
        lock(&self.inflight).get(digest).cloned()
    }

    pub fn count(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// See `Store::remove_stale_partials`.
    pub fn remove_stale_partials(&self, idle: Duration, dry_run: bool) -> u64 {
        let now = SystemTime::now();
        let mut freed = 0;
        for (digest, entry) in self.layout.partials() {
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            // Checked under the inflight lock, which a fill holds while it opens its partial.
            let inflight = lock(&self.inflight);
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
}

/// Owns a fill's terminal bookkeeping, so it also happens if the task panics or is dropped at shutdown.
struct FillGuard {
    fills: Arc<Fills>,
    digest: Digest,
    partial: PathBuf,
    tx: watch::Sender<Progress>,
    finished: bool,
}

impl FillGuard {
    fn finish(&mut self, result: Result<Blob, StoreError>) {
        self.finished = true;
        match &result {
            Ok(blob) => self.fills.blobs.insert_committed(blob),
            Err(err) => self.failed(err),
        }
        // Leave `inflight` before announcing the result: a caller that sees the failure and retries must
        // start a new fetch, not join this one. (On success the index already answers.)
        {
            let mut inflight = lock(&self.fills.inflight);
            if inflight
                .get(&self.digest)
                .is_some_and(|f| f.progress.same_channel(&self.tx.subscribe()))
            {
                inflight.remove(&self.digest);
            }
        }
        self.tx.send_modify(|p| match result {
            Ok(blob) => {
                p.len = Some(blob.len);
                p.phase = Phase::Committed(blob.lease);
            }
            Err(err) => p.phase = Phase::Failed(err),
        });
    }

    fn failed(&self, err: &StoreError) {
        let digest = self.digest;
        // Before readers learn of the failure, so a retry never sees this attempt's leftovers.
        // A fill cut short by shutdown keeps its partial: the next run resumes it. Any other
        // failure (a mismatch, upstream refusing) starts the next attempt from zero.
        if !matches!(err, StoreError::Aborted { .. }) {
            resume::discard(&self.partial);
        }
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
    let target = Target {
        digest: guard.digest,
        partial: &guard.partial,
        layout: &guard.fills.layout,
        progress: &guard.tx,
    };
    let result = download(&target, writer, fetch).await;
    let result = result.and_then(|len| {
        let file = read_file.ok_or(StoreError::Aborted {
            digest: guard.digest,
        })?;
        Ok(Blob {
            digest: guard.digest,
            len,
            file,
            lease: Arc::new(()),
        })
    });
    guard.finish(result);
}
