//! What open and scrub make of the files on disk: leftovers, unrecorded and corrupted blobs.
use super::*;

#[tokio::test]
async fn open_clears_tmp_and_distrusts_unrecorded_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let data = content(70_000);
    let digest = Digest::of(&data);
    {
        let store = Store::open(dir.path()).unwrap();
        fill_bytes(&store, &data).await;
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
    write_sidecar(&root, &orphan, 6);

    let store = Store::open(dir.path()).unwrap();
    assert_empty(&root.join("tmp"));
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
    write_sidecar(&root, &digest, 1);
    let store = Store::open(dir.path()).unwrap();
    assert!(store.get(&digest).is_none());
    assert_eq!(store.size_bytes(), 0);
    assert_empty(&root.join("blobs/sha256"));
}

/// A size record in `meta/`, as a commit writes it.
fn write_sidecar(root: &Path, digest: &Digest, size: u64) {
    let path = root
        .join("meta/sha256")
        .join(format!("{}.json", digest.hex()));
    fs::write(path, format!("{{\"size\":{size}}}")).unwrap();
}

#[tokio::test]
async fn corrupted_blobs_are_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("store/blobs/sha256");
    let (a, b) = (content(10_000), content(20_000));
    let (da, db) = (Digest::of(&a), Digest::of(&b));
    {
        let store = Store::open(dir.path()).unwrap();
        fill_bytes(&store, &a).await;
        fill_bytes(&store, &b).await;
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
    fill_bytes(&store, &b).await;
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
