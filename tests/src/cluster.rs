//! Several eddy nodes in one P2P swarm, sharing one upstream, as machines on one LAN: a
//! bridge (see [`Lan`]) with the harness's docker-registry in a namespace of its own at
//! 10.A.B.1, behind a link shaped with tbf when asked ([`shape_link`] on [`Cluster::netns`]),
//! and node `i` in its own namespace at 10.A.B.(10+i) with its own hooked cgroup, containerd
//! (eddy's `--containerd-socket`), client (ctr inside that cgroup and namespace, trusting
//! that node's eddy CA), data dir, and eddy with `--p2p-listen 10.A.B.(10+i):4001` and
//! `--admin 10.A.B.(10+i):15090` (the test reaches each node over the LAN's host port).
//! Every eddy bootstraps from every other one; the PSK file is shared unless a node is given
//! another. Fields drop in declaration order: nodes (eddy, clients, then their namespace)
//! first, the upstream next, the LAN last.
//!
//! [`shape_link`]: crate::registry::shape_link
use std::{
    ffi::OsString,
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    cgroup::CgroupGuard,
    containerd::{Client, Containerd, Run},
    eddy::{eddy_bin, metric_value},
    netns::{Lan, Netns},
    oci::{self, Image, ImageSpec},
    pki::Pki,
    registry::{check_programs, Upstream, UpstreamOptions, CDN_HOST, REGISTRY_HOST},
    registry_eddy::{InNetns, RegistryEddy, RegistryEddyConfig},
    world::{curl_registry, trust_eddy_and_test_ca, upstream_host},
};

/// Every node's P2P port (each node has an address of its own).
pub const P2P_PORT: u16 = 4001;
/// Every node's admin port, on its LAN address.
pub const ADMIN_PORT: u16 = 15090;

/// Kademlia's bucket size (libp2p's default K_VALUE).
const KAD_K_VALUE: usize = 20;

/// The containerd namespace the clients pull into.
pub const NAMESPACE: &str = "eddy-p2p";
/// The host name that resolves to every node with [`Bootstrap::HostName`], as the chart's
/// headless Service does (each node's eddy reads it from its private /etc/hosts).
pub const PEERS_HOST: &str = "eddy-peers.cluster.test";

/// How the nodes find each other at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// Each node is given every other node's address (`--p2p-bootstrap IP:PORT` each).
    EveryAddress,
    /// One `--p2p-bootstrap` host name, [`PEERS_HOST`], that resolves to every node.
    HostName,
}

/// What [`Cluster::build`] starts.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub upstream: UpstreamOptions,
    /// More `eddy run` arguments for every node.
    pub extra: Vec<String>,
    /// With a swarm key (`--p2p-psk-file`), or an open swarm.
    pub private: bool,
    pub bootstrap: Bootstrap,
    /// Nodes started at once (each start waits for its containerd and its eddy).
    pub parallel_starts: usize,
    /// How long to wait for every node to see every other one.
    pub connect_timeout: Duration,
}

impl ClusterSpec {
    pub fn new(nodes: usize) -> Self {
        ClusterSpec {
            nodes,
            upstream: UpstreamOptions::default(),
            extra: Vec::new(),
            private: true,
            bootstrap: Bootstrap::EveryAddress,
            parallel_starts: 1,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

pub struct Node {
    pub eddy: Option<RegistryEddy>,
    pub containerd: Containerd,
    pub client: Client,
    pub config: RegistryEddyConfig,
    pub p2p: SocketAddr,
    pub cgroup: CgroupGuard,
    /// The node's network namespace: eddy, containerd and the client all run in it.
    pub netns: Netns,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub upstream: Upstream,
    /// The upstream's namespace on the LAN; shape its link to throttle the upstream.
    pub netns: Netns,
    pub pki: Pki,
    /// The swarm key every node is given (None: an open swarm).
    pub psk: Option<PathBuf>,
    pub work: tempfile::TempDir,
    pub lan: Lan,
}

/// A swarm.key: the libp2p pre-shared key file format.
pub fn write_swarm_key(path: &Path) -> Result<()> {
    let key: [u8; 32] = rand::random();
    fs::write(
        path,
        format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", hex::encode(key)),
    )
    .with_context(|| format!("writing {}", path.display()))
}

impl Cluster {
    /// `n` nodes, started and connected to each other. `extra`: more `eddy run` arguments
    /// for every node.
    pub fn start(n: usize, options: UpstreamOptions, extra: &[&str]) -> Result<Self> {
        Self::start_with(n, options, extra, true)
    }

    /// As [`Cluster::start`]; `private`: with a swarm key (`--p2p-psk-file`), or without.
    pub fn start_with(
        n: usize,
        options: UpstreamOptions,
        extra: &[&str],
        private: bool,
    ) -> Result<Self> {
        Self::build(&ClusterSpec {
            upstream: options,
            extra: extra.iter().map(|e| e.to_string()).collect(),
            private,
            ..ClusterSpec::new(n)
        })
    }

    /// The cluster `spec` describes, started, with every node connected to every other.
    pub fn build(spec: &ClusterSpec) -> Result<Self> {
        Self::build_until(spec, &|| false)
    }

    /// As [`Cluster::build`]; gives up between node starts once `interrupted` says so.
    pub fn build_until(
        spec: &ClusterSpec,
        interrupted: &(dyn Fn() -> bool + Sync),
    ) -> Result<Self> {
        let n = spec.nodes;
        check_programs()?;
        let work = tempfile::Builder::new().prefix("eddy-p2p-").tempdir()?;
        let lan = Lan::new()?;
        let netns = lan.member(1)?;
        let (pki, upstream) = upstream_host(
            work.path(),
            &netns,
            &[REGISTRY_HOST, CDN_HOST],
            spec.upstream.clone(),
        )?;
        let psk = if spec.private {
            let psk = work.path().join("swarm.key");
            write_swarm_key(&psk)?;
            Some(psk)
        } else {
            None
        };
        let mut cluster = Cluster {
            nodes: Vec::new(),
            upstream,
            netns,
            pki,
            psk,
            work,
            lan,
        };
        let extra: Vec<&str> = spec.extra.iter().map(String::as_str).collect();
        let batch = spec.parallel_starts.max(1);
        let mut next = 0;
        while next < n {
            if interrupted() {
                bail!("interrupted while starting node {next} of {n}");
            }
            let ids: Vec<usize> = (next..n.min(next + batch)).collect();
            let started: Vec<Result<Node>> = std::thread::scope(|scope| {
                let handles: Vec<_> = ids
                    .iter()
                    .map(|&i| {
                        let cluster = &cluster;
                        let extra = &extra;
                        scope.spawn(move || cluster.start_node(i, n, spec.bootstrap, extra))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("node start panicked")))
                    })
                    .collect()
            });
            for node in started {
                cluster.nodes.push(node?);
            }
            if spec.bootstrap == Bootstrap::HostName {
                cluster.publish_peers()?;
            }
            next += ids.len();
        }
        cluster.wait_connected(n - 1, spec.connect_timeout)?;
        Ok(cluster)
    }

    /// Node `i` of `n`, bootstrapping as `bootstrap` says.
    fn start_node(&self, i: usize, n: usize, bootstrap: Bootstrap, extra: &[&str]) -> Result<Node> {
        let psk = self.psk.clone();
        match bootstrap {
            Bootstrap::EveryAddress => {
                let addrs: Vec<String> = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| self.p2p_addr(j).to_string())
                    .collect();
                self.node_bootstrapping(i, &addrs, &[], psk.as_deref(), extra)
            }
            Bootstrap::HostName => {
                // As a headless Service lists the pods that are ready: the nodes started so far
                // and this one; `publish_peers` adds the later ones as they start.
                let peers: Vec<std::net::Ipv4Addr> =
                    (0..=i).map(|j| self.node_ip(j)).collect::<Result<_>>()?;
                let name = format!("{PEERS_HOST}:{P2P_PORT}");
                self.node_bootstrapping(i, &[name], &peers, psk.as_deref(), extra)
            }
        }
    }

    /// Node `i`'s address on the LAN: 10.A.B.(10+i).
    pub fn node_ip(&self, i: usize) -> Result<std::net::Ipv4Addr> {
        let host = u8::try_from(10 + i)
            .ok()
            .filter(|h| *h <= 253)
            .with_context(|| format!("node {i}: the LAN has room for nodes 0..=243"))?;
        let [a, b, c, _] = self.netns.ns_v4.octets();
        Ok(std::net::Ipv4Addr::new(a, b, c, host))
    }

    /// Node `i`'s P2P address (what the others bootstrap from).
    pub fn p2p_addr(&self, i: usize) -> SocketAddr {
        let ip = self.node_ip(i).expect("node index in range");
        SocketAddr::from((ip, P2P_PORT))
    }

    /// Node `i` in a new namespace on the LAN, bootstrapping from `bootstrap`, with key
    /// file `psk`.
    pub fn node(
        &self,
        i: usize,
        bootstrap: &[SocketAddr],
        psk: Option<&Path>,
        extra: &[&str],
    ) -> Result<Node> {
        let bootstrap: Vec<String> = bootstrap.iter().map(|b| b.to_string()).collect();
        self.node_bootstrapping(i, &bootstrap, &[], psk, extra)
    }

    /// As [`Cluster::node`], with `--p2p-bootstrap` arguments as given; `peers`: the
    /// addresses [`PEERS_HOST`] resolves to in this node's eddy's /etc/hosts.
    fn node_bootstrapping(
        &self,
        i: usize,
        bootstrap: &[String],
        peers: &[std::net::Ipv4Addr],
        psk: Option<&Path>,
        extra: &[&str],
    ) -> Result<Node> {
        let dir = self
            .work
            .path()
            .join(format!("node-{i}-{}", crate::basics::next_id()));
        fs::create_dir_all(&dir)?;
        let ip = self.node_ip(i)?;
        let netns = self.lan.member(ip.octets()[3])?;
        let cgroup = CgroupGuard::new()?;
        let client_hosts = dir.join("hosts.client");
        Client::write_hosts(&client_hosts, self.netns.ns_v4, &[REGISTRY_HOST])?;
        let eddy_hosts = dir.join("hosts.eddy");
        self.write_eddy_hosts(&eddy_hosts, peers)?;
        let p2p = SocketAddr::from((ip, P2P_PORT));
        // The node's own containerd, whose content store eddy reads.
        let containerd = Containerd::start_in(netns.name())?;
        let mut extra_args: Vec<OsString> = vec![
            "--containerd-socket".into(),
            containerd.socket.clone().into(),
            "--containerd-namespace".into(),
            NAMESPACE.into(),
            "--p2p-listen".into(),
            p2p.to_string().into(),
        ];
        if let Some(psk) = psk {
            extra_args.extend(["--p2p-psk-file".into(), psk.into()]);
        }
        for b in bootstrap {
            extra_args.push("--p2p-bootstrap".into());
            extra_args.push(b.into());
        }
        extra_args.extend(extra.iter().map(OsString::from));
        let config = RegistryEddyConfig {
            extra_args,
            in_netns: Some(InNetns {
                enter_arg: netns.enter_arg(),
                admin: SocketAddr::from((ip, ADMIN_PORT)),
            }),
            ..RegistryEddyConfig::caching(cgroup.path(), dir.join("data"), &self.pki, eddy_hosts)
        };
        let bundle = trust_eddy_and_test_ca(&dir, &config, &self.pki)?;
        let eddy = RegistryEddy::start(&eddy_bin(), &config)?;
        Ok(Node {
            eddy: Some(eddy),
            containerd,
            client: Client {
                cgroup: Some(cgroup.path().to_path_buf()),
                hosts: client_hosts,
                ca_bundle: bundle,
                netns: Some(netns.name().to_string()),
            },
            config,
            p2p,
            cgroup,
            netns,
        })
    }

    /// An eddy's /etc/hosts: the registry and CDN names at the upstream, and [`PEERS_HOST`]
    /// at each of `peers`, one line per address as a headless Service's DNS answer lists
    /// every pod. Rewritten in place, so a node's bind mount of it sees the new lines.
    fn write_eddy_hosts(&self, path: &Path, peers: &[std::net::Ipv4Addr]) -> Result<()> {
        Client::write_hosts(path, self.netns.ns_v4, &[REGISTRY_HOST, CDN_HOST])?;
        let lines: String = peers
            .iter()
            .map(|p| format!("{p} {PEERS_HOST}\n"))
            .collect();
        fs::OpenOptions::new()
            .append(true)
            .open(path)?
            .write_all(lines.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Every node's [`PEERS_HOST`] now resolves to every node started so far.
    fn publish_peers(&self) -> Result<()> {
        let peers: Vec<std::net::Ipv4Addr> = (0..self.nodes.len())
            .map(|j| self.node_ip(j))
            .collect::<Result<_>>()?;
        for node in &self.nodes {
            if let Some(hosts) = &node.config.hosts {
                self.write_eddy_hosts(hosts, &peers)?;
            }
        }
        Ok(())
    }

    /// Wait (bounded) until every node has at least `peers` connected peers, all of them in
    /// its DHT routing table too (where elections and lookups go).
    pub fn wait_connected(&self, peers: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let counts: Vec<(f64, f64)> = self
                .nodes
                .iter()
                .map(|n| (n.peers(), n.metric("eddy_p2p_dht_peers")))
                .collect();
            // Kademlia keeps at most K_VALUE peers per bucket, so past ~20 nodes a routing
            // table need not hold every peer: enough for lookups is K_VALUE of them.
            let dht_wanted = peers.min(KAD_K_VALUE) as f64;
            if counts
                .iter()
                .all(|(c, d)| *c >= peers as f64 && *d >= dht_wanted)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "after {timeout:?} the nodes have (connected, DHT) peers {counts:?}, wanted {peers} each"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Write an image layout and push it as registry.test/<repo>:<tag>.
    pub fn image(&self, repo: &str, tag: &str, spec: &ImageSpec) -> Result<Image> {
        let layout = self
            .work
            .path()
            .join("layouts")
            .join(repo.replace('/', "_"));
        let image = oci::write_layout(&layout, tag, spec)?;
        self.upstream.push(&image, repo)?;
        Ok(image)
    }

    /// Blob bytes the upstream (registry and CDN) sent so far.
    pub fn upstream_blob_bytes(&self) -> Result<u64> {
        let served = self.upstream.served()?;
        Ok(served.blob_bytes + self.upstream.cdn_bytes()?)
    }
}

impl Node {
    pub fn eddy(&self) -> &RegistryEddy {
        self.eddy.as_ref().expect("eddy is running")
    }

    /// `ctr content fetch` of `reference` through this node's eddy (bounded).
    pub fn fetch(&self, reference: &str) -> Result<Run> {
        self.client.fetch(
            &self.containerd,
            NAMESPACE,
            reference,
            &[],
            Duration::from_secs(120),
        )
    }

    /// `ctr images pull` of `reference` straight from the upstream, not through eddy (as
    /// before eddy was installed), into this node's containerd.
    pub fn pull_direct(&self, reference: &str) -> Result<Run> {
        self.pull_direct_with(reference, &[])
    }

    /// As [`Node::pull_direct`], with more `ctr images pull` arguments (`--user`).
    pub fn pull_direct_with(&self, reference: &str, extra: &[&str]) -> Result<Run> {
        let direct = Client {
            cgroup: None,
            ..self.client.clone()
        };
        direct.pull(
            &self.containerd,
            NAMESPACE,
            reference,
            extra,
            Duration::from_secs(120),
        )
    }

    /// curl `https://registry.test<path>` through this node's eddy: the HTTP status and
    /// the body.
    pub fn curl(
        &self,
        cluster: &Cluster,
        path: &str,
        extra: &[&str],
    ) -> Result<(Option<u16>, Vec<u8>)> {
        let curl = curl_registry(&self.client, cluster.work.path(), path, extra)?;
        Ok((curl.status, curl.body))
    }

    /// `eddy_p2p_peers`, or 0 when it cannot be read.
    pub fn peers(&self) -> f64 {
        self.metric("eddy_p2p_peers")
    }

    /// One series of this node's metrics, or 0 when it cannot be read.
    pub fn metric(&self, series: &str) -> f64 {
        self.eddy
            .as_ref()
            .and_then(|e| e.metrics().ok())
            .and_then(|m| metric_value(&m, series))
            .unwrap_or(0.0)
    }

    /// `eddy_bytes_total{source=...}` of this node.
    pub fn bytes_from(&self, source: &str) -> f64 {
        self.metric(&format!(r#"eddy_bytes_total{{source="{source}"}}"#))
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }
}
