//! Fills that fail (wrong bytes, wrong length, upstream errors) leave nothing behind, and a retry works.
use super::*;

#[tokio::test]
async fn digest_mismatch_fails_cleanly_and_a_retry_succeeds() {
    let (dir, store, data, digest) = setup(100_000);
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

    let blob = fill_bytes(&store, &data).await;
    assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
    assert_eq!(store.size_bytes(), data.len() as u64);
}

/// A gated fill (bytes from a peer) shows readers nothing before the commit: corrupt
/// bytes fail the fill before any client got a byte of them.
#[tokio::test]
async fn a_gated_fill_hands_out_nothing_before_it_verifies() {
    let (dir, store, data, digest) = setup(300_000);
    let mut wrong = data.clone();
    wrong[123] ^= 1;
    let fill = store.fill(&digest, fetch_gated(wrong));
    let mut reader = Box::pin(fill.read_range(0, None));
    let first = timeout(T, reader.next()).await.unwrap().unwrap();
    assert!(matches!(first, Err(StoreError::DigestMismatch { .. })));
    assert!(timeout(T, fill.started()).await.unwrap().is_err());
    assert_clean(&store, dir.path(), &digest);

    let fill = store.fill(&digest, fetch_gated(data.clone()));
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
    let (dir, store, data, digest) = setup(20_000);
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
    let (dir, store, data, digest) = setup(100_000);

    // Mid-stream.
    let (_up, tx, fill) = fake_fill(&store, &digest, Some(data.len() as u64));
    let mut stream = Box::pin(fill.read_range(0, None));
    send(&tx, &data[..40_000]);
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
