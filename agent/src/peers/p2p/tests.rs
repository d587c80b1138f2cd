//! In-process nodes on loopback: discovery, provider records, fetches, the swarm key.
// unsafe: getrusage, to measure the CPU time a test spends. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{collections::HashMap, sync::Mutex};

use futures_util::{future::BoxFuture, StreamExt};

use super::*;

/// A share that serves blobs from memory.
#[derive(Default)]
struct MemShare {
    blobs: Mutex<HashMap<Digest, Bytes>>,
    tags: Mutex<HashMap<String, TagAnswer>>,
}

impl MemShare {
    fn with(blobs: &[&Bytes]) -> Arc<MemShare> {
        let share = MemShare::default();
        for b in blobs {
            share
                .blobs
                .lock()
                .unwrap()
                .insert(Digest::of(b), (*b).clone());
        }
        Arc::new(share)
    }
}

impl PeerShare for MemShare {
    fn open(&self, digest: &Digest, from: u64) -> BoxFuture<'_, Option<Opened>> {
        let blob = self.blobs.lock().unwrap().get(digest).cloned();
        Box::pin(async move {
            let blob = blob?;
            if from > blob.len() as u64 {
                return None;
            }
            // Served in 1 MiB pieces, like the store's reader.
            let rest = blob.slice(from as usize..);
            let pieces: Vec<Result<Bytes, crate::store::BoxError>> = rest
                .chunks(1 << 20)
                .map(|c| Ok(rest.slice_ref(c)))
                .collect();
            Some(Opened {
                len: blob.len() as u64,
                offset: from,
                body: futures_util::stream::iter(pieces).boxed(),
                media_type: None,
            })
        })
    }

    fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<TagAnswer> {
        let key = format!("{registry}/{repository}:{tag}");
        self.tags.lock().unwrap().get(&key).cloned()
    }

    fn digests(&self) -> Vec<Digest> {
        self.blobs.lock().unwrap().keys().copied().collect()
    }
}

struct Node {
    p2p: P2p,
    metrics: P2pMetrics,
    _dir: tempfile::TempDir,
}

async fn node(share: Arc<MemShare>, bootstrap: &[String], psk: Option<[u8; 32]>) -> Node {
    node_on(0, share, bootstrap, psk, Duration::from_millis(500)).await
}

/// A node listening on 127.0.0.1:`port` (0: any), re-resolving its bootstrap every `resolve`.
async fn node_on(
    port: u16,
    share: Arc<MemShare>,
    bootstrap: &[String],
    psk: Option<[u8; 32]>,
    resolve: Duration,
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let mut config = P2pConfig::new(listen, dir.path());
    config.bootstrap = bootstrap
        .iter()
        .map(|b| config::Bootstrap::parse(b).unwrap())
        .collect();
    config.psk = psk;
    config.resolve_interval = resolve;
    config.reconcile_interval = Duration::from_millis(500);
    started(config, share, dir).await
}

/// A node started with `config`, whose files are in `dir`.
async fn started(config: P2pConfig, share: Arc<dyn PeerShare>, dir: tempfile::TempDir) -> Node {
    let metrics = P2pMetrics::default();
    let p2p = P2p::start(config, share, metrics.clone()).await.unwrap();
    Node {
        p2p,
        metrics,
        _dir: dir,
    }
}

/// A node with nothing to share, bootstrapped from `a` and connected to it.
async fn joined(a: &Node) -> Node {
    let b = node(MemShare::with(&[]), &[by_ip(a)], None).await;
    assert!(wait_connected(&b, a).await, "never connected");
    b
}

/// `a` as a bootstrap entry by IP:PORT.
fn by_ip(a: &Node) -> String {
    format!("127.0.0.1:{}", tcp_port(a))
}

/// `a` as a bootstrap entry by multiaddr with /p2p/ID.
fn by_multiaddr(a: &Node) -> String {
    format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        tcp_port(a),
        a.p2p.local_peer_id()
    )
}

/// `from` fetches `digest` from `offset` on `to`, which must answer.
async fn fetch_from(from: &Node, to: &Node, digest: &Digest, offset: u64) -> Opened {
    from.p2p
        .fetch(to.p2p.local_peer_id(), digest, offset)
        .await
        .unwrap()
}

/// `n`'s count of failed peer fetches for `reason`.
fn failures(n: &Node, reason: &'static str) -> u64 {
    n.metrics
        .peer_failures
        .get_or_create(&metrics::ReasonLabels { reason })
        .get()
}

/// Waits (bounded) until `n` advertises `want` digests.
async fn wait_advertised(n: &Node, want: i64) {
    for _ in 0..50 {
        if n.metrics.advertised_digests.get() == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tcp_port(n: &Node) -> u16 {
    n.p2p
        .listen_addrs()
        .iter()
        .find_map(|a| {
            a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
                _ => None,
            })
        })
        .unwrap()
}

/// Waits (bounded) until `a` lists `b` as a connected peer.
async fn wait_connected(a: &Node, b: &Node) -> bool {
    let want = b.p2p.local_peer_id().to_string();
    for _ in 0..100 {
        if a.p2p.peers().iter().any(|p| p.peer_id == want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits (bounded) until `key` has `who` among its providers as seen from `from`.
async fn wait_provider(from: &Node, key: &[u8], who: PeerId) -> Vec<PeerId> {
    let mut found = Vec::new();
    for _ in 0..50 {
        found = from.p2p.providers(key, Duration::from_millis(500)).await;
        if found.contains(&who) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    found
}

async fn body_of(opened: Opened) -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = opened.body;
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

fn blob(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_providers_and_fetch_with_ranges() {
    let data = blob(3 << 20, 7);
    let digest = Digest::of(&data);
    let a = node(MemShare::with(&[&data]), &[], None).await;
    // b bootstraps by IP:PORT, c by multiaddr with /p2p/ID.
    let b = node(MemShare::with(&[]), &[by_ip(&a)], None).await;
    let c = node(MemShare::with(&[]), &[by_multiaddr(&a)], None).await;
    assert!(wait_connected(&b, &a).await, "b never connected to a");
    assert!(wait_connected(&c, &a).await, "c never connected to a");
    assert!(wait_connected(&a, &b).await && wait_connected(&a, &c).await);
    // The peers gauge follows the connection events: give it a moment (it raced this check).
    let mut gauge_polls = 0;
    while a.metrics.peers.get() < 2 && gauge_polls < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        gauge_polls += 1;
    }
    assert!(
        a.metrics.peers.get() >= 2,
        "a counts {} peers",
        a.metrics.peers.get()
    );
    // Both reach a's routing table (identify, then the 1 s sweep counts them).
    let mut dht = 0;
    for _ in 0..40 {
        dht = a.metrics.dht_peers.get();
        if dht >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dht, 2, "eddy_p2p_dht_peers");

    // a advertises what its share lists (the reconcile loop); b finds it, never itself.
    let key = digest.to_string();
    let found = wait_provider(&b, key.as_bytes(), a.p2p.local_peer_id()).await;
    assert_eq!(found, vec![a.p2p.local_peer_id()]);
    assert_eq!(a.metrics.advertised_digests.get(), 1);

    let whole = fetch_from(&b, &a, &digest, 0).await;
    assert_eq!((whole.len, whole.offset), (data.len() as u64, 0));
    assert_eq!(body_of(whole).await, data.as_ref());
    let from = 1_234_567u64;
    let tail = fetch_from(&c, &a, &digest, from).await;
    assert_eq!((tail.len, tail.offset), (data.len() as u64, from));
    assert_eq!(body_of(tail).await, &data[from as usize..]);

    // Not found: counted, and an error the caller can move on from.
    let missing = Digest::of(b"nobody has this");
    let e = err_of(b.p2p.fetch(a.p2p.local_peer_id(), &missing, 0).await);
    assert!(matches!(e, PeerError::NotFound), "{e}");
    assert_eq!(failures(&b, "not_found"), 1);
    assert!(b
        .p2p
        .providers(missing.to_string().as_bytes(), Duration::from_millis(300))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_keys_are_found_and_withdrawn_and_tags_answer() {
    let a = node(MemShare::with(&[]), &[], None).await;
    let share_b = MemShare::with(&[]);
    // By host name, resolved like a headless Service's.
    let b = node(
        Arc::clone(&share_b),
        &[format!("localhost:{}", tcp_port(&a))],
        None,
    )
    .await;
    assert!(wait_connected(&a, &b).await);
    let key = b"fill:sha256:0000000000000000000000000000000000000000000000000000000000000000";
    assert!(
        b.p2p.provide(key, Duration::from_secs(5)).await,
        "provide did not complete"
    );
    let found = wait_provider(&a, key, b.p2p.local_peer_id()).await;
    assert_eq!(found, vec![b.p2p.local_peer_id()]);
    // The reconcile loop (every 500 ms here) does not withdraw an explicit key.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        a.p2p.providers(key, Duration::from_secs(1)).await,
        vec![b.p2p.local_peer_id()]
    );
    // An explicit digest key (a download in flight) that the share does not list yet is
    // not withdrawn by the reconcile loop either, and counts as advertised.
    let in_flight = Digest::of(b"in flight").to_string();
    assert!(
        b.p2p
            .provide(in_flight.as_bytes(), Duration::from_secs(5))
            .await
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(b.metrics.advertised_digests.get(), 1);
    assert_eq!(
        a.p2p
            .providers(in_flight.as_bytes(), Duration::from_secs(1))
            .await,
        vec![b.p2p.local_peer_id()]
    );
    b.p2p.stop_providing(in_flight.as_bytes());
    b.p2p.stop_providing(key);
    // Withdrawn locally: b no longer answers as provider; a's copy of the record lives
    // until its TTL, which is the DHT's contract (callers tolerate stale providers).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.metrics.advertised_digests.get(), 0);

    let tag = TagAnswer {
        digest: Digest::of(b"manifest"),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        seen_at: 1_700_000_000,
    };
    share_b
        .tags
        .lock()
        .unwrap()
        .insert("docker.io/library/alpine:3.20".into(), tag.clone());
    let answer = a
        .p2p
        .tag(b.p2p.local_peer_id(), "docker.io", "library/alpine", "3.20")
        .await
        .unwrap();
    assert_eq!(answer, Some(tag));
    let none = a
        .p2p
        .tag(b.p2p.local_peer_id(), "docker.io", "library/alpine", "edge")
        .await
        .unwrap();
    assert_eq!(none, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_that_disappear_are_no_longer_advertised() {
    let data = blob(1000, 1);
    let digest = Digest::of(&data);
    let share = MemShare::with(&[&data]);
    let a = node(Arc::clone(&share), &[], None).await;
    wait_advertised(&a, 1).await;
    assert_eq!(a.metrics.advertised_digests.get(), 1);
    share.blobs.lock().unwrap().remove(&digest);
    wait_advertised(&a, 0).await;
    assert_eq!(a.metrics.advertised_digests.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_swarm_key_can_neither_join_nor_fetch() {
    let data = blob(4096, 3);
    let digest = Digest::of(&data);
    let a = node(MemShare::with(&[&data]), &[], Some([1; 32])).await;
    let member = node(MemShare::with(&[]), &[by_ip(&a)], Some([1; 32])).await;
    let outsider = node(MemShare::with(&[]), &[by_multiaddr(&a)], Some([2; 32])).await;
    let no_key = node(MemShare::with(&[]), &[by_multiaddr(&a)], None).await;
    assert!(
        wait_connected(&member, &a).await,
        "a member with the key must join"
    );
    let fetched = fetch_from(&member, &a, &digest, 0).await;
    assert_eq!(body_of(fetched).await, data.as_ref());
    // Several resolve rounds (500 ms each) of dial attempts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in [&outsider, &no_key] {
        assert!(n.p2p.peers().is_empty(), "{:?}", n.p2p.peers());
        let e = err_of(n.p2p.fetch(a.p2p.local_peer_id(), &digest, 0).await);
        assert!(
            matches!(e, PeerError::Connect(_) | PeerError::Timeout),
            "{e}"
        );
        assert!(n
            .p2p
            .providers(digest.to_string().as_bytes(), Duration::from_millis(300))
            .await
            .is_empty());
    }
    let ids: Vec<String> = a.p2p.peers().into_iter().map(|p| p.peer_id).collect();
    assert_eq!(ids, vec![member.p2p.local_peer_id().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_bootstrap_is_not_an_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let a = node(
        MemShare::with(&[]),
        &[
            format!("127.0.0.1:{port}"),
            "does-not-exist.invalid:4001".into(),
        ],
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(a.p2p.peers().is_empty());
    // Lookups and provides with nobody around end within their bound.
    let t = Instant::now();
    assert!(a
        .p2p
        .providers(b"sha256:x", Duration::from_millis(200))
        .await
        .is_empty());
    let _ = a.p2p.provide(b"tag:x", Duration::from_millis(200)).await;
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_use_the_data_port_and_fall_back_in_band_without_it() {
    let data = blob(2 << 20, 3);
    let digest = Digest::of(&data);
    let a = node(MemShare::with(&[&data]), &[], None).await;
    let b = joined(&a).await;
    // Over the data port: the ticket is spent, so none is left held.
    let opened = fetch_from(&b, &a, &digest, 5).await;
    assert_eq!(body_of(opened).await, &data[5..]);
    assert_eq!(failures(&b, "data_port"), 0);
    assert!(a.p2p.inner.data.tickets.lock().unwrap().is_empty());
    // The data port goes away (a firewall between nodes): the same fetch comes in-band,
    // and later ones go in-band straight away.
    a.p2p.inner.data.stop();
    for _ in 0..2 {
        let opened = fetch_from(&b, &a, &digest, 0).await;
        assert_eq!(body_of(opened).await, data.as_ref());
    }
    assert_eq!(failures(&b, "data_port"), 1);
}

fn closed_port() -> u16 {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    closed.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_node_that_starts_later_is_dialled_again_within_seconds() {
    // The resolve loop would dial again only after a minute: the redial backoff must.
    let later = closed_port();
    let a = node_on(
        0,
        MemShare::with(&[]),
        &[format!("127.0.0.1:{later}")],
        None,
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.p2p.peers().is_empty());
    let b = node_on(
        later,
        MemShare::with(&[]),
        &[],
        None,
        Duration::from_secs(60),
    )
    .await;
    // Failed dials are retried after 1 s, 2 s, 4 s (+ jitter): within 5 s here.
    let mut connected = false;
    for _ in 0..4 {
        if wait_connected(&a, &b).await {
            connected = true;
            break;
        }
    }
    assert!(
        connected,
        "the node that started later was not dialled again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_list_each_other_and_start_together_connect() {
    // Each dials the other at once (a DaemonSet's first moments), from a port of its own.
    let (pa, pb) = (closed_port(), closed_port());
    let share = MemShare::with(&[]);
    let resolve = Duration::from_secs(60);
    let (to_b, to_a) = ([format!("127.0.0.1:{pb}")], [format!("127.0.0.1:{pa}")]);
    let (a, b) = tokio::join!(
        node_on(pa, share.clone(), &to_b, None, resolve),
        node_on(pb, share.clone(), &to_a, None, resolve)
    );
    let mut connected = false;
    for _ in 0..4 {
        if wait_connected(&a, &b).await && wait_connected(&b, &a).await {
            connected = true;
            break;
        }
    }
    assert!(connected, "two nodes that list each other did not connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_sending_fails_the_body_instead_of_hanging() {
    // The serving node announces 1 MiB, sends 10 bytes, then nothing.
    let stalling = Arc::new(StallShare);
    let a = node_with(stalling).await;
    let b = joined(&a).await;
    let opened = fetch_from(&b, &a, &Digest::of(b"x"), 0).await;
    assert_eq!(opened.len, 1 << 20);
    let mut body = opened.body;
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(first.len(), 10);
    let t = Instant::now();
    let e = body.next().await.unwrap().unwrap_err();
    assert!(e.to_string().contains("no byte"), "{e}");
    assert!(t.elapsed() >= STALL_TIMEOUT - Duration::from_secs(1));
    assert!(body.next().await.is_none());
    assert_eq!(failures(&b, "stall"), 1);
}

struct StallShare;

impl PeerShare for StallShare {
    fn open(&self, _: &Digest, from: u64) -> BoxFuture<'_, Option<Opened>> {
        Box::pin(async move {
            let first = futures_util::stream::once(async { Ok(Bytes::from_static(b"0123456789")) });
            let never = futures_util::stream::pending();
            Some(Opened {
                len: 1 << 20,
                offset: from,
                body: first.chain(never).boxed(),
                media_type: None,
            })
        })
    }
    fn tag(&self, _: &str, _: &str, _: &str) -> Option<TagAnswer> {
        None
    }
    fn digests(&self) -> Vec<Digest> {
        Vec::new()
    }
}

async fn node_with(share: Arc<dyn PeerShare>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let config = P2pConfig::new("/ip4/127.0.0.1/tcp/0".parse().unwrap(), dir.path());
    started(config, share, dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let start = || async {
        let config = P2pConfig::new("/ip4/127.0.0.1/tcp/0".parse().unwrap(), dir.path());
        P2p::start(config, MemShare::with(&[]), P2pMetrics::default())
            .await
            .unwrap()
            .local_peer_id()
    };
    let first = start().await;
    assert_eq!(start().await, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_listen_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = P2pConfig::new(
        format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap(),
        dir.path(),
    );
    let e = P2p::start(config, MemShare::with(&[]), P2pMetrics::default())
        .await
        .err()
        .expect("a taken port must fail")
        .to_string();
    assert!(
        e.contains("--p2p-listen") && e.contains(&port.to_string()),
        "{e}"
    );
}

/// Throughput of one 512 MiB blob between two in-process nodes over loopback. Run it with
/// `cargo test --release -p agent p2p::tests::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (512 MiB), not a check; run explicitly"]
async fn throughput_512mib_over_loopback() {
    let data = blob(512 << 20, 9);
    let digest = Digest::of(&data);
    let a = node(MemShare::with(&[&data]), &[], None).await;
    let b = joined(&a).await;
    // Warm the connection (yamux windows grow with use).
    let warm = fetch_from(&b, &a, &digest, (512 << 20) - (8 << 20)).await;
    body_of(warm).await;
    let cpu_before = cpu_seconds();
    let t = Instant::now();
    let opened = fetch_from(&b, &a, &digest, 0).await;
    let mut n = 0usize;
    let mut body = opened.body;
    while let Some(chunk) = body.next().await {
        n += chunk.unwrap().len();
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    assert_eq!(n, 512 << 20);
    // CPU time of both ends together (user + system, this process): what the transfer costs
    // regardless of how busy the machine is.
    println!(
        "p2p throughput: 512 MiB in {secs:.3} s = {:.2} GB/s ({:.0} MiB/s); {cpu:.3} CPU-s for both ends",
        n as f64 / secs / 1e9,
        n as f64 / secs / (1 << 20) as f64
    );
}

fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn err_of(r: Result<Opened, PeerError>) -> PeerError {
    match r {
        Ok(o) => panic!("expected an error, got {} bytes from {}", o.len, o.offset),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_node_that_goes_away_fails_the_body_promptly() {
    let a = node_with(Arc::new(StallShare)).await;
    let b = joined(&a).await;
    let opened = fetch_from(&b, &a, &Digest::of(b"x"), 0).await;
    let mut body = opened.body;
    assert_eq!(body.next().await.unwrap().unwrap().len(), 10);
    let t = Instant::now();
    // The node stops (its last handle dropped): its connections close.
    drop(a);
    let e = body.next().await.unwrap().unwrap_err();
    assert!(
        t.elapsed() < STALL_TIMEOUT / 2,
        "took {:?}: {e}",
        t.elapsed()
    );
    assert!(body.next().await.is_none());
}

/// The home's claims over the swarm: the first asker fetches, whether it asked from afar or
/// is the home itself, and a later asker is told that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_homes_claim_names_the_first_asker_also_when_that_is_the_home() {
    let home = node(MemShare::with(&[]), &[], None).await;
    let b = joined(&home).await;
    let c = joined(&home).await;
    let (h, b_id, c_id) = (
        home.p2p.local_peer_id(),
        b.p2p.local_peer_id(),
        c.p2p.local_peer_id(),
    );
    // The home claims first, locally: the remote askers after it are told the home.
    let first = Digest::of(b"claimed by the home");
    assert_eq!(home.p2p.claim(h, &first, None).await.unwrap(), h);
    assert_eq!(b.p2p.claim(h, &first, None).await.unwrap(), h);
    assert_eq!(c.p2p.claim(h, &first, None).await.unwrap(), h);
    // A remote node claims first: the home itself and later askers are told that node.
    let second = Digest::of(b"claimed from afar");
    assert_eq!(b.p2p.claim(h, &second, None).await.unwrap(), b_id);
    assert_eq!(home.p2p.claim(h, &second, None).await.unwrap(), b_id);
    assert_eq!(c.p2p.claim(h, &second, None).await.unwrap(), b_id);
    // The fetcher could not serve `c`: `c` takes over.
    assert_eq!(c.p2p.claim(h, &second, Some(b_id)).await.unwrap(), c_id);
}
