//! The libp2p swarm: transport (TCP, optional pnet, noise, yamux), the behaviour (Kademlia
//! provider records, identify, the blob stream protocol) and the task that owns it.
//!
//! The swarm is owned by one task ([`Driver::run`]); the [`super::P2p`] handle talks to it
//! through [`Command`]s, and reads the peer list from [`Shared`] without a round trip.
use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use libp2p::{
    core::{muxing::StreamMuxerBox, transport::Boxed, upgrade, ConnectedPoint},
    futures::StreamExt,
    identify, identity,
    kad::{self, store::MemoryStore, store::MemoryStoreConfig},
    multiaddr::Protocol,
    ping,
    pnet::{PnetConfig, PreSharedKey},
    swarm::{dial_opts::DialOpts, dial_opts::PeerCondition, ConnectionId, NetworkBehaviour},
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{error::P2pError, metrics::P2pMetrics};
use crate::{node::sync::lock, oci::digest::Digest};

/// Kademlia under a protocol name of its own, so eddy's DHT never mixes with IPFS's (and a
/// stray IPFS node could not join it even without a PSK).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/eddy/kad/1.0.0");
const IDENTIFY_PROTOCOL: &str = "/eddy/id/1.0.0";
/// Provider records expire after this long at the peers that store them...
pub const PROVIDER_TTL: Duration = Duration::from_secs(30 * 60);
/// ...and kad re-publishes the ones this node provides this often, well before they expire
/// (three chances per TTL).
pub const PROVIDER_REPUBLISH: Duration = Duration::from_secs(10 * 60);
/// Digests the reconcile loop starts providing at once; the rest wait in a backlog, so a
/// node starting with a full store does not launch thousands of DHT queries in one go.
const MAX_RECONCILE_QUERIES: usize = 32;
/// Connections stay open while idle: peers fetch from each other at any moment, and a
/// redial costs a TCP + noise + yamux handshake in the lookup's tens of milliseconds.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Bound on the TCP + pnet + noise + yamux upgrade of one connection.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// A bootstrap address whose dial failed is dialled again after 1 s, 2 s, 4 s ... up to this
/// (plus up to `REDIAL_JITTER`), `REDIALS` times, besides the resolve loop's own rounds
/// (which go on for ever): nodes of a DaemonSet start at nearly the same moment, and most
/// first dials find no listener yet.
const REDIAL_MAX: Duration = Duration::from_secs(30);
const REDIALS: u32 = 8;
const REDIAL_JITTER: Duration = Duration::from_millis(500);
/// Each connection is pinged this often, and closed when a ping goes unanswered for
/// `PING_TIMEOUT`: a node that vanished (power off, network gone) sends no FIN, and until
/// its connection closes it counts as a member (a digest's home, a claim's fetcher).
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
}

pub(super) enum Command {
    Provide {
        key: kad::RecordKey,
        reply: oneshot::Sender<bool>,
    },
    StopProviding {
        key: kad::RecordKey,
    },
    Providers {
        key: kad::RecordKey,
        found: mpsc::UnboundedSender<PeerId>,
    },
    /// Bootstrap addresses just resolved: dial those not connected yet.
    Dial(Vec<Multiaddr>),
    /// Every digest the node serves now (from `PeerShare::digests`).
    Reconcile(HashSet<Digest>),
}

/// What the handle reads without asking the swarm task.
#[derive(Default)]
pub(super) struct Shared {
    pub peers: Mutex<HashMap<PeerId, PeerState>>,
    pub listen_addrs: Mutex<Vec<Multiaddr>>,
}

impl Shared {
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        lock(&self.peers).contains_key(peer)
    }
}

pub(super) struct PeerState {
    pub since: SystemTime,
    /// The peer's own listen addresses (from identify), else the addresses it is connected on.
    pub listen: BTreeSet<Multiaddr>,
    pub remote: BTreeSet<Multiaddr>,
}

pub(super) fn build(
    keypair: &identity::Keypair,
    psk: Option<[u8; 32]>,
) -> Result<Swarm<Behaviour>, P2pError> {
    let peer_id = keypair.public().to_peer_id();
    let transport = transport(keypair, psk)?;
    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config
        .set_provider_record_ttl(Some(PROVIDER_TTL))
        .set_provider_publication_interval(Some(PROVIDER_REPUBLISH))
        .set_query_timeout(Duration::from_secs(30));
    // The defaults (1024 keys) are far below a node's store; a record is ~100 bytes.
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_records: 1 << 20,
            max_provided_keys: 1 << 20,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
    // Nodes reach each other directly (no NAT in a cluster): every node serves the DHT
    // from the start instead of waiting for identify to confirm an external address.
    kad.set_mode(Some(kad::Mode::Server));
    let identify = identify::Behaviour::new(identify::Config::new(
        IDENTIFY_PROTOCOL.to_string(),
        keypair.public(),
    ));
    let behaviour = Behaviour {
        kad,
        identify,
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        ),
        stream: libp2p_stream::Behaviour::new(),
    };
    Ok(Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT),
    ))
}

/// TCP, then (with a PSK) pnet, then noise, then yamux. pnet encrypts the whole connection
/// with the swarm key before anything else is said, so a node without the key cannot even
/// complete the noise handshake; noise then authenticates the peer's identity.
fn transport(
    keypair: &identity::Keypair,
    psk: Option<[u8; 32]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, P2pError> {
    let tcp = libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::new().nodelay(true));
    let noise = libp2p::noise::Config::new(keypair).map_err(|e| P2pError::Noise(e.to_string()))?;
    // yamux's stream windows auto-tune towards the bandwidth-delay product, up to 1 GiB per
    // connection: the default suits one large stream per fetch.
    let yamux = libp2p::yamux::Config::default();
    Ok(match psk {
        Some(key) => {
            let pnet = PnetConfig::new(PreSharedKey::new(key));
            tcp.and_then(move |socket, _| pnet.handshake(socket))
                .upgrade(upgrade::Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux)
                .timeout(UPGRADE_TIMEOUT)
                .boxed()
        }
        None => tcp
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(UPGRADE_TIMEOUT)
            .boxed(),
    })
}

pub(super) struct Driver {
    pub swarm: Swarm<Behaviour>,
    shared: Arc<Shared>,
    metrics: P2pMetrics,
    local: PeerId,
    provide_replies: HashMap<kad::QueryId, oneshot::Sender<bool>>,
    lookups: HashMap<kad::QueryId, mpsc::UnboundedSender<PeerId>>,
    /// Digest keys provided because `PeerShare::digests` lists them.
    reconciled: HashSet<kad::RecordKey>,
    /// Keys the lead provided through `P2p::provide` (fill:, tag:, in-flight digests): the
    /// reconcile loop never withdraws these.
    explicit: HashSet<kad::RecordKey>,
    backlog: VecDeque<kad::RecordKey>,
    reconcile_queries: HashSet<kad::QueryId>,
    /// Connections this node dialled, by the address dialled (without /p2p), so bootstrap
    /// addresses already connected are not dialled again.
    dialing: HashMap<ConnectionId, Multiaddr>,
    dialed: HashMap<ConnectionId, Multiaddr>,
    /// Bootstrap addresses to dial again: failed dials so far, and when.
    redial: HashMap<Multiaddr, (u32, tokio::time::Instant)>,
}

impl Driver {
    pub fn new(swarm: Swarm<Behaviour>, shared: Arc<Shared>, metrics: P2pMetrics) -> Driver {
        Driver {
            local: *swarm.local_peer_id(),
            swarm,
            shared,
            metrics,
            provide_replies: HashMap::new(),
            lookups: HashMap::new(),
            reconciled: HashSet::new(),
            explicit: HashSet::new(),
            backlog: VecDeque::new(),
            reconcile_queries: HashSet::new(),
            dialing: HashMap::new(),
            dialed: HashMap::new(),
            redial: HashMap::new(),
        }
    }

    /// Drives the swarm until it reports a listen address (or the listener fails).
    pub async fn wait_listening(&mut self, bound: Duration) -> Result<(), P2pError> {
        let deadline = tokio::time::Instant::now() + bound;
        while lock(&self.shared.listen_addrs).is_empty() {
            let event = tokio::time::timeout_at(deadline, self.swarm.select_next_some())
                .await
                .map_err(|_| P2pError::Listen("no listen address within 5 s".into()))?;
            match event {
                libp2p::swarm::SwarmEvent::ListenerError { error, .. } => {
                    return Err(P2pError::Listen(error.to_string()))
                }
                libp2p::swarm::SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(P2pError::Listen(format!("listener closed: {reason:?}")))
                }
                event => self.on_swarm_event(event),
            }
        }
        Ok(())
    }

    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    // Every handle is gone: the node is shutting down.
                    None => break,
                },
                _ = sweep.tick() => {
                    self.sweep_lookups();
                    self.redial_due();
                    self.update_dht_peers();
                }
            }
        }
        debug!("p2p swarm task stopped");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Provide { key, reply } => {
                self.explicit.insert(key.clone());
                match self.swarm.behaviour_mut().kad.start_providing(key) {
                    Ok(id) => {
                        self.provide_replies.insert(id, reply);
                    }
                    Err(e) => {
                        warn!(error = %e, "p2p: cannot provide a key");
                        let _ = reply.send(false);
                    }
                }
                self.update_advertised();
            }
            Command::StopProviding { key } => {
                self.explicit.remove(&key);
                if !self.reconciled.contains(&key) {
                    self.swarm.behaviour_mut().kad.stop_providing(&key);
                }
                self.update_advertised();
            }
            Command::Providers { key, found } => {
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.lookups.insert(id, found);
            }
            Command::Dial(addrs) => self.dial_new(addrs),
            Command::Reconcile(digests) => self.reconcile(digests),
        }
    }

    fn reconcile(&mut self, digests: HashSet<Digest>) {
        let current: HashSet<kad::RecordKey> = digests
            .iter()
            .map(|d| kad::RecordKey::new(&d.to_string()))
            .collect();
        let gone: Vec<_> = self.reconciled.difference(&current).cloned().collect();
        for key in gone {
            self.reconciled.remove(&key);
            if !self.explicit.contains(&key) {
                self.swarm.behaviour_mut().kad.stop_providing(&key);
            }
        }
        for key in current {
            if self.reconciled.insert(key.clone()) && !self.explicit.contains(&key) {
                self.backlog.push_back(key);
            }
        }
        self.pump_backlog();
        self.update_advertised();
    }

    fn pump_backlog(&mut self) {
        while self.reconcile_queries.len() < MAX_RECONCILE_QUERIES {
            let Some(key) = self.backlog.pop_front() else {
                return;
            };
            // Withdrawn meanwhile, or provided explicitly already.
            if !self.reconciled.contains(&key) || self.explicit.contains(&key) {
                continue;
            }
            match self.swarm.behaviour_mut().kad.start_providing(key) {
                Ok(id) => {
                    self.reconcile_queries.insert(id);
                }
                Err(e) => warn!(error = %e, "p2p: cannot provide a digest"),
            }
        }
    }

    fn update_advertised(&self) {
        let explicit_digests = self
            .explicit
            .iter()
            .filter(|k| k.as_ref().starts_with(b"sha256:") && !self.reconciled.contains(*k))
            .count();
        self.metrics
            .advertised_digests
            .set((self.reconciled.len() + explicit_digests) as i64);
    }

    /// Lookups whose caller stopped waiting (its bound passed) are finished, so they do not
    /// keep querying the DHT for nobody.
    fn sweep_lookups(&mut self) {
        let closed: Vec<_> = self
            .lookups
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in closed {
            self.lookups.remove(&id);
            if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                q.finish();
            }
        }
    }

    /// `eddy_p2p_dht_peers`: the routing table's size. Provider records go to (and lookups
    /// ask) the peers in it, so a connected peer that is not in it yet is not asked.
    fn update_dht_peers(&mut self) {
        let entries: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|bucket| bucket.num_entries())
            .sum();
        self.metrics.dht_peers.set(entries as i64);
    }

    /// Dial again the bootstrap addresses whose backoff is over.
    fn redial_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<Multiaddr> = self
            .redial
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(addr, _)| addr.clone())
            .collect();
        if !due.is_empty() {
            self.dial_new(due);
        }
    }

    /// A bootstrap dial failed: schedule the next one (see `REDIAL_MAX`).
    fn schedule_redial(&mut self, addr: Multiaddr) {
        let failures = self.redial.get(&addr).map_or(0, |(n, _)| *n) + 1;
        if failures > REDIALS {
            // An address that stays unreachable (a node gone, a stale DNS answer) is left to
            // the resolve loop.
            self.redial.remove(&addr);
            return;
        }
        let backoff = Duration::from_secs(1u64 << (failures - 1).min(5)).min(REDIAL_MAX);
        let jitter = REDIAL_JITTER.mul_f64(rand::random::<f64>());
        let at = tokio::time::Instant::now() + backoff + jitter;
        self.redial.insert(addr, (failures, at));
    }

    fn dial_new(&mut self, addrs: Vec<Multiaddr>) {
        // Addresses connected already (or this node's own) need no dial and no redial.
        let mut connected: HashSet<Multiaddr> = self.dialed.values().cloned().collect();
        connected.extend(lock(&self.shared.listen_addrs).iter().cloned());
        for state in lock(&self.shared.peers).values() {
            connected.extend(state.listen.iter().map(without_p2p));
        }
        let mut known: HashSet<Multiaddr> = self.dialing.values().cloned().collect();
        for addr in addrs {
            let plain = without_p2p(&addr);
            if connected.contains(&plain) {
                self.redial.remove(&plain);
                continue;
            }
            if known.contains(&plain) {
                continue;
            }
            let opts = match peer_of(&addr) {
                Some(peer) if peer == self.local || self.swarm.is_connected(&peer) => {
                    self.redial.remove(&plain);
                    continue;
                }
                Some(peer) => {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, plain.clone());
                    DialOpts::peer_id(peer)
                        .addresses(vec![plain.clone()])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .allocate_new_port()
                        .build()
                }
                // A port of its own, not the listen port: two nodes that dial each other at
                // the same moment from their listen ports would make one TCP connection by
                // simultaneous open, on which both sides start noise as the initiator and
                // fail (seen when a whole cluster starts at once).
                None => DialOpts::unknown_peer_id()
                    .address(plain.clone())
                    .allocate_new_port()
                    .build(),
            };
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    debug!(addr = %plain, "p2p: dialling bootstrap address");
                    self.dialing.insert(id, plain.clone());
                    known.insert(plain);
                }
                Err(e) => debug!(addr = %plain, error = %e, "p2p: cannot dial"),
            }
        }
    }

    fn on_swarm_event(&mut self, event: libp2p::swarm::SwarmEvent<BehaviourEvent>) {
        use libp2p::swarm::SwarmEvent;
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, peer_id = %self.local, "p2p listening");
                lock(&self.shared.listen_addrs).push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                lock(&self.shared.listen_addrs).retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                cause,
                ..
            } => {
                self.dialed.remove(&connection_id);
                let mut peers = lock(&self.shared.peers);
                if num_established == 0 {
                    peers.remove(&peer_id);
                    info!(peer = %peer_id, cause = ?cause, "p2p peer disconnected");
                } else if let Some(state) = peers.get_mut(&peer_id) {
                    debug!(peer = %peer_id, cause = ?cause, left = num_established, "p2p: one of the connections to a peer closed");
                    state
                        .remote
                        .remove(&without_p2p(endpoint.get_remote_address()));
                }
                self.metrics.peers.set(peers.len() as i64);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let addr = self.dialing.remove(&connection_id);
                // No reachable peer is a normal state (the first node of a cluster, a peer
                // restarting): retried with backoff, and at the next resolve.
                debug!(?peer_id, ?addr, %error, "p2p dial failed");
                if let Some(addr) = addr {
                    self.schedule_redial(addr);
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // Typically a node with another swarm key: pnet fails before noise.
                debug!(from = %send_back_addr, %error, "p2p inbound connection failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identified(peer_id, &info),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => self.on_query(id, result, step.last),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error),
            })) => {
                info!(%peer, %error, "p2p peer does not answer pings; closing its connection");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest { .. })) => {
                self.metrics.dht_requests.inc();
            }
            _ => {}
        }
    }

    /// A connection is up: remember the address it was dialled at (no redial for it), and
    /// the peer and the address it is reached on.
    fn on_connected(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        let remote = without_p2p(endpoint.get_remote_address());
        self.redial.remove(&remote);
        if let Some(addr) = self.dialing.remove(&connection_id) {
            self.redial.remove(&addr);
            self.dialed.insert(connection_id, addr);
        } else if let ConnectedPoint::Dialer { address, .. } = endpoint {
            self.dialed.insert(connection_id, without_p2p(address));
        }
        let mut peers = lock(&self.shared.peers);
        let new = !peers.contains_key(&peer_id);
        peers
            .entry(peer_id)
            .or_insert_with(|| PeerState {
                since: SystemTime::now(),
                listen: BTreeSet::new(),
                remote: BTreeSet::new(),
            })
            .remote
            .insert(remote.clone());
        self.metrics.peers.set(peers.len() as i64);
        drop(peers);
        if new {
            info!(peer = %peer_id, addr = %remote, "p2p peer connected");
        }
    }

    /// A peer told us its listen addresses: record them and add them to the DHT.
    fn on_identified(&mut self, peer_id: PeerId, info: &identify::Info) {
        // A peer listening on 0.0.0.0 also reports 127.0.0.1, which from another
        // host is this node itself: keep loopback only for a peer reached on it.
        let mut peers = lock(&self.shared.peers);
        let via_loopback = peers
            .get(&peer_id)
            .is_some_and(|state| state.remote.iter().any(is_loopback));
        let listen: BTreeSet<Multiaddr> = info
            .listen_addrs
            .iter()
            .map(without_p2p)
            .filter(|a| via_loopback || !is_loopback(a))
            .collect();
        if let Some(state) = peers.get_mut(&peer_id) {
            state.listen = listen.clone();
        }
        drop(peers);
        for addr in listen {
            self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
        }
        self.update_dht_peers();
    }

    fn on_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        match result {
            kad::QueryResult::StartProviding(result) => {
                if let Some(reply) = self.provide_replies.remove(&id) {
                    let _ = reply.send(result.is_ok());
                }
                if let Err(e) = &result {
                    debug!(error = ?e, "p2p: provider record not stored everywhere");
                }
                if self.reconcile_queries.remove(&id) {
                    self.pump_backlog();
                }
            }
            kad::QueryResult::GetProviders(result) => {
                let Some(found) = self.lookups.get(&id) else {
                    return;
                };
                let mut closed = false;
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                    for p in providers.into_iter().filter(|p| *p != self.local) {
                        closed |= found.send(p).is_err();
                    }
                }
                if last || closed {
                    self.lookups.remove(&id);
                }
                if closed && !last {
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
            }
            _ => {}
        }
    }
}

pub(super) fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}
