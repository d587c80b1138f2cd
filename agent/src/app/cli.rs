//! Command line (clap). Every `run` flag can also be given as an `EDDY_*` environment
//! variable. Parsing ends here: `config::Config::from_args` validates once into the
//! immutable config the rest of the agent uses.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "eddy",
    version,
    about = "Transparent, fail-open container registry cache"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "EDDY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to containerd's cgroup and serve redirected connections.
    // Boxed: the run flags outweigh every other subcommand's (clippy::large_enum_variant).
    Run(Box<RunArgs>),
    /// Show what is attached where, the BPF counters and the heartbeat age.
    Status(StatusArgs),
    /// eddy's certificate authority: export it, or install it into a host trust bundle.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Check that eddy can work on this node: one line per check, with the fix.
    Doctor(DoctorArgs),
    /// Apply the store's size limit and TTL now: through the running agent's admin endpoint,
    /// or directly on --data-dir when no agent holds it.
    Gc(GcArgs),
}

/// The store's lifecycle policy.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Store size limit: bytes with a unit (50GiB, 500MiB) or a share of the store's
    /// filesystem (80%). Above it the least recently used content is evicted down to 80% of it.
    #[arg(long, env = "EDDY_CACHE_MAX_SIZE", default_value = "80%")]
    pub cache_max_size: crate::store::lifecycle::CacheSize,
    /// Content not used for this long is removed (7d, 12h, 30s); every hit extends it.
    #[arg(long, env = "EDDY_CACHE_TTL", default_value = "7d", value_parser = crate::store::lifecycle::parse_duration)]
    pub cache_ttl: std::time::Duration,
}

impl CacheArgs {
    pub fn policy(&self) -> crate::store::lifecycle::Policy {
        crate::store::lifecycle::Policy {
            max_size: self.cache_max_size,
            ttl: self.cache_ttl,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct GcArgs {
    /// Report what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The running agent's admin address.
    #[arg(long, env = "EDDY_ADMIN", default_value = "127.0.0.1:15090")]
    pub admin: SocketAddr,
    /// The data dir; worked on directly when no agent holds it.
    #[arg(long, env = "EDDY_DATA_DIR", default_value = "/var/lib/eddy")]
    pub data_dir: PathBuf,
    /// The policy for a direct run (a running agent applies its own).
    #[command(flatten)]
    pub cache: CacheArgs,
}

impl GcArgs {
    pub fn request(&self) -> crate::ops::gc::GcRequest {
        crate::ops::gc::GcRequest {
            dry_run: self.dry_run,
            admin: self.admin,
            data_dir: self.data_dir.clone(),
            policy: self.cache.policy(),
        }
    }
}

/// The registries served through TLS termination, and the CA that signs for them.
#[derive(Args, Debug, Clone)]
pub struct TrustArgs {
    /// Directory for eddy's state (CA, content store).
    #[arg(long, env = "EDDY_DATA_DIR", default_value = "/var/lib/eddy")]
    pub data_dir: PathBuf,
    /// A registry whose TLS eddy terminates and caches: a host name, or IP[:PORT] for
    /// registries clients dial by address. Repeatable (env: comma-separated).
    #[arg(long = "registry", env = "EDDY_REGISTRY", value_delimiter = ',', default_values_t = DEFAULT_REGISTRIES.map(String::from))]
    pub registries: Vec<String>,
    /// Create the CA without name constraints (by default it can only sign for the
    /// configured registries, so a leaked key cannot impersonate other hosts).
    #[arg(long, env = "EDDY_CA_UNCONSTRAINED")]
    pub ca_unconstrained: bool,
    /// Directory of the CA (ca.crt, ca.key, ca.json) instead of <data dir>/ca: e.g. one
    /// cluster-wide CA from a mounted Secret. Created there if it holds no CA yet.
    #[arg(long, env = "EDDY_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Endpoints tried before a registry itself: `REGISTRY=ENDPOINT[,ENDPOINT...]`, ENDPOINT
    /// `[http://|https://]HOST[:PORT][/PREFIX]`. The registry is intercepted like a
    /// `--registry`. Repeatable (env: `;`-separated).
    #[arg(long = "mirror", env = "EDDY_MIRROR", value_name = "REGISTRY=ENDPOINT,...", value_delimiter = ';', value_parser = crate::upstream::chain::ChainFlag::parse)]
    pub mirrors: Vec<crate::upstream::chain::ChainFlag>,
    /// Endpoints tried after a registry answers 404 (or 5xx), or cannot be reached: as
    /// `--mirror`. Repeatable (env: `;`-separated).
    #[arg(long = "fallback", env = "EDDY_FALLBACK", value_name = "REGISTRY=ENDPOINT,...", value_delimiter = ';', value_parser = crate::upstream::chain::ChainFlag::parse)]
    pub fallbacks: Vec<crate::upstream::chain::ChainFlag>,
}

impl TrustArgs {
    /// The CA directory these arguments name.
    pub fn ca_dir(&self) -> PathBuf {
        self.ca_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ca"))
    }

    /// `--mirror` and `--fallback`, merged per registry.
    pub fn chains(&self) -> crate::upstream::chain::ChainConfig {
        crate::upstream::chain::ChainConfig::new(&self.mirrors, &self.fallbacks)
    }

    /// `--registry` plus the registries named by `--mirror`/`--fallback`: all of them are
    /// terminated, and the CA must be able to sign for them.
    pub fn registry_values(&self) -> Vec<String> {
        let mut values = self.registries.clone();
        values.extend(self.chains().registry_values());
        values
    }
}

/// The public registries eddy serves by default.
pub const DEFAULT_REGISTRIES: [&str; 9] = [
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
];

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA if it does not exist yet.
    Export(TrustArgs),
    /// Add the CA certificate to a host trust bundle, idempotently.
    Install {
        #[command(flatten)]
        trust: TrustArgs,
        /// The trust bundle file, e.g. /etc/ssl/certs/ca-certificates.crt.
        #[arg(long, env = "EDDY_CA_BUNDLE")]
        bundle: PathBuf,
        /// When the CA was newly added, restart the node's containerd once (through the
        /// host's PID 1, `systemctl restart` of the unit that holds containerd).
        #[arg(long, env = "EDDY_RESTART_CONTAINERD")]
        restart_containerd: bool,
        /// The process whose mount namespace is the host's (needs hostPID).
        #[arg(long, default_value_t = 1, hide = true)]
        host_pid: u32,
    },
    /// Remove the CA certificate from a host trust bundle (leaves the rest untouched).
    Uninstall {
        #[command(flatten)]
        trust: TrustArgs,
        #[arg(long, env = "EDDY_CA_BUNDLE")]
        bundle: PathBuf,
    },
    /// Print a Talos machine-config patch that adds the CA to the node's trusted roots.
    TalosPatch(TrustArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// As for `eddy run`: containerd's cgroup v2 directory, or `auto`.
    #[arg(long, env = "EDDY_CGROUP", default_value = "auto")]
    pub cgroup: String,
    /// containerd's socket, or `auto` (from containerd's command line, else the known paths).
    #[arg(long, env = "EDDY_CONTAINERD_SOCKET", default_value = "auto")]
    pub containerd_socket: String,
    #[arg(long, env = "EDDY_LISTEN", default_value = "127.0.0.1:15443")]
    pub listen: SocketAddr,
    #[arg(long, env = "EDDY_ADMIN", default_value = "127.0.0.1:15090")]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// The host trust bundle containerd reads.
    #[arg(
        long,
        env = "EDDY_CA_BUNDLE",
        default_value = "/etc/ssl/certs/ca-certificates.crt"
    )]
    pub bundle: PathBuf,
    #[arg(long, env = "EDDY_BPF_PIN_DIR", default_value = eddy_common::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// As for `eddy run`: with P2P on, its listen port and data port are checked too.
    #[arg(long, env = "EDDY_P2P_LISTEN")]
    pub p2p_listen: Option<String>,
    #[arg(long, env = "EDDY_P2P_DATA_PORT")]
    pub p2p_data_port: Option<u16>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// cgroup v2 directory whose processes get redirected, or `auto` to find containerd's.
    #[arg(long, env = "EDDY_CGROUP", default_value = "auto")]
    pub cgroup: String,
    /// Proxy listen address (IPv4). eddy also listens on [::1] with the same port when it can,
    /// for native IPv6 destinations.
    #[arg(long, env = "EDDY_LISTEN", default_value = "127.0.0.1:15443")]
    pub listen: SocketAddr,
    /// Destination port to intercept. Repeatable (env: comma-separated).
    #[arg(long = "intercept-port", env = "EDDY_INTERCEPT_PORT", value_delimiter = ',', default_values_t = [443u16])]
    pub intercept_ports: Vec<u16>,
    /// Admin HTTP address serving /metrics, /healthz, /readyz and /trust.
    #[arg(long, env = "EDDY_ADMIN", default_value = "127.0.0.1:15090")]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Extra CA certificate (PEM) trusted for upstream registries, beside the system roots.
    /// Repeatable.
    #[arg(long = "upstream-ca", env = "EDDY_UPSTREAM_CA", value_delimiter = ',')]
    pub upstream_ca: Vec<PathBuf>,
    /// Node-level upstream credentials: a Docker config.json (what a
    /// kubernetes.io/dockerconfigjson Secret holds). Used for requests that carry no
    /// credentials of their own; any client on the node may pull what they can read.
    /// Re-read when the file changes.
    #[arg(long, env = "EDDY_UPSTREAM_AUTH_FILE")]
    pub upstream_auth_file: Option<PathBuf>,
    /// bpffs directory where the maps are pinned.
    #[arg(long, env = "EDDY_BPF_PIN_DIR", default_value = eddy_common::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// SO_MARK put on eddy's own upstream sockets so the hooks never redirect them.
    #[arg(long, env = "EDDY_SOCKET_MARK", default_value_t = 0xedd1)]
    pub socket_mark: u32,
    /// Redirects stop when eddy's heartbeat is older than this many milliseconds.
    #[arg(long, env = "EDDY_HEARTBEAT_TIMEOUT_MS", default_value_t = 1500)]
    pub heartbeat_timeout_ms: u64,
    /// On SIGTERM, wait at most this many seconds for open connections to finish.
    #[arg(long, env = "EDDY_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub p2p: P2pArgs,
    /// A fill whose upstream sends nothing for this long (30s, 2m) fails, and its clients
    /// are relayed or retry, rather than all hanging on a stalled registry.
    #[arg(long, env = "EDDY_UPSTREAM_IDLE_TIMEOUT", default_value = "60s", value_parser = crate::store::lifecycle::parse_duration)]
    pub upstream_idle_timeout: std::time::Duration,
    /// Log every decision of the eBPF hooks (redirect, or skip and why) at debug level under
    /// the target eddy::bpf. Also on when EDDY_LOG / RUST_LOG shows eddy::bpf at debug.
    #[arg(long, env = "EDDY_BPF_LOG")]
    pub bpf_log: bool,
    /// containerd's socket, whose content store serves as a source: a path, `auto` (from
    /// containerd's command line, else the known paths), or `none` to turn the source off.
    /// A missing socket turns the source off with one warning; eddy retries in the background.
    #[arg(long, env = "EDDY_CONTAINERD_SOCKET", default_value = crate::node::distro::DEFAULT_SOCKET)]
    pub containerd_socket: String,
    /// containerd namespace whose content is served. Repeatable (env: comma-separated).
    #[arg(long = "containerd-namespace", env = "EDDY_CONTAINERD_NAMESPACE", value_delimiter = ',', default_values_t = [String::from("k8s.io")])]
    pub containerd_namespaces: Vec<String>,
}

/// Sharing content with other eddy nodes (libp2p). Off unless `--p2p-listen` is given.
#[derive(Args, Debug, Clone, Default)]
pub struct P2pArgs {
    /// Listen for other eddy nodes on IP:PORT (or a TCP multiaddr, /ip4/0.0.0.0/tcp/4001).
    /// Without it P2P is off and eddy runs as one node.
    #[arg(long, env = "EDDY_P2P_LISTEN")]
    pub p2p_listen: Option<String>,
    /// A node to join: IP:PORT, HOST:PORT (re-resolved every 30 s, e.g. a headless Service)
    /// or a TCP multiaddr, optionally ending in /p2p/ID. Repeatable (env: comma-separated).
    #[arg(
        long = "p2p-bootstrap",
        env = "EDDY_P2P_BOOTSTRAP",
        value_delimiter = ','
    )]
    pub p2p_bootstrap: Vec<String>,
    /// A swarm key (swarm.key format: /key/swarm/psk/1.0.0/, /base16/, 64 hex digits) that
    /// makes the swarm private: nodes without it can neither join nor fetch.
    #[arg(long, env = "EDDY_P2P_PSK_FILE")]
    pub p2p_psk_file: Option<PathBuf>,
    /// The data port, where other nodes take blob bodies over TLS with tickets this node
    /// hands them over the swarm (default: the --p2p-listen port + 1; 0: any free port).
    #[arg(long, env = "EDDY_P2P_DATA_PORT")]
    pub p2p_data_port: Option<u16>,
    /// When nodes miss content nobody holds at the same moment: `elect` (ask the digest's home
    /// node, which names one fetcher; the rest stream from it) or `announce` (fetch at once;
    /// simultaneous misses may each fetch). See docs/p2p.md and docs/scale.md.
    #[arg(long, env = "EDDY_P2P_SINGLE_FLIGHT", value_enum, default_value_t)]
    pub p2p_single_flight: crate::peers::SingleFlight,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// bpffs directory where the maps are pinned.
    #[arg(long, env = "EDDY_BPF_PIN_DIR", default_value = eddy_common::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The running agent's admin address, asked for the clients that do not trust eddy's CA.
    #[arg(long, env = "EDDY_ADMIN", default_value = "127.0.0.1:15090")]
    pub admin: SocketAddr,
}
