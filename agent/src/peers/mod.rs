//! Fetching from other nodes: which peer to ask, and when to go upstream instead.
//!
//! - Content that peers hold (complete, or streaming from their own download in flight) is
//!   found by a bounded provider lookup of its digest. Only providers connected now are
//!   asked (a provider record outlives a node that left), one after another, hedged:
//!   when the first has not answered within `HEDGE_AFTER`, the next is asked too and the
//!   first answer wins. A body that fails mid-way resumes with Range at the next provider.
//! - Content nobody holds yet goes through the cluster's single flight, so that when many
//!   nodes miss the same blob at once the cluster fetches it upstream once. The digest's
//!   home node (the connected node that ranks first for it by rendezvous hashing, the same
//!   on every node that sees the same members) keeps one claim per digest (`p2p::claims`):
//!   every node that misses the blob asks the home who fetches it, and the first to ask
//!   does, while the others stream from it. One node decides, so the outcome does not hang
//!   on how fast announcements travel through the DHT, which a loaded machine or a large
//!   cluster slows down (an earlier election by announcements fetched one 16 MiB blob 26
//!   times at 50 nodes). When the home does not answer within `CLAIM_BOUND`, the node
//!   fetches upstream itself: a pull never waits on the swarm for long.
//! - A peer whose bytes did not verify is avoided for a while (`blame`).
//!
//! The network itself (libp2p) sits behind `PeerNetwork`, so this logic is tested without it.

pub mod p2p;
pub mod share;
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
    oci::digest::Digest,
    sources::failover::{resuming, Resume},
    sources::source::{Blame, Opened, PeerLookup, PeerSource, TagAnswer},
    store::BoxError,
};

/// How long a provider lookup may take on the request path.
pub const LOOKUP_BOUND: Duration = Duration::from_millis(60);
/// How long an announcement may take to reach the nodes that keep its records.
const ANNOUNCE_BOUND: Duration = Duration::from_millis(300);
/// How long a miss waits for the home node's answer to its claim. Generous, because the
/// answer is what keeps a wave at one upstream fetch: with 50 nodes on 2 cores a home busy
/// serving took over 2 s to answer 11 claims, and each of those nodes fetched upstream. A
/// home that left answers at once (its connection is closed: the claim fails and the node
/// fetches upstream); one that hangs costs this much, once per miss, until its pings fail.
const CLAIM_BOUND: Duration = Duration::from_secs(5);
/// Times a busy fetcher is asked again (after 0.25, 0.5 and 1 s) before a node gives up on
/// it; each ask waits up to the blob request's own timeout (10 s). Only while the fetcher
/// stays connected, which its answers to pings (every 5 s) vouch for: a fetcher that hangs
/// or leaves is dropped within about 10 s and given up at once.
const FETCHER_RETRIES: u32 = 3;
/// How often a miss asks the home again after the fetcher it named could not serve.
const RECLAIMS: usize = 2;
/// When the provider asked first has not answered within this, the next is asked as well.
const HEDGE_AFTER: Duration = Duration::from_millis(250);
/// Once every chosen provider has been asked, how much longer to wait for one to open
/// before giving up on peers: a provider that left the cluster (its record still stands)
/// must not hold a pull for a dial timeout.
const OPEN_BOUND: Duration = Duration::from_millis(1500);
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
    /// The peers connected right now: the members a digest's home is chosen from.
    fn members(&self) -> Vec<PeerKey>;
    /// Asks `home` who fetches `digest` from upstream for the cluster: the node that
    /// claimed it first, or this node (see `p2p::claims`). `stale`: a fetcher that could
    /// not serve it, to be replaced.
    fn claim(
        &self,
        home: PeerKey,
        digest: Digest,
        stale: Option<PeerKey>,
    ) -> BoxFuture<'static, Result<PeerKey, BoxError>>;
}

/// The DHT key under which nodes announce that they hold `digest` (or are streaming it).
pub fn content_key(digest: &Digest) -> Vec<u8> {
    digest.to_string().into_bytes()
}

pub fn tag_key(registry: &str, repository: &str, tag: &str) -> Vec<u8> {
    format!("tag:{registry}/{repository}:{tag}").into_bytes()
}

/// Where a blob nobody holds yet should come from.
pub enum Election {
    /// This node fetches it upstream (and has announced the content: peers stream from its
    /// fill).
    Upstream,
    /// Stream it from this peer, which fetches (or holds) it.
    Peer(PeerKey),
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
    /// Ask the digest's home node, which keeps one claim per digest: the first node to ask
    /// fetches, the others stream from it (the module comment).
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
    /// Peers whose bytes did not verify, and since when (shared with the `Blame`s handed out).
    avoid: Arc<Mutex<HashMap<PeerKey, Instant>>>,
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
            avoid: Arc::new(Mutex::new(HashMap::new())),
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
        // Only nodes connected now: a record can name a node that has left (records stand
        // until their TTL), and dialling it would hold the pull for a connect timeout. A
        // holder this node is not connected to is still reached through the digest's home,
        // whose claim names it (see `elect`).
        let members = self.net.members();
        providers.retain(|p| members.contains(p));
        if providers.is_empty() {
            return None;
        }
        // Spread the load of a wave over every node that has the content.
        providers.shuffle(&mut rand::thread_rng());
        providers.truncate(MAX_PROVIDERS);
        self.open_any(providers, digest, from, Some(OPEN_BOUND))
            .await
    }

    /// Decide who fetches `digest` upstream when nobody holds it (see the module comment).
    /// `stale`: a fetcher named before that could not serve it.
    pub async fn elect(&self, digest: &Digest, stale: Option<PeerKey>) -> Election {
        if !self.is_active() {
            return Election::Upstream;
        }
        if self.single_flight == SingleFlight::Announce {
            // The caller's lookup found nobody: fetch, and let later lookups find this node.
            self.net.provide(content_key(digest), ANNOUNCE_BOUND).await;
            return Election::Upstream;
        }
        let me = self.net.local();
        let home = home(digest, &me, &self.usable(self.net.members()));
        let asked =
            tokio::time::timeout(CLAIM_BOUND, self.net.claim(home.clone(), *digest, stale)).await;
        match asked {
            Ok(Ok(fetcher)) if fetcher == me => {
                // Announced before the upstream answers, so that nodes whose content lookup
                // finds this node join its fill (its bytes stream to them as they arrive).
                self.announce(digest);
                Election::Upstream
            }
            Ok(Ok(fetcher)) => {
                debug!(%digest, %home, %fetcher, "single flight: streaming from the node that fetches it");
                Election::Peer(fetcher)
            }
            Ok(Err(e)) => {
                debug!(%digest, %home, error = %e, "single flight: the home node did not answer; fetching upstream");
                Election::Upstream
            }
            Err(_) => {
                debug!(%digest, %home, "single flight: no answer from the home node in time; fetching upstream");
                self.net.report_failure(&home, "claim_timeout");
                Election::Upstream
            }
        }
    }

    /// `digest` from one given peer (the fetcher the home named). It is connected and
    /// answers once its upstream does, within the request's own timeout.
    pub async fn open_from(&self, peer: PeerKey, digest: &Digest, from: u64) -> Option<PeerBody> {
        self.open_any(vec![peer], digest, from, None).await
    }

    /// `digest` from the fetcher the home named. A fetcher that is still connected but does
    /// not answer is busy (every node of a wave asks it at once), not gone: it is asked again
    /// after a pause, up to [`FETCHER_RETRIES`] times, since giving up on it means one more
    /// upstream fetch. A fetcher that left is given up at once.
    pub async fn open_from_fetcher(
        &self,
        fetcher: &PeerKey,
        digest: &Digest,
        from: u64,
    ) -> Option<PeerBody> {
        for attempt in 0..=FETCHER_RETRIES {
            if let Some(body) = self.open_from(fetcher.clone(), digest, from).await {
                return Some(body);
            }
            if attempt == FETCHER_RETRIES || !self.net.members().contains(fetcher) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        None
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
        avoid(&*self.net, &self.avoid, peers, reason);
    }

    /// A miss, asked of the peers: a node that holds it, else the cluster's single flight
    /// (`elect`): stream from the fetcher the digest's home names, or fetch it upstream.
    pub async fn open_for_miss(&self, digest: &Digest, from: u64, elect: bool) -> PeerLookup {
        if let Some(held) = self.open_held(digest, from).await {
            return self.found(held);
        }
        if !elect {
            return PeerLookup::Upstream { elected: false };
        }
        let mut stale = None;
        for _ in 0..=RECLAIMS {
            match self.elect(digest, stale.take()).await {
                Election::Upstream => return PeerLookup::Upstream { elected: true },
                Election::Peer(peer) => match self.open_from_fetcher(&peer, digest, from).await {
                    Some(body) => return self.found(body),
                    None => {
                        debug!(%digest, %peer, "the fetcher the home named could not serve; asking again");
                        stale = Some(peer);
                    }
                },
            }
        }
        PeerLookup::Upstream { elected: false }
    }

    /// A peer's body, with the means to blame whoever sent it if it does not verify.
    fn found(&self, body: PeerBody) -> PeerLookup {
        let (net, avoided) = (Arc::clone(&self.net), Arc::clone(&self.avoid));
        let contributors = body.contributors;
        PeerLookup::Found {
            opened: body.opened,
            blame: Blame::new(move |reason| {
                let peers = contributors.lock().unwrap().clone();
                avoid(&*net, &avoided, &peers, reason);
            }),
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
    /// `give_up`: once every candidate has been asked, how long to wait for one to open.
    async fn open_any(
        &self,
        candidates: Vec<PeerKey>,
        digest: &Digest,
        from: u64,
        give_up: Option<Duration>,
    ) -> Option<PeerBody> {
        let mut waiting = candidates.into_iter();
        let mut asking = FuturesUnordered::new();
        let ask = |peer: PeerKey| {
            let open = self.net.fetch(peer.clone(), *digest, from);
            async move { (peer, open.await) }
        };
        asking.push(ask(waiting.next()?));
        let mut all_asked_at = None;
        let (peer, opened) = loop {
            if waiting.len() == 0 {
                all_asked_at.get_or_insert_with(tokio::time::Instant::now);
            }
            let give_up_at = give_up.zip(all_asked_at).map(|(d, at)| at + d);
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
                () = sleep_until(give_up_at), if give_up_at.is_some() => {
                    debug!(%digest, "no provider opened in time; leaving peers");
                    return None;
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

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The home of `digest` among this node and `members`: the node that ranks first for it
/// (rendezvous hashing), where the cluster's claim on it is kept.
pub fn home(digest: &Digest, me: &PeerKey, members: &[PeerKey]) -> PeerKey {
    winner(digest, me, members).unwrap_or_else(|| me.clone())
}

/// Tell the network the peers failed, and avoid them for [`AVOID_FOR`].
fn avoid(
    net: &dyn PeerNetwork,
    avoided: &Mutex<HashMap<PeerKey, Instant>>,
    peers: &[PeerKey],
    reason: &'static str,
) {
    let mut avoided = avoided.lock().unwrap();
    for peer in peers {
        net.report_failure(peer, reason);
        avoided.insert(peer.clone(), Instant::now());
    }
}

impl PeerSource for Peers {
    fn is_active(&self) -> bool {
        Peers::is_active(self)
    }

    fn open<'a>(&'a self, digest: &'a Digest, from: u64, elect: bool) -> BoxFuture<'a, PeerLookup> {
        Box::pin(self.open_for_miss(digest, from, elect))
    }

    fn announce(&self, digest: &Digest) {
        Peers::announce(self, digest)
    }

    fn announce_tag(&self, registry: &str, repository: &str, tag: &str) {
        Peers::announce_tag(self, registry, repository, tag)
    }

    fn tag<'a>(
        &'a self,
        registry: &'a str,
        repository: &'a str,
        tag: &'a str,
    ) -> BoxFuture<'a, Option<TagAnswer>> {
        Box::pin(Peers::tag(self, registry, repository, tag))
    }
}

#[cfg(test)]
mod tests;
