//! Several eddy nodes in one P2P swarm, sharing one upstream: the harness's docker-registry in
//! a netns behind a veth pair (shaped with tbf when asked), and per node its own hooked
//! cgroup, containerd (eddy's `--containerd-socket`), client (ctr inside that cgroup, trusting
//! that node's eddy CA), data dir and eddy with `--p2p-listen` on a loopback port of its own. Every eddy bootstraps from
//! every other one; the PSK file is shared unless a node is given another.
//!
//! The nodes share the host's network namespace (the swarm runs on loopback); the upstream is
//! the one non-loopback host, in a namespace the test created. Fields drop in declaration
//! order: nodes (eddy, clients) first, the upstream last.
use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    cgroup::CgroupGuard,
    containerd::{Client, Containerd, Run},
    eddy::{eddy_bin, free_port, metric_value},
    netns::Netns,
    oci::{self, Image, ImageSpec},
    pki::{write_bundle, Pki},
    registry::{check_programs, Upstream, UpstreamOptions, CDN_HOST, REGISTRY_HOST},
    registry_eddy::{ca_export, RegistryEddy, RegistryEddyConfig},
};

/// The containerd namespace the clients pull into.
pub const NAMESPACE: &str = "eddy-p2p";

pub struct Node {
    pub eddy: Option<RegistryEddy>,
    pub containerd: Containerd,
    pub client: Client,
    pub config: RegistryEddyConfig,
    pub p2p: std::net::SocketAddr,
    pub cgroup: CgroupGuard,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub upstream: Upstream,
    pub netns: Netns,
    pub pki: Pki,
    pub psk: PathBuf,
    pub work: tempfile::TempDir,
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
        check_programs()?;
        let work = tempfile::Builder::new().prefix("eddy-p2p-").tempdir()?;
        let netns = Netns::new()?;
        let pki = Pki::create(
            &work.path().join("pki"),
            &[REGISTRY_HOST, CDN_HOST],
            &[netns.ns_v4.into()],
        )?;
        let upstream = Upstream::start(&netns, &pki, options)?;
        let psk = work.path().join("swarm.key");
        write_swarm_key(&psk)?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            upstream,
            netns,
            pki,
            psk,
            work,
        };
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        for i in 0..n {
            let bootstrap: Vec<u16> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect();
            let psk = cluster.psk.clone();
            let node = cluster.node(i, ports[i], &bootstrap, &psk, extra)?;
            cluster.nodes.push(node);
        }
        cluster.wait_connected(n - 1, Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Node `i` on P2P port `port`, bootstrapping from `bootstrap`, with key file `psk`.
    pub fn node(
        &self,
        i: usize,
        port: u16,
        bootstrap: &[u16],
        psk: &Path,
        extra: &[&str],
    ) -> Result<Node> {
        let dir = self
            .work
            .path()
            .join(format!("node-{i}-{}", crate::next_id()));
        fs::create_dir_all(&dir)?;
        let cgroup = CgroupGuard::new()?;
        let client_hosts = dir.join("hosts.client");
        Client::write_hosts(&client_hosts, self.netns.ns_v4, &[REGISTRY_HOST])?;
        let eddy_hosts = dir.join("hosts.eddy");
        Client::write_hosts(&eddy_hosts, self.netns.ns_v4, &[REGISTRY_HOST, CDN_HOST])?;
        let p2p = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // The node's own containerd, whose content store eddy reads.
        let containerd = Containerd::start()?;
        let mut extra_args: Vec<OsString> = vec![
            "--containerd-socket".into(),
            containerd.socket.clone().into(),
            "--containerd-namespace".into(),
            NAMESPACE.into(),
            "--p2p-listen".into(),
            p2p.to_string().into(),
            "--p2p-psk-file".into(),
            psk.into(),
        ];
        for b in bootstrap {
            extra_args.push("--p2p-bootstrap".into());
            extra_args.push(format!("127.0.0.1:{b}").into());
        }
        extra_args.extend(extra.iter().map(OsString::from));
        let config = RegistryEddyConfig {
            cgroup: cgroup.path().to_path_buf(),
            data_dir: dir.join("data"),
            registries: vec![REGISTRY_HOST.to_string()],
            upstream_cas: vec![self.pki.ca_cert.clone()],
            hosts: Some(eddy_hosts),
            quiet_start: false,
            extra_args,
        };
        let bin = eddy_bin();
        fs::create_dir_all(&config.data_dir)?;
        let eddy_ca = dir.join("eddy-ca.pem");
        fs::write(
            &eddy_ca,
            ca_export(&bin, &config.data_dir, &config.registries)?,
        )?;
        let bundle = dir.join("ca-bundle.pem");
        write_bundle(&bundle, &[&eddy_ca, &self.pki.ca_cert])?;
        let eddy = RegistryEddy::start(&bin, &config)?;
        Ok(Node {
            eddy: Some(eddy),
            containerd,
            client: Client {
                cgroup: Some(cgroup.path().to_path_buf()),
                hosts: client_hosts,
                ca_bundle: bundle,
            },
            config,
            p2p,
            cgroup,
        })
    }

    /// Wait (bounded) until every node has at least `peers` connected peers.
    pub fn wait_connected(&self, peers: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let counts: Vec<f64> = self.nodes.iter().map(|n| n.peers()).collect();
            if counts.iter().all(|c| *c >= peers as f64) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("after {timeout:?} the nodes have {counts:?} peers, wanted {peers} each");
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
        let n = crate::next_id();
        let body = cluster.work.path().join(format!("curl-{n}.body"));
        let headers = cluster.work.path().join(format!("curl-{n}.headers"));
        let mut args = vec![
            "--cacert",
            self.client.ca_bundle.to_str().context("utf-8 path")?,
        ];
        args.extend_from_slice(extra);
        self.client.curl(
            &format!("https://{REGISTRY_HOST}{path}"),
            &args,
            &body,
            &headers,
            Duration::from_secs(60),
        )?;
        let status =
            crate::containerd::http_status(&fs::read_to_string(&headers).unwrap_or_default());
        Ok((status, fs::read(&body).unwrap_or_default()))
    }

    /// `eddy_p2p_peers`, or 0 when it cannot be read.
    pub fn peers(&self) -> f64 {
        self.eddy
            .as_ref()
            .and_then(|e| e.metrics().ok())
            .and_then(|m| metric_value(&m, "eddy_p2p_peers"))
            .unwrap_or(0.0)
    }

    /// `eddy_bytes_total{source=...}` of this node.
    pub fn bytes_from(&self, source: &str) -> f64 {
        let series = format!(r#"eddy_bytes_total{{source="{source}"}}"#);
        self.eddy
            .as_ref()
            .and_then(|e| e.metrics().ok())
            .and_then(|m| metric_value(&m, &series))
            .unwrap_or(0.0)
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }
}
