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

use super::reader::READ_CHUNK;
use super::*;
use crate::node::sync::lock;

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
    move |_from| ready(Fetched::whole(chunked(&data), len))
}

/// As [`fetch_bytes`] with the length announced, for a source whose bytes are gated.
fn fetch_gated(data: Vec<u8>) -> impl FnOnce(u64) -> FetchFut + Send + 'static {
    move |_from| {
        let len = Some(data.len() as u64);
        ready(Fetched {
            gated: true,
            ..Fetched::whole(chunked(&data), len)
        })
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
        ready(Fetched {
            offset: from,
            ..Fetched::whole(chunked(&data[from as usize..]), len)
        })
    }
}

fn chunked(data: &[u8]) -> futures_util::stream::BoxStream<'static, Chunk> {
    let chunks: Vec<Chunk> = data
        .chunks(7000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures_util::stream::iter(chunks).boxed()
}

fn ready(fetched: Fetched<futures_util::stream::BoxStream<'static, Chunk>>) -> FetchFut {
    futures_util::future::ready(Ok(fetched))
}

/// The offsets a [`fetch_range`] upstream was asked from.
fn asked() -> Arc<Mutex<Vec<u64>>> {
    Arc::default()
}

/// A fresh store and `n` bytes of content to fill it with.
fn setup(n: usize) -> (tempfile::TempDir, Store, Vec<u8>, Digest) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = content(n);
    let digest = Digest::of(&data);
    (dir, store, data, digest)
}

/// A fill fed by a [`FakeUpstream`] that announces `len`.
fn fake_fill(store: &Store, digest: &Digest, len: Option<u64>) -> (FakeUpstream, Sender, Fill) {
    let (up, tx) = FakeUpstream::new(len);
    let fill = store.fill(digest, up.fetch());
    (up, tx, fill)
}

type Sender = mpsc::UnboundedSender<Chunk>;

fn send(tx: &Sender, bytes: &[u8]) {
    tx.send(Ok(Bytes::copy_from_slice(bytes))).unwrap();
}

/// Fills `data` (from a whole body, length not announced) and waits for the commit.
async fn fill_bytes(store: &Store, data: &[u8]) -> Blob {
    let fetch = fetch_bytes(data.to_vec(), None);
    store.fill(&Digest::of(data), fetch).done().await.unwrap()
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
        assert_empty(&root.join("store").join(sub));
    }
}

fn assert_empty(dir: &Path) {
    assert_eq!(dir_entries(dir), Vec::<PathBuf>::new(), "{}", dir.display());
}

/// `n` bytes of content whose fill a killed eddy left behind (see [`crashed_fill`]), in a data dir
/// no store has opened yet.
fn crashed(n: usize, written: usize, checkpointed: usize) -> (tempfile::TempDir, Vec<u8>, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = content(n);
    let partial = crashed_fill(dir.path(), &data, written, checkpointed);
    (dir, data, partial)
}

/// Fills `data` from an upstream that honours Range, reading it all through the fill as it
/// grows; returns the offsets upstream was asked from.
async fn fill_resuming(store: &Store, data: &[u8]) -> Vec<u64> {
    let asked = asked();
    let fill = store.fill(&Digest::of(data), fetch_range(data.to_vec(), asked.clone()));
    assert_eq!(collect(fill.read_range(0, None)).await.unwrap(), data);
    fill.done().await.unwrap();
    let from = lock(&asked).clone();
    from
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
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
