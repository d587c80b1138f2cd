//! Throughput figures (ignored by default).
use super::*;

/// Throughput figures, not assertions (house style: no wall-time asserts in tests). Run with
/// `cargo test -p agent --release --lib store::tests::bench::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = Bytes::from(content(512 * 1024 * 1024));
    let digest = Digest::of(&data);
    let len = data.len() as u64;
    let gbps = |start: Instant| len as f64 / start.elapsed().as_secs_f64() / 1e9;

    let chunks: Vec<Chunk> = (0..data.len())
        .step_by(16 * 1024)
        .map(|i| Ok(data.slice(i..i + 16 * 1024)))
        .collect();
    let start = Instant::now();
    let fill = store.fill(&digest, move |_| async move {
        Ok::<_, io::Error>(Fetched::whole(
            futures_util::stream::iter(chunks),
            Some(len),
        ))
    });
    let mut tee = pin!(fill.read_range(0, None));
    let mut n = 0;
    while let Some(chunk) = tee.next().await {
        let before = n as u64;
        n += chunk.unwrap().len();
        if before + READ_CHUNK < len && n as u64 + READ_CHUNK >= len {
            // The final chunk waits for verification and the fsync.
            println!(
                "cold fill, tee'd reader, before commit: {:.2} GB/s",
                gbps(start)
            );
        }
    }
    println!(
        "cold fill including fsync + commit: {:.2} GB/s",
        gbps(start)
    );
    assert_eq!(n as u64, len);
    fill.done().await.unwrap();

    for _ in 0..3 {
        let start = Instant::now();
        let mut stream = pin!(store.get(&digest).unwrap().read_range(0, None));
        let mut n = 0;
        while let Some(chunk) = stream.next().await {
            n += chunk.unwrap().len();
        }
        assert_eq!(n as u64, len);
        println!(
            "warm read of a committed 512 MiB blob: {:.2} GB/s",
            gbps(start)
        );
    }
}
