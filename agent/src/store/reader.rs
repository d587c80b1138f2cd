//! Readers that stream a blob while its fill is still writing it: they follow the fill's published
//! progress, read only what is already in the file, and hold back the final chunk until the
//! content is verified. A committed blob is a finished fill, so the same reader serves it.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::error::{joined, StoreError};
use crate::oci::digest::Digest;

/// Bytes per positional read. Large enough that a warm blob streams at several GB/s (one blocking
/// task hop per chunk), small enough that a tee'd reader is never far behind the writer.
pub(super) const READ_CHUNK: u64 = 256 * 1024;

/// What a fill publishes to its readers.
#[derive(Clone)]
pub(super) struct Progress {
    /// Bytes written to the file; readers never read past this.
    pub written: u64,
    /// The total length, once upstream announced it (or the fill committed).
    pub len: Option<u64>,
    /// Upstream answered with a body: bytes may start to flow, even when `len` is unknown.
    pub started: bool,
    /// See `Fetched::gated`: nothing is readable before the commit.
    pub gated: bool,
    pub phase: Phase,
}

#[derive(Clone)]
pub(super) enum Phase {
    Running,
    /// Verified and in `blobs/`; the lease keeps the entry from eviction while a handle lives.
    Committed(Arc<()>),
    Failed(StoreError),
}

impl Progress {
    pub fn running() -> Progress {
        Progress {
            written: 0,
            len: None,
            started: false,
            gated: false,
            phase: Phase::Running,
        }
    }

    pub fn committed(len: u64, lease: Arc<()>) -> Progress {
        Progress {
            written: len,
            len: Some(len),
            started: true,
            gated: false,
            phase: Phase::Committed(lease),
        }
    }

    pub fn failed(err: StoreError) -> Progress {
        Progress {
            phase: Phase::Failed(err),
            ..Progress::running()
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running)
    }
}

/// Where a reader reads from: the blob, the file holding it (None for a fill that failed before
/// it had one), and the fill's progress.
pub(super) struct Source {
    pub digest: Digest,
    pub file: Option<Arc<File>>,
    pub progress: watch::Receiver<Progress>,
}

/// Streams bytes `[start, end)` (`end` None = to the end; clamped to the blob) as they are written.
pub(super) fn read_range(
    source: Source,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
    let reader = Reader {
        source,
        start,
        pos: start,
        end,
        finished: false,
    };
    futures_util::stream::unfold(reader, |mut r| async move {
        r.next().await.map(|item| (item, r))
    })
}

struct Reader {
    source: Source,
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
        let digest = self.source.digest;
        loop {
            let (written, len, committed) = {
                let p = self.source.progress.borrow_and_update();
                match &p.phase {
                    Phase::Failed(err) => return Err(err.clone()),
                    Phase::Running if p.gated => (0, None, false),
                    phase => (p.written, p.len, matches!(phase, Phase::Committed(_))),
                }
            };
            let end = self.end_within(len)?;
            if committed && end == Some(self.pos) {
                return Ok(None);
            }
            let available = end.map_or(written, |end| end.min(written));
            if available > self.pos {
                let n = (available - self.pos).min(READ_CHUNK);
                let is_last = end == Some(self.pos + n);
                if committed || !is_last {
                    let file = self.source.file.clone();
                    let file = file.ok_or(StoreError::Aborted { digest })?;
                    let bytes = pread(file, self.pos, n, digest).await?;
                    self.pos += n;
                    return Ok(Some(bytes));
                }
            }
            // Nothing new to hand out yet: wait for the writer (or the verdict on the last chunk).
            if self.source.progress.changed().await.is_err() {
                return Err(StoreError::Aborted { digest });
            }
        }
    }

    /// Where this read ends, given the blob's length if known; an error if the range cannot be
    /// satisfied.
    fn end_within(&self, len: Option<u64>) -> Result<Option<u64>, StoreError> {
        if let Some(len) = len {
            if self.start > len || self.end.is_some_and(|end| end < self.start) {
                return Err(StoreError::RangeNotSatisfiable {
                    digest: self.source.digest,
                    start: self.start,
                    end: self.end,
                    len,
                });
            }
        }
        Ok(match (self.end, len) {
            (Some(end), Some(len)) => Some(end.min(len)),
            (end, len) => end.or(len),
        })
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
    .await;
    joined(read).map_err(|source| StoreError::Read {
        digest,
        source: Arc::new(source),
    })
}
