//! containerd's content store as a content source: blobs and manifests this node's
//! containerd already holds (pulled before eddy ran, or through a path eddy did not see)
//! serve this node's clients and its peers without going upstream.
//!
//! Talks gRPC to containerd's socket (containerd-client, tonic). What is there is kept in
//! memory, per namespace, so [`ContainerdSource::contains`] and
//! [`ContainerdSource::digests`] are cheap and synchronous:
//! - at connect, `Content.List` in every configured namespace;
//! - then containerd's event stream: `/content/delete` removes a digest at once, and
//!   `/content/create` (containerd 2.x; 1.6 has no event for new content) adds one;
//! - `/images/*` events re-list their namespace shortly after: in containerd 1.6 they are
//!   the only sign of a finished pull, and an image delete is followed by a garbage
//!   collection that removes content without any event;
//! - and a re-list of every namespace each [`RELIST_EVERY`], for what no event announces
//!   (`ctr content fetch`, garbage collection long after an image delete).
//!
//! A missing socket, or containerd down, turns the source off with one warning; eddy
//! retries in the background (1 s, doubling to [`RECONNECT_EVERY`]) and turns it on when
//! containerd answers. While off, `open` answers `None` at once.
//!
//! Nothing read from containerd is trusted: the registry's fill verifies the digest.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use containerd_client::{
    events::{ContentCreate, ContentDelete},
    services::v1::{
        content_client::ContentClient, events_client::EventsClient, InfoRequest,
        ListContentRequest, ReadContentRequest, SubscribeRequest,
    },
    tonic::{self, transport::Channel, Code},
    types::Envelope,
};
use futures_util::{future::BoxFuture, StreamExt};
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    node::sync::lock,
    oci::digest::Digest,
    sources::source::{ContentSource, Opened, SourceKind},
    store::BoxError,
};

/// Every namespace is re-listed this often, for content no event announces.
pub const RELIST_EVERY: Duration = Duration::from_secs(60);
/// The longest wait between connection attempts while containerd is away.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(30);
/// The first retry after a lost connection: containerd restarts take about a second.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// After an image event, wait this long for more (a pull creates and updates in a burst,
/// and an image delete's garbage collection follows it) before re-listing once.
const IMAGE_EVENT_SETTLE: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Between sending the subscription and listing (see `session`).
const SUBSCRIBE_PAUSE: Duration = Duration::from_millis(100);
/// Events waiting for the session; a burst (a large pull) blocks the forwarder briefly.
const EVENT_BUFFER: usize = 256;
/// Bounds the start of a Read.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds one Content.Info: a registry miss asks it of every namespace that may hold the
/// digest, and must not wait long on this source before going on to the next.
const INFO_TIMEOUT: Duration = Duration::from_millis(500);
/// Bounds one namespace's whole listing.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// containerd chunks its listings, but a large node's chunk may exceed tonic's 4 MiB default.
const MAX_MESSAGE: usize = 64 << 20;
/// The gRPC metadata key that selects a containerd namespace.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// The events this source follows (containerd ORs the filters).
const EVENT_FILTERS: &[&str] = &[
    r#"topic=="/content/delete""#,
    r#"topic=="/content/create""#,
    r#"topic=="/images/create""#,
    r#"topic=="/images/update""#,
    r#"topic=="/images/delete""#,
];

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("connecting to {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("connecting to {socket}: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { socket: PathBuf },
    #[error("{what}: {source}")]
    Rpc {
        what: String,
        source: Box<tonic::Status>,
    },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("containerd closed the event stream")]
    EventsClosed,
}

/// What `GET /containerd` on the admin listener and `eddy status` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerdStatus {
    pub socket: PathBuf,
    pub namespaces: Vec<String>,
    /// Connected, listed and following events now.
    pub connected: bool,
    /// Distinct content digests known across the namespaces.
    pub digests: usize,
}

/// containerd's content store on this node.
pub struct ContainerdSource {
    socket: PathBuf,
    namespaces: Vec<String>,
    state: Mutex<State>,
    /// `eddy_containerd_digests`.
    digests_gauge: Gauge,
    /// Woken when the set of known digests changed (peers re-advertise at once).
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Set while a session is up; `open` uses it, and answers None without it.
    channel: Option<Channel>,
    known: Known,
}

/// The content digests (with sizes) known per namespace: the same blob can be in several
/// namespaces, and a delete in one leaves the others'.
#[derive(Default, Debug)]
struct Known {
    by_namespace: BTreeMap<String, HashMap<Digest, u64>>,
}

impl Known {
    fn replace(&mut self, namespace: &str, content: HashMap<Digest, u64>) {
        self.by_namespace.insert(namespace.to_string(), content);
    }

    fn insert(&mut self, namespace: &str, digest: Digest, size: u64) {
        self.by_namespace
            .entry(namespace.to_string())
            .or_default()
            .insert(digest, size);
    }

    fn remove(&mut self, namespace: &str, digest: &Digest) {
        if let Some(content) = self.by_namespace.get_mut(namespace) {
            content.remove(digest);
        }
    }

    fn size(&self, digest: &Digest) -> Option<u64> {
        self.by_namespace
            .values()
            .find_map(|content| content.get(digest).copied())
    }

    fn has(&self, namespace: &str, digest: &Digest) -> bool {
        self.by_namespace
            .get(namespace)
            .is_some_and(|c| c.contains_key(digest))
    }

    fn digests(&self) -> Vec<Digest> {
        let mut all: Vec<Digest> = self
            .by_namespace
            .values()
            .flat_map(|c| c.keys().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    fn count(&self) -> usize {
        if self.by_namespace.len() <= 1 {
            return self.by_namespace.values().map(HashMap::len).sum();
        }
        self.digests().len()
    }
}

impl ContainerdSource {
    /// The source for `socket` and `namespaces`, off until [`ContainerdSource::follow`]
    /// connects. Registers `eddy_containerd_digests` into `registry`.
    pub fn new(socket: PathBuf, namespaces: Vec<String>, registry: &mut Registry) -> Arc<Self> {
        let digests_gauge = Gauge::default();
        registry.register(
            "eddy_containerd_digests",
            "Content digests known in containerd's content store (configured namespaces)",
            digests_gauge.clone(),
        );
        Arc::new(Self {
            socket,
            namespaces,
            state: Mutex::new(State::default()),
            digests_gauge,
            changed: tokio::sync::Notify::new(),
        })
    }

    /// [`ContainerdSource::new`], with [`ContainerdSource::follow`] spawned until `stop`.
    pub fn start(
        socket: PathBuf,
        namespaces: Vec<String>,
        registry: &mut Registry,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let source = Self::new(socket, namespaces, registry);
        tokio::spawn(Arc::clone(&source).follow(stop));
        source
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The size of `digest` when containerd holds it in one of the namespaces (as last
    /// listed or announced).
    pub fn contains(&self, digest: &Digest) -> Option<u64> {
        lock(&self.state).known.size(digest)
    }

    /// Every content digest known across the namespaces, sorted, each once.
    pub fn digests(&self) -> Vec<Digest> {
        lock(&self.state).known.digests()
    }

    pub fn status(&self) -> ContainerdStatus {
        let state = lock(&self.state);
        ContainerdStatus {
            socket: self.socket.clone(),
            namespaces: self.namespaces.clone(),
            connected: state.channel.is_some(),
            digests: state.known.count(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Known)) {
        let mut state = lock(&self.state);
        let before = state.known.count();
        change(&mut state.known);
        let after = state.known.count();
        self.digests_gauge.set(after as i64);
        drop(state);
        if after != before {
            self.changed.notify_one();
        }
    }

    /// Resolves when the known digests change (after the call; one change is remembered).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn channel(&self) -> Option<Channel> {
        lock(&self.state).channel.clone()
    }

    /// Connect, list and follow events until `stop`; reconnect when containerd goes away.
    /// Warns once per outage (a missing socket at start is one outage), never fails.
    pub async fn follow(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut warned = false;
        let mut retry = FIRST_RETRY;
        loop {
            let mut up = false;
            let result = self.session(&mut stop, &mut up).await;
            lock(&self.state).channel = None;
            match result {
                Ok(()) => return,
                Err(e) if !warned => {
                    warn!(socket = %self.socket.display(), error = %e,
                        "containerd source off: content in containerd's store is not served; retrying in the background");
                    warned = true;
                }
                Err(e) => {
                    debug!(socket = %self.socket.display(), error = %e, "containerd still away")
                }
            }
            if up {
                // A lost session: the next outage gets its own warning, and a restart is quick.
                retry = FIRST_RETRY;
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.changed() => return,
            }
            retry = (retry * 2).min(RECONNECT_EVERY);
            if up {
                warned = false;
            }
        }
    }

    /// One connection: subscribe, list, then apply events and re-lists. Ok when stopped.
    async fn session(
        &self,
        stop: &mut watch::Receiver<bool>,
        up: &mut bool,
    ) -> Result<(), ContainerdError> {
        let channel =
            tokio::time::timeout(CONNECT_TIMEOUT, containerd_client::connect(&self.socket))
                .await
                .map_err(|_| ContainerdError::ConnectTimeout {
                    socket: self.socket.clone(),
                })?
                .map_err(|source| ContainerdError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        // Subscribe before listing, so a delete between the two is not lost. containerd sends
        // the stream's headers only with its first event, so the subscription runs in a task
        // of its own that forwards events; a short pause lets the request reach containerd.
        let mut events = subscribe(channel.clone());
        tokio::time::sleep(SUBSCRIBE_PAUSE).await;
        for namespace in &self.namespaces {
            let content = list(&channel, namespace).await?;
            self.update(|k| k.replace(namespace, content));
        }
        lock(&self.state).channel = Some(channel.clone());
        *up = true;
        info!(
            socket = %self.socket.display(),
            namespaces = ?self.namespaces,
            digests = self.status().digests,
            "containerd source on"
        );

        let mut relist = tokio::time::interval_at(Instant::now() + RELIST_EVERY, RELIST_EVERY);
        relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Namespaces with image events waiting to settle, and when to re-list them.
        let mut pending: Vec<String> = Vec::new();
        let mut settle_at: Option<Instant> = None;
        loop {
            let settle = async {
                match settle_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                event = events.receiver.recv() => {
                    let envelope = event
                        .ok_or(ContainerdError::EventsClosed)?
                        .map_err(|s| ContainerdError::Rpc { what: "event stream".into(), source: Box::new(s) })?;
                    if let Some(namespace) = self.apply(&envelope) {
                        if !pending.contains(&namespace) {
                            pending.push(namespace);
                        }
                        settle_at.get_or_insert_with(|| Instant::now() + IMAGE_EVENT_SETTLE);
                    }
                }
                _ = settle => {
                    settle_at = None;
                    for namespace in std::mem::take(&mut pending) {
                        let content = list(&channel, &namespace).await?;
                        self.update(|k| k.replace(&namespace, content));
                    }
                }
                _ = relist.tick() => {
                    for namespace in &self.namespaces {
                        let content = list(&channel, namespace).await?;
                        self.update(|k| k.replace(namespace, content));
                    }
                }
            }
        }
    }

    /// Apply one event. Returns the namespace to re-list for image events.
    fn apply(&self, envelope: &Envelope) -> Option<String> {
        if !self.namespaces.contains(&envelope.namespace) {
            return None;
        }
        let namespace = envelope.namespace.as_str();
        let payload = envelope
            .event
            .as_ref()
            .map(|any| any.value.as_slice())
            .unwrap_or_default();
        match envelope.topic.as_str() {
            "/content/delete" => {
                let event = ContentDelete::decode(payload).ok()?;
                let digest: Digest = event.digest.parse().ok()?;
                debug!(%digest, namespace, "containerd deleted content");
                self.update(|k| k.remove(namespace, &digest));
                None
            }
            "/content/create" => {
                let event = ContentCreate::decode(payload).ok()?;
                let digest: Digest = event.digest.parse().ok()?;
                let size = u64::try_from(event.size).ok()?;
                self.update(|k| k.insert(namespace, digest, size));
                None
            }
            topic if topic.starts_with("/images/") => Some(namespace.to_string()),
            _ => None,
        }
    }

    /// The registries and repositories containerd pulled `digest` from, from its
    /// `containerd.io/distribution.source.<registry>=<repo>[,<repo>...]` labels in every
    /// configured namespace: what decides whether peers may have it (public content only).
    pub async fn distribution_sources(&self, digest: &Digest) -> Vec<(String, String)> {
        const LABEL: &str = "containerd.io/distribution.source.";
        let Some(channel) = self.channel() else {
            return Vec::new();
        };
        let mut sources = Vec::new();
        for namespace in &self.namespaces {
            let request = namespaced(
                InfoRequest {
                    digest: digest.to_string(),
                },
                namespace,
            );
            let Ok(response) = rpc("Content.Info", INFO_TIMEOUT, async {
                ContentClient::new(channel.clone()).info(request).await
            })
            .await
            else {
                continue;
            };
            let labels = response
                .into_inner()
                .info
                .map(|i| i.labels)
                .unwrap_or_default();
            for (key, value) in labels {
                if let Some(registry) = key.strip_prefix(LABEL) {
                    for repo in value.split(',').filter(|r| !r.is_empty()) {
                        sources.push((registry.to_string(), repo.to_string()));
                    }
                }
            }
        }
        sources.sort();
        sources.dedup();
        sources
    }

    /// The namespace holding `digest` and its size, asking containerd: first where it was
    /// last seen, then the others (content may have arrived since the last listing).
    async fn locate(&self, channel: &Channel, digest: &Digest) -> Option<(String, u64)> {
        let mut order: Vec<&String> = Vec::with_capacity(self.namespaces.len());
        {
            let state = lock(&self.state);
            order.extend(
                self.namespaces
                    .iter()
                    .filter(|n| state.known.has(n, digest)),
            );
            order.extend(
                self.namespaces
                    .iter()
                    .filter(|n| !state.known.has(n, digest)),
            );
        }
        for namespace in order {
            let request = namespaced(
                InfoRequest {
                    digest: digest.to_string(),
                },
                namespace,
            );
            let answer = rpc("Content.Info", INFO_TIMEOUT, async {
                ContentClient::new(channel.clone()).info(request).await
            })
            .await;
            match answer {
                Ok(response) => {
                    let Some(size) = response
                        .into_inner()
                        .info
                        .and_then(|i| u64::try_from(i.size).ok())
                    else {
                        continue;
                    };
                    self.update(|k| k.insert(namespace, *digest, size));
                    return Some((namespace.clone(), size));
                }
                Err(ContainerdError::Rpc { source, .. }) if source.code() == Code::NotFound => {
                    if lock(&self.state).known.has(namespace, digest) {
                        self.update(|k| k.remove(namespace, digest));
                    }
                }
                Err(e) => debug!(%digest, namespace, error = %e, "containerd Content.Info failed"),
            }
        }
        None
    }

    async fn open_from(&self, digest: Digest, from: u64) -> Option<Opened> {
        let channel = self.channel()?;
        let (namespace, len) = self.locate(&channel, &digest).await?;
        if from > len {
            return None;
        }
        if from == len {
            // Nothing left to read; containerd would answer an out-of-range error.
            return Some(Opened {
                len,
                offset: from,
                body: futures_util::stream::empty().boxed(),
                media_type: None,
            });
        }
        let request = namespaced(
            ReadContentRequest {
                digest: digest.to_string(),
                offset: i64::try_from(from).ok()?,
                // 0: to the end.
                size: 0,
            },
            &namespace,
        );
        let stream = rpc("Content.Read", RPC_TIMEOUT, async {
            ContentClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .read(request)
                .await
        })
        .await
        .inspect_err(|e| debug!(%digest, error = %e, "containerd Content.Read failed"))
        .ok()?
        .into_inner();
        let body = stream
            .map(|chunk| {
                chunk
                    .map(|c| Bytes::from(c.data))
                    .map_err(|status| Box::new(status) as BoxError)
            })
            .boxed();
        Some(Opened {
            len,
            offset: from,
            body,
            media_type: None,
        })
    }
}

impl ContentSource for ContainerdSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Containerd
    }

    fn open(&self, digest: &Digest, from: u64) -> BoxFuture<'_, Option<Opened>> {
        Box::pin(self.open_from(*digest, from))
    }
}

/// containerd's events, forwarded from a task of their own; the task ends with the
/// subscription, or when this is dropped.
struct Events {
    receiver: tokio::sync::mpsc::Receiver<Result<Envelope, tonic::Status>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn subscribe(channel: Channel) -> Events {
    let (sender, receiver) = tokio::sync::mpsc::channel(EVENT_BUFFER);
    let request = SubscribeRequest {
        filters: EVENT_FILTERS.iter().map(|f| f.to_string()).collect(),
    };
    let task = tokio::spawn(async move {
        let mut stream = match EventsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .subscribe(request)
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let _ = sender.send(Err(status)).await;
                return;
            }
        };
        loop {
            let item = match stream.message().await {
                Ok(Some(envelope)) => Ok(envelope),
                // The stream ended: dropping the sender tells the session.
                Ok(None) => return,
                Err(status) => Err(status),
            };
            let failed = item.is_err();
            if sender.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    Events { receiver, task }
}

/// `message` addressed to containerd namespace `namespace`.
fn namespaced<T>(message: T, namespace: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    // Namespaces are validated at config time (config::parse_namespace), so this parses.
    if let Ok(value) = namespace.parse() {
        request.metadata_mut().insert(NAMESPACE_HEADER, value);
    }
    request
}

/// A gRPC call, bounded by `timeout`.
async fn rpc<T>(
    what: &str,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, ContainerdError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(status)) => Err(ContainerdError::Rpc {
            what: what.to_string(),
            source: Box::new(status),
        }),
        Err(_) => Err(ContainerdError::Timeout {
            what: what.to_string(),
            timeout,
        }),
    }
}

/// Every sha256 content digest (with its size) in `namespace`. Other algorithms are left
/// out: eddy serves sha256 only.
async fn list(channel: &Channel, namespace: &str) -> Result<HashMap<Digest, u64>, ContainerdError> {
    let what = format!("Content.List in namespace {namespace}");
    let listing = async {
        let mut stream = ContentClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .list(namespaced(
                ListContentRequest {
                    filters: Vec::new(),
                },
                namespace,
            ))
            .await?
            .into_inner();
        let mut content = HashMap::new();
        while let Some(chunk) = stream.message().await? {
            for info in chunk.info {
                if let (Ok(digest), Ok(size)) =
                    (info.digest.parse::<Digest>(), u64::try_from(info.size))
                {
                    content.insert(digest, size);
                }
            }
        }
        Ok(content)
    };
    rpc(&what, LIST_TIMEOUT, listing).await
}

/// A containerd namespace name, as containerd accepts it: alphanumeric components joined by
/// single `.`, `_` or `-`, at most 76 characters.
pub fn valid_namespace(name: &str) -> bool {
    const MAX_LEN: usize = 76;
    if name.is_empty() || name.len() > MAX_LEN {
        return false;
    }
    let mut previous_separator = true;
    for b in name.bytes() {
        let separator = matches!(b, b'.' | b'_' | b'-');
        if separator && previous_separator {
            return false;
        }
        if !separator && !b.is_ascii_alphanumeric() {
            return false;
        }
        previous_separator = separator;
    }
    !previous_separator
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn source(namespaces: &[&str]) -> Arc<ContainerdSource> {
        ContainerdSource::new(
            "/nonexistent/containerd.sock".into(),
            namespaces.iter().map(|n| n.to_string()).collect(),
            &mut Registry::default(),
        )
    }

    fn envelope(namespace: &str, topic: &str, payload: Vec<u8>) -> Envelope {
        Envelope {
            timestamp: None,
            namespace: namespace.into(),
            topic: topic.into(),
            event: Some(prost_types_any(payload)),
        }
    }

    fn prost_types_any(value: Vec<u8>) -> prost_types::Any {
        prost_types::Any {
            type_url: "containerd.events.X".into(),
            value,
        }
    }

    #[test]
    fn a_delete_in_one_namespace_leaves_the_other() {
        let mut known = Known::default();
        known.replace("k8s.io", HashMap::from([(d(1), 10), (d(2), 20)]));
        known.replace("moby", HashMap::from([(d(1), 10)]));
        assert_eq!(known.count(), 2);
        known.remove("k8s.io", &d(1));
        assert_eq!(known.size(&d(1)), Some(10));
        known.remove("moby", &d(1));
        assert_eq!(known.size(&d(1)), None);
        assert_eq!(known.digests(), vec![d(2)]);
    }

    #[test]
    fn events_update_the_known_set_for_configured_namespaces_only() {
        let s = source(&["k8s.io"]);
        let create = ContentCreate {
            digest: d(1).to_string(),
            size: 5,
        }
        .encode_to_vec();
        assert_eq!(
            s.apply(&envelope("other", "/content/create", create.clone())),
            None
        );
        assert_eq!(s.contains(&d(1)), None);
        s.apply(&envelope("k8s.io", "/content/create", create));
        assert_eq!(s.contains(&d(1)), Some(5));
        assert_eq!(s.digests_gauge.get(), 1);
        let delete = ContentDelete {
            digest: d(1).to_string(),
        }
        .encode_to_vec();
        s.apply(&envelope("k8s.io", "/content/delete", delete));
        assert_eq!(s.contains(&d(1)), None);
        assert_eq!(s.digests_gauge.get(), 0);
        assert_eq!(
            s.apply(&envelope("k8s.io", "/images/create", Vec::new()))
                .as_deref(),
            Some("k8s.io")
        );
    }

    #[test]
    fn malformed_events_change_nothing() {
        let s = source(&["k8s.io"]);
        s.update(|k| k.insert("k8s.io", d(1), 1));
        s.apply(&envelope(
            "k8s.io",
            "/content/delete",
            vec![0xff, 0xff, 0xff],
        ));
        let bad = ContentDelete {
            digest: "sha256:nothex".into(),
        }
        .encode_to_vec();
        s.apply(&envelope("k8s.io", "/content/delete", bad));
        assert_eq!(s.contains(&d(1)), Some(1));
    }

    #[tokio::test]
    async fn a_source_without_containerd_answers_none_at_once() {
        let s = source(&["k8s.io"]);
        s.update(|k| k.insert("k8s.io", d(1), 1));
        let started = std::time::Instant::now();
        assert!(s.open(&d(1), 0).await.is_none());
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(!s.status().connected);
    }

    #[tokio::test]
    async fn a_missing_socket_fails_the_session_with_the_path() {
        let s = source(&["k8s.io"]);
        let (_tx, mut rx) = watch::channel(false);
        let mut up = false;
        let e = s.session(&mut rx, &mut up).await.unwrap_err();
        assert!(!up);
        assert!(
            e.to_string().contains("/nonexistent/containerd.sock"),
            "{e}"
        );
    }

    #[test]
    fn namespace_names() {
        for ok in ["k8s.io", "default", "moby", "a-b_c.d", "x1"] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "k8s/io", &"a".repeat(77)] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }
}
