//! Fetching from other nodes: which peer to ask, and when to go upstream instead.
//!
//! - Content that peers hold (complete, or streaming from their own download in flight) is
//!   found by a bounded provider lookup of its digest. Providers are asked one after another,
//!   hedged: when the first has not answered within `HEDGE_AFTER`, the next is asked too and
//!   the first answer wins. A body that fails mid-way resumes with Range at the next provider.
//! - Content nobody holds yet goes through an election, so that when several nodes miss the
//!   same blob at once the cluster fetches it upstream about once. Each node that misses it
//!   announces that it is about to fetch it (the `fill:` key), waits a moment for the others'
//!   announcements, and the announcer that the digest hashes highest onto (rendezvous hashing)
//!   fetches it upstream; the others stream from that node. A node that sees the winner always
//!   picks it, and a node that misses some announcements picks a node that ranks higher than
//!   itself, so the "streams from" relation has no cycles. A winner announces the content and
//!   looks once more: if a fetcher ranking above it announced meanwhile (its claim was late
//!   for this node's wait), it joins that one, which keeps the relation acyclic too.
//! - A peer whose bytes did not verify is avoided for a while (`blame`).
//!
//! The network itself (libp2p) sits behind `PeerNetwork`, so this logic is tested without it.
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{future::BoxFuture, stream::FuturesUnordered, StreamExt};
use rand::seq::SliceRandom;
use sha2::{Digest as _, Sha256};
use tracing::debug;

use crate::{
    digest::Digest,
    failover::{resuming, Resume},
    source::{Opened, TagAnswer},
    store::BoxError,
};

/// How long a provider lookup may take on the request path.
pub const LOOKUP_BOUND: Duration = Duration::from_millis(60);
/// How long an announcement may take to reach the nodes that keep its records.
const ANNOUNCE_BOUND: Duration = Duration::from_millis(300);
/// After announcing, how long to wait for the announcements of nodes that missed the same blob
/// at nearly the same moment.
const SETTLE: Duration = Duration::from_millis(40);
/// When the provider asked first has not answered within this, the next is asked as well.
const HEDGE_AFTER: Duration = Duration::from_millis(250);
/// Providers asked for one request, at most.
const MAX_PROVIDERS: usize = 4;
/// A peer whose bytes did not verify is not asked again for this long.
const AVOID_FOR: Duration = Duration::from_secs(300);

/// A peer, by the text form of its identity.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub String);

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the peer-to-peer network offers (implemented over libp2p by `p2p`).
pub trait PeerNetwork: Send + Sync + 'static {
    fn local(&self) -> PeerKey;
    /// Peers connected right now. With none, nothing is looked up (no delay on a lone node).
    fn connected(&self) -> usize;
    /// Announce `key`; resolves when the record is stored, or after `bound` (false then).
    fn provide(&self, key: Vec<u8>, bound: Duration) -> BoxFuture<'static, bool>;
    fn stop_providing(&self, key: Vec<u8>);
    /// Other nodes that announced `key`, as many as were found within `bound`.
    fn providers(&self, key: Vec<u8>, bound: Duration) -> BoxFuture<'static, Vec<PeerKey>>;
    fn fetch(
        &self,
        peer: PeerKey,
        digest: Digest,
        from: u64,
    ) -> BoxFuture<'static, Result<Opened, BoxError>>;
    fn tag(
        &self,
        peer: PeerKey,
        registry: String,
        repository: String,
        tag: String,
    ) -> BoxFuture<'static, Result<Option<TagAnswer>, BoxError>>;
    fn report_failure(&self, peer: &PeerKey, reason: &'static str);
}

/// The DHT key under which nodes announce that they hold `digest` (or are streaming it).
pub fn content_key(digest: &Digest) -> Vec<u8> {
    digest.to_string().into_bytes()
}

fn fill_key(digest: &Digest) -> Vec<u8> {
    format!("fill:{digest}").into_bytes()
}

pub fn tag_key(registry: &str, repository: &str, tag: &str) -> Vec<u8> {
    format!("tag:{registry}/{repository}:{tag}").into_bytes()
}

/// Where a blob nobody holds yet should come from.
pub enum Election {
    /// This node fetches it upstream. Holding the claim keeps the announcement up.
    Upstream(Claim),
    /// Stream it from this peer, which ranks higher and fetches (or streams) it itself.
    Peer(PeerKey, Claim),
}

/// A `fill:` announcement, withdrawn when dropped (the fill ended).
pub struct Claim {
    net: Arc<dyn PeerNetwork>,
    key: Vec<u8>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.net.stop_providing(std::mem::take(&mut self.key));
    }
}

/// Content opened at a peer, with the peers that contributed bytes (to blame on a bad digest).
pub struct PeerBody {
    pub opened: Opened,
    pub contributors: Arc<Mutex<Vec<PeerKey>>>,
}

/// How a node that misses content nobody holds decides to fetch it upstream
/// (`--p2p-single-flight`). `cargo xtask bench` measures both on a simultaneous cold wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SingleFlight {
    /// Announce, wait [`SETTLE`] for the others' announcements, and let rendezvous hashing
    /// over the announcers pick the one that fetches (the module comment).
    #[default]
    Elect,
    /// Announce-then-fetch: announce the content at once and fetch it; nodes that look it
    /// up after the announcement stream from this one, nodes that missed it at the same
    /// moment fetch it too.
    Announce,
}

pub struct Peers {
    net: Arc<dyn PeerNetwork>,
    single_flight: SingleFlight,
    avoid: Mutex<HashMap<PeerKey, Instant>>,
    /// Tag keys announced already (a tag is revalidated on every pull; its record stands).
    tags: Mutex<std::collections::HashSet<Vec<u8>>>,
}

impl Peers {
    pub fn new(net: Arc<dyn PeerNetwork>) -> Self {
        Self::with_single_flight(net, SingleFlight::default())
    }

    pub fn with_single_flight(net: Arc<dyn PeerNetwork>, single_flight: SingleFlight) -> Self {
        Peers {
            net,
            single_flight,
            avoid: Mutex::new(HashMap::new()),
            tags: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Whether any peer is connected: without one there is nothing to ask.
    pub fn is_active(&self) -> bool {
        self.net.connected() > 0
    }

    /// `digest` from a peer that holds it or is streaming it, from byte `from`.
    pub async fn open_held(&self, digest: &Digest, from: u64) -> Option<PeerBody> {
        if !self.is_active() {
            return None;
        }
        let mut providers =
            self.usable(self.net.providers(content_key(digest), LOOKUP_BOUND).await);
        if providers.is_empty() {
            return None;
        }
        // Spread the load of a wave over every node that has the content.
        providers.shuffle(&mut rand::thread_rng());
        providers.truncate(MAX_PROVIDERS);
        self.open_any(providers, digest, from).await
    }

    /// Decide who fetches `digest` upstream when nobody holds it (see the module comment).
    pub async fn elect(&self, digest: &Digest) -> Election {
        let key = fill_key(digest);
        let claim = Claim {
            net: Arc::clone(&self.net),
            key: key.clone(),
        };
        if !self.is_active() {
            return Election::Upstream(claim);
        }
        if self.single_flight == SingleFlight::Announce {
            // The caller's lookup found nobody: fetch, and let later lookups find this node.
            self.net.provide(content_key(digest), ANNOUNCE_BOUND).await;
            return Election::Upstream(claim);
        }
        self.net.provide(key.clone(), ANNOUNCE_BOUND).await;
        tokio::time::sleep(SETTLE).await;
        // A node that decided before this one's announcement could reach it has announced
        // the content itself by now: join it rather than rank against it.
        let (holders, others) = futures_util::join!(
            self.net.providers(content_key(digest), LOOKUP_BOUND),
            self.net.providers(key, LOOKUP_BOUND)
        );
        if let Some(holder) = self.usable(holders).into_iter().next() {
            debug!(%digest, peer = %holder, "election: another node already fetches it");
            return Election::Peer(holder, claim);
        }
        let others = self.usable(others);
        let me = self.net.local();
        match winner(digest, &me, &others) {
            Some(peer) => {
                debug!(%digest, %peer, "election: streaming from the node that fetches it");
                Election::Peer(peer, claim)
            }
            None => {
                // Announced before the upstream answers, so that nodes deciding after this
                // moment join this fetch (its bytes stream to them as they arrive).
                self.net.provide(content_key(digest), ANNOUNCE_BOUND).await;
                // A node whose claim reached the others after their wait ranked itself
                // against fewer nodes than they did, and can win in its own view as well.
                // The content records settle it: a node that now sees another announced
                // fetcher ranking above it joins that one (the top one never yields).
                let fetchers =
                    self.usable(self.net.providers(content_key(digest), LOOKUP_BOUND).await);
                if let Some(peer) = winner(digest, &me, &fetchers) {
                    debug!(%digest, %peer, "election: a fetcher ranking above this node announced meanwhile");
                    return Election::Peer(peer, claim);
                }
                Election::Upstream(claim)
            }
        }
    }

    /// `digest` from one given peer (the winner of an election).
    pub async fn open_from(&self, peer: PeerKey, digest: &Digest, from: u64) -> Option<PeerBody> {
        self.open_any(vec![peer], digest, from).await
    }

    /// Announce that this node can serve `digest` now (a download's first byte arrived).
    pub fn announce(&self, digest: &Digest) {
        self.announce_key(content_key(digest));
    }

    /// Announce this node's last-seen record of a public tag, for peers during an outage.
    pub fn announce_tag(&self, registry: &str, repository: &str, tag: &str) {
        let key = tag_key(registry, repository, tag);
        {
            let mut tags = self.tags.lock().unwrap();
            if tags.len() > 100_000 {
                tags.clear();
            }
            if !self.is_active() || !tags.insert(key.clone()) {
                return;
            }
        }
        self.announce_key(key);
    }

    fn announce_key(&self, key: Vec<u8>) {
        if !self.is_active() {
            return;
        }
        let provide = self.net.provide(key, ANNOUNCE_BOUND);
        tokio::spawn(provide);
    }

    /// The newest record of `registry/repository:tag` among the peers that announced it.
    pub async fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<TagAnswer> {
        if !self.is_active() {
            return None;
        }
        let mut providers = self.usable(
            self.net
                .providers(tag_key(registry, repository, tag), LOOKUP_BOUND * 4)
                .await,
        );
        providers.truncate(MAX_PROVIDERS);
        let asks: FuturesUnordered<_> = providers
            .into_iter()
            .map(|peer| {
                let ask = self.net.tag(
                    peer.clone(),
                    registry.to_string(),
                    repository.to_string(),
                    tag.to_string(),
                );
                async move {
                    (
                        peer,
                        tokio::time::timeout(Duration::from_secs(3), ask).await,
                    )
                }
            })
            .collect();
        let answers: Vec<_> = asks.collect().await;
        let mut newest: Option<TagAnswer> = None;
        for (peer, answer) in answers {
            match answer {
                Ok(Ok(Some(a))) if newest.as_ref().is_none_or(|n| a.seen_at > n.seen_at) => {
                    newest = Some(a)
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "tag lookup at peer failed");
                    self.net.report_failure(&peer, "tag");
                }
                Err(_) => self.net.report_failure(&peer, "timeout"),
            }
        }
        newest
    }

    /// Peers whose bytes did not verify: avoided for a while, and counted.
    pub fn blame(&self, peers: &[PeerKey], reason: &'static str) {
        let mut avoid = self.avoid.lock().unwrap();
        for peer in peers {
            self.net.report_failure(peer, reason);
            avoid.insert(peer.clone(), Instant::now());
        }
    }

    fn usable(&self, mut peers: Vec<PeerKey>) -> Vec<PeerKey> {
        let mut avoid = self.avoid.lock().unwrap();
        avoid.retain(|_, since| since.elapsed() < AVOID_FOR);
        peers.retain(|p| !avoid.contains_key(p));
        peers.sort();
        peers.dedup();
        peers
    }

    /// Ask `candidates` in order, hedged, and take the first that opens; the body resumes at
    /// the remaining ones if it fails mid-way.
    async fn open_any(
        &self,
        candidates: Vec<PeerKey>,
        digest: &Digest,
        from: u64,
    ) -> Option<PeerBody> {
        let mut waiting = candidates.into_iter();
        let mut asking = FuturesUnordered::new();
        let ask = |peer: PeerKey| {
            let open = self.net.fetch(peer.clone(), *digest, from);
            async move { (peer, open.await) }
        };
        asking.push(ask(waiting.next()?));
        let (peer, opened) = loop {
            let hedge = tokio::time::sleep(HEDGE_AFTER);
            tokio::select! {
                done = asking.next() => match done {
                    Some((peer, Ok(opened))) => break (peer, opened),
                    Some((peer, Err(e))) => {
                        // Counted by the network under its reason; not avoided: "not here"
                        // (withdrawn, or not public) is an answer, not a fault.
                        debug!(%peer, %digest, error = %e, "peer could not serve");
                        match waiting.next() {
                            Some(next) => asking.push(ask(next)),
                            None if asking.is_empty() => return None,
                            None => {}
                        }
                    }
                    None => return None,
                },
                () = hedge, if waiting.len() > 0 => {
                    if let Some(next) = waiting.next() {
                        asking.push(ask(next));
                    }
                }
            }
        };
        drop(asking);
        let contributors = Arc::new(Mutex::new(vec![peer]));
        let rest: Vec<PeerKey> = waiting.collect();
        let Opened {
            len,
            offset,
            body,
            media_type,
        } = opened;
        let body = resuming(
            body,
            offset,
            Some(len),
            self.resume_at(rest, *digest, Arc::clone(&contributors)),
        );
        Some(PeerBody {
            opened: Opened {
                len,
                offset,
                body,
                media_type,
            },
            contributors,
        })
    }

    /// Resumes a failed peer body at the next provider in `rest`.
    fn resume_at(
        &self,
        rest: Vec<PeerKey>,
        digest: Digest,
        contributors: Arc<Mutex<Vec<PeerKey>>>,
    ) -> Resume {
        let net = Arc::clone(&self.net);
        let rest = Arc::new(Mutex::new(rest.into_iter()));
        Box::new(move |pos| {
            let (net, rest, contributors) = (
                Arc::clone(&net),
                Arc::clone(&rest),
                Arc::clone(&contributors),
            );
            Box::pin(async move {
                loop {
                    let peer = rest.lock().unwrap().next()?;
                    match net.fetch(peer.clone(), digest, pos).await {
                        Ok(opened) if opened.offset == pos => {
                            contributors.lock().unwrap().push(peer);
                            return Some(opened.body);
                        }
                        Ok(_) => net.report_failure(&peer, "range"),
                        Err(_) => net.report_failure(&peer, "open"),
                    }
                }
            })
        })
    }
}

/// Rendezvous hashing: the peer among `others` that ranks above `me` for `digest`, if any.
pub fn winner(digest: &Digest, me: &PeerKey, others: &[PeerKey]) -> Option<PeerKey> {
    let score = |p: &PeerKey| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(p.0.as_bytes());
        h.update(digest.to_string().as_bytes());
        h.finalize().into()
    };
    let mine = score(me);
    others
        .iter()
        .filter(|p| *p != me)
        .map(|p| (score(p), p))
        .filter(|(s, _)| *s > mine)
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, p)| p.clone())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use bytes::Bytes;
    use futures_util::TryStreamExt;

    use super::*;

    /// An in-memory network: which node provides which key, and what each peer serves.
    #[derive(Default)]
    struct World {
        records: Mutex<BTreeMap<Vec<u8>, BTreeSet<PeerKey>>>,
        /// peer → (content, bytes to send before failing; None = all)
        content: Mutex<HashMap<PeerKey, (Vec<u8>, Option<usize>)>>,
        slow: Mutex<BTreeSet<PeerKey>>,
        failures: Mutex<Vec<(PeerKey, &'static str)>>,
        /// The next this many lookups find nothing: records that have not reached the
        /// asking node yet.
        blind_lookups: std::sync::atomic::AtomicUsize,
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
        fn stop_providing(&self, key: Vec<u8>) {
            if let Some(set) = self.world.records.lock().unwrap().get_mut(&key) {
                set.remove(&self.me);
            }
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
            let served = self.world.content.lock().unwrap().get(&peer).cloned();
            Box::pin(async move {
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
    }

    fn node(world: &Arc<World>, me: &str) -> Peers {
        Peers::new(Arc::new(Node {
            me: key(me),
            world: Arc::clone(world),
        }))
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
    fn every_node_that_sees_the_top_announcer_elects_it() {
        let nodes: Vec<PeerKey> = (0..8).map(|i| key(&format!("node-{i}"))).collect();
        for i in 0..50u8 {
            let digest = Digest::of(&[i]);
            let top = nodes
                .iter()
                .find(|n| winner(&digest, n, &nodes).is_none())
                .expect("exactly one node ranks first")
                .clone();
            for n in &nodes {
                let picked = winner(&digest, n, &nodes).unwrap_or_else(|| n.clone());
                assert_eq!(picked, top, "{n} picked another node for {digest}");
                // A partial view that includes the top node still picks it.
                let partial: Vec<PeerKey> = vec![top.clone(), nodes[0].clone()];
                assert_eq!(
                    winner(&digest, n, &partial).unwrap_or_else(|| n.clone()),
                    top
                );
            }
        }
    }

    #[tokio::test]
    async fn simultaneous_misses_elect_one_fetcher() {
        let world = Arc::new(World::default());
        let digest = Digest::of(b"blob");
        let peers: Vec<Peers> = (0..4).map(|i| node(&world, &format!("n{i}"))).collect();
        let elections =
            futures_util::future::join_all(peers.iter().map(|p| p.elect(&digest))).await;
        let upstream = elections
            .iter()
            .filter(|e| matches!(e, Election::Upstream(_)))
            .count();
        assert_eq!(upstream, 1, "exactly one node fetches upstream");
        drop(elections);
        let records = world.records.lock().unwrap();
        assert!(
            records.get(&fill_key(&digest)).is_none_or(|s| s.is_empty()),
            "claims are withdrawn when the fills end"
        );
        assert_eq!(
            records.get(&content_key(&digest)).map(|s| s.len()),
            Some(1),
            "the winner announced the content before fetching it"
        );
    }

    #[tokio::test]
    async fn announce_then_fetch_lets_simultaneous_misses_each_fetch_and_late_ones_join() {
        let world = Arc::new(World::default());
        let names = ["a", "b", "c"];
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
            futures_util::future::join_all(simultaneous.iter().map(|p| p.elect(&digest))).await;
        assert!(elections.iter().all(|e| matches!(e, Election::Upstream(_))));
        // Each announced the content at once: a node that looks now finds them.
        let late = node("d");
        let holders = late.net.providers(content_key(&digest), LOOKUP_BOUND).await;
        assert_eq!(holders.len(), names.len());
    }

    #[tokio::test]
    async fn a_late_miss_joins_the_fetch_whatever_its_rank() {
        for i in 0..20u8 {
            let world = Arc::new(World::default());
            let digest = Digest::of(&[i]);
            let (early, late) = (node(&world, "early"), node(&world, "late"));
            let first = early.elect(&digest).await;
            assert!(matches!(first, Election::Upstream(_)), "alone, it fetches");
            match late.elect(&digest).await {
                Election::Peer(peer, _) => assert_eq!(peer, key("early")),
                Election::Upstream(_) => panic!("{digest}: the late node fetched upstream too"),
            }
        }
    }

    #[tokio::test]
    async fn a_late_claim_that_wins_in_its_own_view_yields_to_a_higher_fetcher_it_sees_after() {
        let (mut yielded, mut kept) = (0, 0);
        for i in 0..20u8 {
            let world = Arc::new(World::default());
            let digest = Digest::of(&[i, 7]);
            let (early, late) = (node(&world, "early"), node(&world, "late"));
            let first = early.elect(&digest).await;
            assert!(matches!(first, Election::Upstream(_)), "alone, it fetches");
            // The late node's two lookups after its wait miss the early node's records.
            world
                .blind_lookups
                .store(2, std::sync::atomic::Ordering::SeqCst);
            let early_ranks_higher = winner(&digest, &key("late"), &[key("early")]).is_some();
            match late.elect(&digest).await {
                Election::Peer(peer, _) => {
                    assert!(
                        early_ranks_higher,
                        "{digest}: yielded to a lower-ranked node"
                    );
                    assert_eq!(peer, key("early"));
                    yielded += 1;
                }
                Election::Upstream(_) => {
                    assert!(
                        !early_ranks_higher,
                        "{digest}: fetched beside a higher-ranked node"
                    );
                    kept += 1;
                }
            }
        }
        assert!(yielded > 0 && kept > 0, "both ranks occur in 20 digests");
    }

    #[tokio::test]
    async fn held_content_comes_from_a_provider_and_resumes_at_the_next() {
        let world = Arc::new(World::default());
        let data: Vec<u8> = (0..200u8).collect();
        let digest = Digest::of(&data);
        for (name, fail_after) in [("a", Some(50)), ("b", None)] {
            node(&world, name)
                .net
                .provide(content_key(&digest), LOOKUP_BOUND)
                .await;
            world
                .content
                .lock()
                .unwrap()
                .insert(key(name), (data.clone(), fail_after));
        }
        // Whichever is asked first, the body is whole.
        for _ in 0..6 {
            let got = node(&world, "me").open_held(&digest, 0).await.unwrap();
            assert_eq!(body(got).await, data);
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
            node(&world, name)
                .net
                .provide(content_key(&digest), LOOKUP_BOUND)
                .await;
            world
                .content
                .lock()
                .unwrap()
                .insert(key(name), (data.clone(), None));
        }
        world.slow.lock().unwrap().insert(key("a"));
        let started = tokio::time::Instant::now();
        for _ in 0..4 {
            let got = node(&world, "me").open_held(&digest, 0).await.unwrap();
            assert_eq!(body(got).await, data);
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
        node(&world, "rogue")
            .net
            .provide(content_key(&digest), LOOKUP_BOUND)
            .await;
        world
            .content
            .lock()
            .unwrap()
            .insert(key("rogue"), (data, None));
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
}
