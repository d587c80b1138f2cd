//! Peer choice, the home node's claims and the hedged asks, over an in-memory `PeerNetwork`.
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use futures_util::TryStreamExt;

use super::*;

/// What a peer serves: its content, and the bytes it sends before failing (None = all).
type Served = (Vec<u8>, Option<usize>);

/// An in-memory network: which node provides which key, and what each peer serves.
#[derive(Default)]
struct World {
    records: Mutex<BTreeMap<Vec<u8>, BTreeSet<PeerKey>>>,
    /// peer → (content, bytes to send before failing; None = all)
    content: Mutex<HashMap<PeerKey, Served>>,
    slow: Mutex<BTreeSet<PeerKey>>,
    failures: Mutex<Vec<(PeerKey, &'static str)>>,
    /// The next this many lookups find nothing: records that have not reached the
    /// asking node yet.
    blind_lookups: std::sync::atomic::AtomicUsize,
    /// The home's claims (every node sees the same members, so one home per digest).
    claims: Mutex<HashMap<Digest, PeerKey>>,
    /// Nodes that left: not members, and they never answer.
    departed: Mutex<BTreeSet<PeerKey>>,
    /// The home does not answer claims.
    home_down: std::sync::atomic::AtomicBool,
}

struct Node {
    me: PeerKey,
    world: Arc<World>,
}

fn key(s: &str) -> PeerKey {
    PeerKey(s.to_string())
}

impl PeerNetwork for Node {
    fn local(&self) -> PeerKey {
        self.me.clone()
    }
    fn connected(&self) -> usize {
        3
    }
    fn provide(&self, key: Vec<u8>, _: Duration) -> BoxFuture<'static, bool> {
        let me = self.me.clone();
        self.world
            .records
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .insert(me);
        Box::pin(async { true })
    }
    fn providers(&self, key: Vec<u8>, _: Duration) -> BoxFuture<'static, Vec<PeerKey>> {
        use std::sync::atomic::Ordering::SeqCst;
        let blind = self.world.blind_lookups.load(SeqCst);
        if blind > 0 {
            self.world.blind_lookups.store(blind - 1, SeqCst);
            return Box::pin(async { Vec::new() });
        }
        let found: Vec<PeerKey> = self
            .world
            .records
            .lock()
            .unwrap()
            .get(&key)
            .map(|s| s.iter().filter(|p| **p != self.me).cloned().collect())
            .unwrap_or_default();
        Box::pin(async move { found })
    }
    fn fetch(
        &self,
        peer: PeerKey,
        _: Digest,
        from: u64,
    ) -> BoxFuture<'static, Result<Opened, BoxError>> {
        let slow = self.world.slow.lock().unwrap().contains(&peer);
        let departed = self.world.departed.lock().unwrap().contains(&peer);
        let served = self.world.content.lock().unwrap().get(&peer).cloned();
        Box::pin(async move {
            if departed {
                // A dial to an address nobody answers: a long TCP timeout.
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            if slow {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            let (data, fail_after) = served.ok_or("not found")?;
            let len = data.len() as u64;
            let mut part = data[from as usize..].to_vec();
            let mut items: Vec<Result<Bytes, BoxError>> = Vec::new();
            if let Some(n) = fail_after {
                part.truncate(n.saturating_sub(from as usize));
            }
            items.extend(part.chunks(4).map(|c| Ok(Bytes::copy_from_slice(c))));
            if fail_after.is_some() {
                items.push(Err("peer went away".into()));
            }
            Ok(Opened {
                len,
                offset: from,
                body: futures_util::stream::iter(items).boxed(),
                media_type: None,
            })
        })
    }
    fn tag(
        &self,
        peer: PeerKey,
        _: String,
        _: String,
        _: String,
    ) -> BoxFuture<'static, Result<Option<TagAnswer>, BoxError>> {
        let seen_at = peer.0.len() as u64;
        Box::pin(async move {
            Ok(Some(TagAnswer {
                digest: Digest::of(peer.0.as_bytes()),
                media_type: "m".into(),
                seen_at,
            }))
        })
    }
    fn report_failure(&self, peer: &PeerKey, reason: &'static str) {
        self.world
            .failures
            .lock()
            .unwrap()
            .push((peer.clone(), reason));
    }
    fn members(&self) -> Vec<PeerKey> {
        let departed = self.world.departed.lock().unwrap();
        [
            "n0", "n1", "n2", "n3", "early", "late", "a", "b", "me", "rogue",
        ]
        .into_iter()
        .map(key)
        .filter(|p| *p != self.me && !departed.contains(p))
        .collect()
    }
    fn claim(
        &self,
        _home: PeerKey,
        digest: Digest,
        stale: Option<PeerKey>,
    ) -> BoxFuture<'static, Result<PeerKey, BoxError>> {
        if self
            .world
            .home_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Box::pin(std::future::pending());
        }
        let mut claims = self.world.claims.lock().unwrap();
        let fetcher = match claims.get(&digest) {
            Some(f) if stale.as_ref() != Some(f) => f.clone(),
            _ => {
                claims.insert(digest, self.me.clone());
                self.me.clone()
            }
        };
        Box::pin(async move { Ok(fetcher) })
    }
}

fn node(world: &Arc<World>, me: &str) -> Peers {
    Peers::new(Arc::new(Node {
        me: key(me),
        world: Arc::clone(world),
    }))
}

/// `name` announces itself in the DHT as a provider of `digest`.
async fn provide(world: &Arc<World>, name: &str, digest: &Digest) {
    node(world, name)
        .net
        .provide(content_key(digest), LOOKUP_BOUND)
        .await;
}

impl World {
    /// What `name` serves when asked: `data`, failing after `fail_after` bytes if given.
    fn serve(&self, name: &str, data: Vec<u8>, fail_after: Option<usize>) {
        self.content
            .lock()
            .unwrap()
            .insert(key(name), (data, fail_after));
    }
}

/// The whole of `digest` as a new node "me" gets it from the peers holding it.
async fn held_body(world: &Arc<World>, digest: &Digest) -> Vec<u8> {
    body(node(world, "me").open_held(digest, 0).await.unwrap()).await
}

async fn body(b: PeerBody) -> Vec<u8> {
    b.opened
        .body
        .try_fold(Vec::new(), |mut v, c| async move {
            v.extend_from_slice(&c);
            Ok(v)
        })
        .await
        .unwrap()
}

#[test]
fn every_node_that_sees_the_same_members_picks_the_same_home() {
    let nodes: Vec<PeerKey> = (0..8).map(|i| key(&format!("node-{i}"))).collect();
    let mut homes = BTreeSet::new();
    for i in 0..50u8 {
        let digest = Digest::of(&[i]);
        let first = home(&digest, &nodes[0], &nodes);
        for n in &nodes {
            let others: Vec<PeerKey> = nodes.iter().filter(|o| *o != n).cloned().collect();
            assert_eq!(home(&digest, n, &others), first, "{n} picked another home");
        }
        homes.insert(first);
    }
    assert!(homes.len() > 4, "homes spread over the nodes: {homes:?}");
}

#[tokio::test]
async fn simultaneous_misses_elect_one_fetcher_and_the_others_stream_from_it() {
    let world = Arc::new(World::default());
    let digest = Digest::of(b"blob");
    let peers: Vec<Peers> = (0..4).map(|i| node(&world, &format!("n{i}"))).collect();
    let elections =
        futures_util::future::join_all(peers.iter().map(|p| p.elect(&digest, None))).await;
    let fetchers: Vec<usize> = (0..4)
        .filter(|i| matches!(elections[*i], Election::Upstream))
        .collect();
    assert_eq!(fetchers.len(), 1, "exactly one node fetches upstream");
    let fetcher = key(&format!("n{}", fetchers[0]));
    for e in &elections {
        if let Election::Peer(p) = e {
            assert_eq!(*p, fetcher);
        }
    }
    tokio::task::yield_now().await;
    assert_eq!(
        world
            .records
            .lock()
            .unwrap()
            .get(&content_key(&digest))
            .map(|s| s.len()),
        Some(1),
        "the fetcher announced the content before fetching it"
    );
}

#[tokio::test]
async fn announce_then_fetch_lets_simultaneous_misses_each_fetch_and_late_ones_join() {
    let world = Arc::new(World::default());
    let names = ["a", "b", "n0"];
    let node = |me: &str| {
        Peers::with_single_flight(
            Arc::new(Node {
                me: key(me),
                world: Arc::clone(&world),
            }),
            SingleFlight::Announce,
        )
    };
    let digest = Digest::of(b"announce");
    // Misses at the same moment: no waiting, so every one of them fetches.
    let simultaneous: Vec<Peers> = names.iter().map(|n| node(n)).collect();
    let elections =
        futures_util::future::join_all(simultaneous.iter().map(|p| p.elect(&digest, None))).await;
    assert!(elections.iter().all(|e| matches!(e, Election::Upstream)));
    // Each announced the content at once: a node that looks now finds them.
    let late = node("me");
    let holders = late.net.providers(content_key(&digest), LOOKUP_BOUND).await;
    assert_eq!(holders.len(), names.len());
}

#[tokio::test]
async fn a_late_miss_joins_the_fetch_even_when_its_lookup_finds_nobody() {
    for i in 0..20u8 {
        let world = Arc::new(World::default());
        let digest = Digest::of(&[i]);
        let (early, late) = (node(&world, "early"), node(&world, "late"));
        assert!(matches!(
            early.elect(&digest, None).await,
            Election::Upstream
        ));
        // The DHT has not carried the early node's record to the late one yet: the home's
        // claim still names the fetcher.
        world
            .blind_lookups
            .store(1, std::sync::atomic::Ordering::SeqCst);
        assert!(late.open_held(&digest, 0).await.is_none());
        match late.elect(&digest, None).await {
            Election::Peer(peer) => assert_eq!(peer, key("early")),
            Election::Upstream => panic!("{digest}: the late node fetched upstream too"),
        }
    }
}

#[tokio::test]
async fn a_fetcher_that_could_not_serve_is_replaced() {
    let world = Arc::new(World::default());
    let digest = Digest::of(b"evicted");
    let (a, b) = (node(&world, "a"), node(&world, "b"));
    assert!(matches!(a.elect(&digest, None).await, Election::Upstream));
    assert!(matches!(
        b.elect(&digest, Some(key("a"))).await,
        Election::Upstream
    ));
    assert!(matches!(a.elect(&digest, None).await, Election::Peer(p) if p == key("b")));
}

#[tokio::test(start_paused = true)]
async fn a_home_that_does_not_answer_costs_at_most_the_claim_bound() {
    let world = Arc::new(World::default());
    world
        .home_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let me = node(&world, "me");
    assert!(matches!(
        me.elect(&Digest::of(b"x"), None).await,
        Election::Upstream
    ));
    assert_eq!(started.elapsed(), CLAIM_BOUND);
}

#[tokio::test(start_paused = true)]
async fn a_departed_provider_never_holds_a_pull_beyond_the_bounds() {
    let world = Arc::new(World::default());
    let data = vec![3u8; 64];
    let digest = Digest::of(&data);
    for name in ["a", "b"] {
        provide(&world, name, &digest).await;
    }
    world.departed.lock().unwrap().insert(key("a"));
    world.serve("b", data.clone(), None);
    // Only the live provider is asked: no wait at all on the departed one.
    for _ in 0..4 {
        let started = tokio::time::Instant::now();
        assert_eq!(held_body(&world, &digest).await, data);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "waited on the departed node"
        );
    }
    // Only departed providers: peers are left at once, not after a dial timeout.
    world.departed.lock().unwrap().insert(key("b"));
    let started = tokio::time::Instant::now();
    assert!(node(&world, "me").open_held(&digest, 0).await.is_none());
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn held_content_comes_from_a_provider_and_resumes_at_the_next() {
    let world = Arc::new(World::default());
    let data: Vec<u8> = (0..200u8).collect();
    let digest = Digest::of(&data);
    for (name, fail_after) in [("a", Some(50)), ("b", None)] {
        provide(&world, name, &digest).await;
        world.serve(name, data.clone(), fail_after);
    }
    // Whichever is asked first, the body is whole.
    for _ in 0..6 {
        assert_eq!(held_body(&world, &digest).await, data);
    }
    let got = node(&world, "me").open_held(&digest, 120).await.unwrap();
    assert_eq!(got.opened.offset, 120);
    assert_eq!(body(got).await, data[120..].to_vec());
}

#[tokio::test(start_paused = true)]
async fn a_slow_provider_is_hedged() {
    let world = Arc::new(World::default());
    let data = vec![9u8; 40];
    let digest = Digest::of(&data);
    for name in ["a", "b"] {
        provide(&world, name, &digest).await;
        world.serve(name, data.clone(), None);
    }
    world.slow.lock().unwrap().insert(key("a"));
    let started = tokio::time::Instant::now();
    for _ in 0..4 {
        assert_eq!(held_body(&world, &digest).await, data);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "never waited for the slow one"
    );
}

#[tokio::test]
async fn a_blamed_peer_is_avoided() {
    let world = Arc::new(World::default());
    let data = vec![1u8; 10];
    let digest = Digest::of(&data);
    provide(&world, "rogue", &digest).await;
    world.serve("rogue", data, None);
    let me = node(&world, "me");
    assert!(me.open_held(&digest, 0).await.is_some());
    me.blame(&[key("rogue")], "digest_mismatch");
    assert!(me.open_held(&digest, 0).await.is_none());
    assert_eq!(
        world.failures.lock().unwrap().as_slice(),
        &[(key("rogue"), "digest_mismatch")]
    );
}

#[tokio::test]
async fn the_newest_tag_record_wins() {
    let world = Arc::new(World::default());
    for name in ["short", "much-longer-name"] {
        node(&world, name).announce_tag("r.example", "app", "v1");
    }
    tokio::task::yield_now().await;
    let answer = node(&world, "me")
        .tag("r.example", "app", "v1")
        .await
        .unwrap();
    assert_eq!(answer.seen_at, "much-longer-name".len() as u64);
}
