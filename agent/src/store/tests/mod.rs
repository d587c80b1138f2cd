//! Store tests by theme, and the fakes and helpers they share.
mod bench;
mod crash;
mod disk;
mod failure;
mod fill;
mod lifecycle;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::lock::lock;
use super::reader::READ_CHUNK;
use super::*;

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
fn fetch_bytes(data: Vec<u8>, len: Option<u64>) -> impl FnOnce(u64) -> FetchFut + Send + 'static {
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

async fn collect_n(stream: impl Stream<Item = Result<Bytes, StoreError>>, n: usize) -> Vec<u8> {
    let mut stream = pin!(stream);
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = timeout(T, stream.next()).await.expect("read stalled");
        out.extend_from_slice(&chunk.unwrap().unwrap());
    }
    out
}
