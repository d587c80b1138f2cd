//! One fill's download, in three steps: recover the verified prefix a crashed run left, stream the
//! body into the partial file in batches (hashing as it goes and checkpointing now and then), then
//! verify length and digest and commit.
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tracing::{debug, info};

use super::disk::Layout;
use super::error::{io_err, joined, BoxError, StoreError};
use super::reader::Progress;
use super::resume::{self, Prefix};
use crate::oci::digest::Digest;

/// Upper bound on upstream chunks batched into one write (only chunks that are already available are
/// batched, so batching never delays a reader).
const WRITE_BATCH: usize = 1024 * 1024;

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

/// What a download writes to and whom it tells.
pub(super) struct Target<'a> {
    pub digest: Digest,
    pub partial: &'a Path,
    pub layout: &'a Arc<Layout>,
    pub progress: &'a watch::Sender<Progress>,
}

impl Target<'_> {
    fn upstream(&self, err: BoxError) -> StoreError {
        StoreError::Upstream {
            digest: self.digest,
            source: Arc::from(err),
        }
    }

    fn length_mismatch(&self, expected: u64, actual: u64) -> StoreError {
        StoreError::LengthMismatch {
            digest: self.digest,
            expected,
            actual,
        }
    }
}

/// Streams upstream into the partial file (after the verified prefix a crashed run left), hashing
/// as it goes and checkpointing now and then, then verifies and commits. Returns the committed
/// length.
pub(super) async fn download<F, Fut, S, E1, E2>(
    target: &Target<'_>,
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
    let writer = Arc::new(writer);
    let prefix = recover_prefix(target, &writer).await?;
    let fetched = fetch(prefix.len)
        .await
        .map_err(|e| target.upstream(e.into()))?;
    let skip = start_body(target, prefix.len, &fetched)?;
    let mut download = Download::new(target, writer, prefix, fetched.len);
    download.write_batches(fetched.body, skip).await?;
    download.verify_and_commit().await
}

/// Step 1: the prefix of the partial file that checks out against its checkpoint.
async fn recover_prefix(target: &Target<'_>, writer: &Arc<File>) -> Result<Prefix, StoreError> {
    let (w, path) = (writer.clone(), target.partial.to_path_buf());
    let recovered = tokio::task::spawn_blocking(move || resume::recover(&path, &w)).await;
    let prefix = joined(recovered).map_err(io_err("resume", target.partial))?;
    if prefix.len > 0 {
        info!(digest = %target.digest, bytes = prefix.len, "resuming a fill from its verified prefix");
    }
    Ok(prefix)
}

/// Checks where upstream's body starts against the prefix held, and tells readers the body has
/// started. Returns how many bytes at the front of the body the prefix already holds (upstream
/// ignored the Range).
fn start_body<S>(target: &Target<'_>, held: u64, fetched: &Fetched<S>) -> Result<u64, StoreError> {
    let skip = match fetched.offset {
        0 => held,
        o if o == held => 0,
        o => {
            let odd = format!("upstream sent the blob from byte {o}, asked from {held}");
            return Err(target.upstream(odd.into()));
        }
    };
    if let Some(expected) = fetched.len.filter(|&l| l < held) {
        return Err(target.length_mismatch(expected, held));
    }
    target.progress.send_modify(|p| {
        p.len = fetched.len;
        p.started = true;
        p.gated = fetched.gated;
        p.written = held;
    });
    Ok(skip)
}

/// A batch being hashed and written on a blocking thread; its task hands the hasher back.
struct InFlightWrite {
    len: u64,
    task: tokio::task::JoinHandle<io::Result<Sha256>>,
}

/// Steps 2 and 3: the body written in batches, then verified and committed.
struct Download<'a> {
    target: &'a Target<'a>,
    file: Arc<File>,
    /// The announced length, if any.
    len: Option<u64>,
    /// The running hash; away while a batch is in flight.
    hasher: Option<Sha256>,
    written: u64,
    checkpointed: u64,
    /// One batch is hashed and written on a blocking thread while the next one is read (and,
    /// for TLS or a peer's data port, decrypted) here: the two overlap on two cores instead
    /// of taking turns.
    in_flight: Option<InFlightWrite>,
}

impl<'a> Download<'a> {
    fn new(target: &'a Target<'a>, file: Arc<File>, prefix: Prefix, len: Option<u64>) -> Self {
        Download {
            target,
            file,
            len,
            hasher: Some(prefix.hasher),
            written: prefix.len,
            checkpointed: prefix.len,
            in_flight: None,
        }
    }

    /// Step 2: the batch loop. `skip` bytes at the body's front are already held.
    async fn write_batches<S, E>(&mut self, body: S, mut skip: u64) -> Result<(), StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: Into<BoxError> + Send,
    {
        // Fused: the batching below may see the end, after which the stream must not be polled again.
        let mut body = pin!(body.fuse());
        while let Some(first) = self.next_chunk(&mut body).await? {
            let mut batch = match take_batch(first, &mut body) {
                Ok(batch) => batch,
                Err(e) => {
                    // The batch in flight is finished first, so a resume keeps its bytes.
                    self.finish_write().await?;
                    return Err(self.target.upstream(e.into()));
                }
            };
            let batch_len = skip_held(&mut batch, &mut skip);
            if batch_len == 0 {
                continue;
            }
            // The previous batch is in the file (and its bytes in the hash) before this one goes.
            self.finish_write().await?;
            let end = self.written + batch_len;
            if let Some(expected) = self.len.filter(|&expected| end > expected) {
                return Err(self.target.length_mismatch(expected, end));
            }
            self.spawn_write(batch, batch_len);
        }
        self.finish_write().await?;
        if skip > 0 {
            let short = "upstream's body ended inside the prefix already held";
            return Err(self.target.upstream(short.into()));
        }
        Ok(())
    }

    /// The next chunk; a write that completes meanwhile is published at once, so readers
    /// streaming from this fill never wait for the next chunk to see the last one.
    async fn next_chunk<B, E>(
        &mut self,
        body: &mut B,
    ) -> Result<Option<Result<Bytes, E>>, StoreError>
    where
        B: Stream<Item = Result<Bytes, E>> + Unpin,
    {
        loop {
            let Some(write) = self.in_flight.as_mut() else {
                return Ok(body.next().await);
            };
            tokio::select! {
                done = &mut write.task => {
                    let len = write.len;
                    self.in_flight = None;
                    self.write_done(done, len)?;
                }
                next = body.next() => return Ok(next),
            }
        }
    }

    /// Hashes and writes `batch` on a blocking thread (hashing a MiB takes long enough to stall
    /// other tasks), checkpointing every [`resume::CHECKPOINT_EVERY`] bytes.
    fn spawn_write(&mut self, batch: Vec<Bytes>, batch_len: u64) {
        let end = self.written + batch_len;
        let checkpoint = end - self.checkpointed >= resume::CHECKPOINT_EVERY;
        if checkpoint {
            self.checkpointed = end;
        }
        let file = self.file.clone();
        let partial = self.target.partial.to_path_buf();
        let mut pos = self.written;
        let mut hasher = self
            .hasher
            .take()
            .expect("the hasher is back after each write");
        let task = tokio::task::spawn_blocking(move || {
            for chunk in &batch {
                hasher.update(chunk);
                file.write_all_at(chunk, pos)?;
                pos += chunk.len() as u64;
            }
            // Best effort: a missed checkpoint only means more to fetch after a crash.
            if checkpoint {
                if let Err(err) = resume::write_checkpoint(&partial, pos, &hasher) {
                    debug!(%err, "fill checkpoint not written");
                }
            }
            Ok(hasher)
        });
        self.in_flight = Some(InFlightWrite {
            len: batch_len,
            task,
        });
    }

    /// Waits for the batch in flight, if any.
    async fn finish_write(&mut self) -> Result<(), StoreError> {
        let Some(write) = self.in_flight.take() else {
            return Ok(());
        };
        let done = write.task.await;
        self.write_done(done, write.len)
    }

    /// A batch's write ended: the hasher comes back, its `len` bytes count as written and the
    /// fill's readers are told, whose preads find them in the file from now on.
    fn write_done(
        &mut self,
        done: Result<io::Result<Sha256>, tokio::task::JoinError>,
        len: u64,
    ) -> Result<(), StoreError> {
        let hasher = joined(done).map_err(io_err("write", self.target.partial))?;
        self.hasher = Some(hasher);
        self.written += len;
        let written = self.written;
        self.target.progress.send_modify(|p| p.written = written);
        Ok(())
    }

    /// Step 3: checks length and digest, then commits. Returns the committed length.
    async fn verify_and_commit(self) -> Result<u64, StoreError> {
        let (target, written) = (self.target, self.written);
        if let Some(expected) = self.len.filter(|&l| l != written) {
            return Err(target.length_mismatch(expected, written));
        }
        let hasher = self
            .hasher
            .expect("the hasher is back after the last write");
        let actual = Digest::from_sha256(hasher.finalize().into());
        if actual != target.digest {
            return Err(StoreError::DigestMismatch {
                expected: target.digest,
                actual,
            });
        }
        let (digest, layout, file) = (target.digest, target.layout.clone(), self.file);
        let partial = target.partial.to_path_buf();
        let commit = move || layout.commit(&digest, &partial, &file, written);
        let committed = tokio::task::spawn_blocking(commit).await;
        committed
            .unwrap_or_else(|join| Err(io_err("commit", target.partial)(io::Error::other(join))))?;
        Ok(written)
    }
}

/// The chunk `first` and whatever else is already buffered, so a fast upstream costs one
/// blocking hop per ~1 MiB rather than per 16 KiB frame, without ever waiting for more data.
fn take_batch<B, E>(first: Result<Bytes, E>, body: &mut B) -> Result<Vec<Bytes>, E>
where
    B: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let first = first?;
    let mut len = first.len();
    let mut batch = vec![first];
    while len < WRITE_BATCH {
        match body.next().now_or_never() {
            Some(Some(chunk)) => {
                let chunk = chunk?;
                len += chunk.len();
                batch.push(chunk);
            }
            _ => break,
        }
    }
    Ok(batch)
}

/// Cuts from the batch's front the bytes the prefix already holds; returns what is left.
fn skip_held(batch: &mut [Bytes], skip: &mut u64) -> u64 {
    for chunk in batch.iter_mut() {
        let n = (*skip).min(chunk.len() as u64);
        *chunk = chunk.slice(n as usize..);
        *skip -= n;
    }
    batch.iter().map(|c| c.len() as u64).sum()
}
