//! Crash-resume: partial fills a killed or shut-down eddy left, resumed or cleaned up.
use super::*;

#[tokio::test]
async fn a_crashed_fill_resumes_from_its_verified_prefix() {
    let (dir, data, partial) = crashed(300_000, 180_000, 150_000);
    let store = Store::open(dir.path()).unwrap();
    assert!(partial.exists(), "open must keep a resumable partial");
    // A reader from byte 0 gets the prefix from disk and the rest from upstream.
    assert_eq!(fill_resuming(&store, &data).await, vec![150_000]);
    assert_empty(&dir.path().join("store/tmp"));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.scrub().await, 0);
    assert!(store.get(&Digest::of(&data)).is_some());
}

#[tokio::test]
async fn a_corrupt_prefix_is_discarded_and_the_fill_succeeds() {
    let (dir, data, partial) = crashed(300_000, 200_000, 200_000);
    // Bit rot (or a power loss before the bytes were durable) inside the checkpointed prefix.
    let f = OpenOptions::new().write(true).open(&partial).unwrap();
    f.write_all_at(&[0u8; 4096], 65_536).unwrap();
    drop(f);
    let store = Store::open(dir.path()).unwrap();
    let from = fill_resuming(&store, &data).await;
    assert_eq!(from, vec![0], "a corrupt prefix must be fetched again");
    assert_eq!(store.scrub().await, 0);
}

#[tokio::test]
async fn upstream_ignoring_the_range_still_completes_the_fill() {
    let (dir, data, _) = crashed(300_000, 100_000, 100_000);
    let store = Store::open(dir.path()).unwrap();
    // A 200 with the whole body: the store skips the 100,000 bytes it already holds.
    let fill = store.fill(
        &Digest::of(&data),
        fetch_bytes(data.clone(), Some(data.len() as u64)),
    );
    let tail = collect(fill.read_range(250_000, None)).await.unwrap();
    assert_eq!(tail, &data[250_000..]);
    let blob = fill.done().await.unwrap();
    assert_eq!(collect(blob.read_range(0, None)).await.unwrap(), data);
}

#[tokio::test]
async fn a_failed_fill_does_not_leave_a_partial_to_resume() {
    let (dir, data, _) = crashed(100_000, 60_000, 60_000);
    let digest = Digest::of(&data);
    let store = Store::open(dir.path()).unwrap();
    let mut wrong = data.clone();
    wrong[90_000] ^= 1;
    let asked = asked();
    let fill = store.fill(&digest, fetch_range(wrong, asked.clone()));
    assert!(matches!(
        fill.done().await,
        Err(StoreError::DigestMismatch { .. })
    ));
    assert_eq!(*lock(&asked), vec![60_000]);
    assert_clean(&store, dir.path(), &digest);
    // The next attempt starts from zero.
    assert_eq!(fill_resuming(&store, &data).await, vec![0]);
}

/// A runtime torn down mid-fill (as at shutdown) keeps the partial and its checkpoints; the
/// next store resumes from the last checkpoint.
#[test]
fn a_fill_interrupted_by_shutdown_is_resumed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(3 * resume::CHECKPOINT_EVERY as usize);
    let digest = Digest::of(&data);
    runtime().block_on(async {
        let store = Store::open(dir.path()).unwrap();
        let (_up, tx, fill) = fake_fill(&store, &digest, Some(data.len() as u64));
        let half = data.len() / 2;
        for chunk in data[..half].chunks(64 * 1024) {
            send(&tx, chunk);
        }
        let got = collect_n(fill.read_range(0, None), half).await;
        assert_eq!(got, &data[..half]);
        std::mem::forget(tx);
    });
    runtime().block_on(async {
        let store = Store::open(dir.path()).unwrap();
        let from = fill_resuming(&store, &data).await;
        assert_eq!(from.len(), 1);
        assert!(
            from[0] >= resume::CHECKPOINT_EVERY && from[0] <= data.len() as u64 / 2,
            "resumed from {from:?}"
        );
    });
}

#[tokio::test]
async fn stale_partials_are_removed_but_running_fills_are_not() {
    let (dir, data, partial) = crashed(50_000, 20_000, 20_000);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.remove_stale_partials(Duration::from_secs(3600), false),
        0
    );
    assert_eq!(store.remove_stale_partials(Duration::ZERO, true), 20_000);
    assert!(partial.exists());
    // A running fill's partial is left alone.
    let (_up, tx, fill) = fake_fill(&store, &Digest::of(&data), None);
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
