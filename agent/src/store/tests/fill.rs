//! Fills shared by concurrent requests, streamed while they grow, and what readers see of them.
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fills_share_one_fetch_and_stream_progressively() {
    let (dir, store, data, digest) = setup(3 * READ_CHUNK as usize + 12345);
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
    send(&tx, &data[..1000]);
    for _ in 0..8 {
        timeout(T, first_rx.recv())
            .await
            .expect("reader got no early bytes")
            .unwrap();
    }
    for chunk in data[1000..].chunks(64 * 1024) {
        send(&tx, chunk);
    }
    drop(tx);

    for reader in readers {
        assert!(timeout(T, reader).await.unwrap().unwrap() == data);
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(store.get(&digest).unwrap().len(), data.len() as u64);
    assert_eq!(store.size_bytes(), data.len() as u64);
    assert!(store.in_flight(&digest).is_none());
    assert_empty(&dir.path().join("store/tmp"));
}

#[tokio::test]
async fn a_commit_while_nobody_waits_is_still_seen_by_the_next_wait() {
    let (_dir, store, data, digest) = setup(1000);
    let (_up, tx, fill) = fake_fill(&store, &digest, Some(data.len() as u64));
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
    let (_dir, store, data, digest) = setup(READ_CHUNK as usize + 100);
    let (_up, tx, fill) = fake_fill(&store, &digest, Some(data.len() as u64));
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
    let (up, tx, fill) = fake_fill(&store, &digest, Some(len));
    assert_eq!(timeout(T, fill.len()).await.unwrap().unwrap(), len);

    let half = data.len() / 2;
    send(&tx, &data[..half]);
    // A bounded range starting mid-way gets its first bytes while the fill is still running.
    let mut bounded = Box::pin(fill.read_range(100, Some(300_000)));
    let first = timeout(T, bounded.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(&first[..], &data[100..100 + READ_CHUNK as usize]);
    // Ranges that start beyond what has been written wait for it.
    let tail = tokio::spawn(collect(fill.read_range(half as u64 + 10, None)));
    let last_byte = tokio::spawn(collect(fill.read_range(len - 1, Some(len))));
    for chunk in data[half..].chunks(10_000) {
        send(&tx, chunk);
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
    let (_dir, store, data, digest) = setup(50_000);
    let (_up, tx, fill) = fake_fill(&store, &digest, None);
    // Upstream has answered but sent nothing yet: the fill has started, length unknown.
    assert_eq!(fill.started().await.unwrap(), None);
    send(&tx, &data);
    drop(tx);
    assert_eq!(fill.len().await.unwrap(), data.len() as u64);
    assert_eq!(fill.started().await.unwrap(), Some(data.len() as u64));
}

#[tokio::test]
async fn unknown_length_is_learned_at_commit() {
    let (_dir, store, data, digest) = setup(50_000);
    let (_up, tx, fill) = fake_fill(&store, &digest, None);
    let len = tokio::spawn({
        let fill = fill.clone();
        async move { fill.len().await }
    });
    let mut stream = Box::pin(fill.read_range(0, None));
    send(&tx, &data[..20_000]);
    // Without a known end nothing is held back: the body is chunked, and a failure cuts it short.
    let first = timeout(T, stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(&first[..], &data[..20_000]);
    assert!(!len.is_finished());
    send(&tx, &data[20_000..]);
    drop(tx);
    assert_eq!(collect(stream).await.unwrap(), &data[20_000..]);
    assert_eq!(
        timeout(T, len).await.unwrap().unwrap().unwrap(),
        data.len() as u64
    );
}

#[tokio::test]
async fn dropped_readers_do_not_abort_the_fill() {
    let (_dir, store, data, digest) = setup(300_000);
    let (_up, tx, fill) = fake_fill(&store, &digest, Some(data.len() as u64));
    let mut stream = Box::pin(fill.read_range(0, None));
    send(&tx, &data[..1000]);
    timeout(T, stream.next()).await.unwrap().unwrap().unwrap();
    // The client goes away: its stream and every handle on the fill.
    drop(stream);
    drop(fill);
    for chunk in data[1000..].chunks(4096) {
        send(&tx, chunk);
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
