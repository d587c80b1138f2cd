//! Committed content over time: eviction, access times, size accounting, disk space.
use super::*;

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
    fill_bytes(&store, &b).await;
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
    send(&tx, &a);
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
        fill_bytes(&store, &data).await;
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
async fn size_bytes_tracks_commits_and_removals() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.size_bytes(), 0);
    let (a, b) = (content(1_000), content(2_345));
    let da = Digest::of(&a);
    fill_bytes(&store, &a).await;
    fill_bytes(&store, &b).await;
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
