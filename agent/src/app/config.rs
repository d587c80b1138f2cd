//! The validated, immutable configuration of `eddy run`.
use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use crate::{
    app::cli::RunArgs,
    hook::cgroup::{self, Cgroup, CgroupError},
    listener::registries::Registries,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("--listen {addr}: must be an IPv4 address (eddy adds [::1] itself)")]
    ListenNotV4 { addr: SocketAddr },
    #[error("--intercept-port: at least one port is required")]
    NoPorts,
    #[error("--intercept-port 0 is not a port")]
    PortZero,
    #[error("--intercept-port: at most {max} ports are supported, got {got}")]
    TooManyPorts { max: usize, got: usize },
    #[error("--heartbeat-timeout-ms {ms}: must be between 300 and 2500 so a hung eddy is bypassed within 3 s")]
    HeartbeatTimeout { ms: u64 },
    #[error("--socket-mark must not be 0")]
    MarkZero,
    #[error(transparent)]
    BadRegistry(#[from] crate::listener::registries::BadRegistry),
    #[error(transparent)]
    P2p(#[from] crate::peers::p2p::config::P2pConfigError),
    #[error("--containerd-namespace {value:?}: not a containerd namespace (letters and digits joined by single '.', '_' or '-', at most 76)")]
    BadContainerdNamespace { value: String },
    #[error(
        "--containerd-namespace: at least one namespace is required (or --containerd-socket none)"
    )]
    NoContainerdNamespaces,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub cgroup: Cgroup,
    pub listen: SocketAddrV4,
    /// `[::1]:<listen port>`, for clients that dial native IPv6 destinations.
    pub listen6: SocketAddr,
    pub intercept_ports: Vec<u16>,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    /// Where the CA lives: `--ca-dir`, or `<data dir>/ca`.
    pub ca_dir: PathBuf,
    pub registries: Registries,
    pub ca_unconstrained: bool,
    pub upstream_ca: Vec<PathBuf>,
    pub upstream_auth_file: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub socket_mark: u32,
    pub heartbeat_timeout: Duration,
    pub drain_timeout: Duration,
    pub cache_policy: crate::store::lifecycle::Policy,
    /// P2P with other eddy nodes; None when `--p2p-listen` is absent.
    pub p2p: Option<crate::peers::p2p::P2pConfig>,
    /// `--p2p-single-flight`: how simultaneous misses decide who fetches upstream.
    pub single_flight: crate::peers::SingleFlight,
    /// `--upstream-idle-timeout`: a fill whose upstream is silent this long fails.
    pub upstream_idle_timeout: Duration,
    /// `--bpf-log`: the eBPF hooks log their decisions.
    pub bpf_log: bool,
    /// `--mirror` and `--fallback`, per registry.
    pub chains: crate::upstream::chain::ChainConfig,
    /// containerd's content store as a source; None with `--containerd-socket none`.
    pub containerd: Option<ContainerdConfig>,
}

/// Where containerd's content store is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    pub socket: PathBuf,
    pub namespaces: Vec<String>,
}

impl ContainerdConfig {
    /// `--containerd-socket` and `--containerd-namespace`. `auto` takes the socket of the
    /// node's containerd (`distro`), else the first known path that exists, else the default
    /// path (whose absence the source reports as off).
    pub fn from_args(socket: &str, namespaces: &[String]) -> Result<Option<Self>, ConfigError> {
        let socket = match socket.trim() {
            "none" | "off" | "" => return Ok(None),
            "auto" => crate::node::distro::detect(std::path::Path::new("/proc"))
                .map(|c| c.socket)
                .or_else(|_| crate::node::distro::find_socket(std::path::Path::new("/")))
                .unwrap_or_else(|_| PathBuf::from(crate::node::distro::DEFAULT_SOCKET)),
            path => PathBuf::from(path),
        };
        let mut names: Vec<String> = Vec::new();
        for raw in namespaces {
            let name = raw.trim();
            if name.is_empty() {
                continue;
            }
            if !crate::sources::containerd::valid_namespace(name) {
                return Err(ConfigError::BadContainerdNamespace { value: raw.clone() });
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        if names.is_empty() {
            return Err(ConfigError::NoContainerdNamespaces);
        }
        Ok(Some(ContainerdConfig {
            socket,
            namespaces: names,
        }))
    }
}

impl Config {
    /// Validate the command line. Resolves `--cgroup auto` to containerd's cgroup.
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let listen = match args.listen {
            SocketAddr::V4(v4) => v4,
            addr @ SocketAddr::V6(_) => return Err(ConfigError::ListenNotV4 { addr }),
        };
        let mut ports = args.intercept_ports.clone();
        // A registry named with a port in --mirror/--fallback is intercepted there.
        let chains = args.trust.chains();
        ports.extend(chains.ports());
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            return Err(ConfigError::NoPorts);
        }
        if ports.contains(&0) {
            return Err(ConfigError::PortZero);
        }
        let max = eddy_common::PORTS_CAPACITY as usize;
        if ports.len() > max {
            return Err(ConfigError::TooManyPorts {
                max,
                got: ports.len(),
            });
        }
        if !(300..=2500).contains(&args.heartbeat_timeout_ms) {
            return Err(ConfigError::HeartbeatTimeout {
                ms: args.heartbeat_timeout_ms,
            });
        }
        if args.socket_mark == 0 {
            return Err(ConfigError::MarkZero);
        }
        let registries = Registries::parse(&args.trust.registry_values())?;
        let mut p2p = crate::peers::p2p::P2pConfig::from_flags(
            args.p2p.p2p_listen.as_deref(),
            &args.p2p.p2p_bootstrap,
            args.p2p.p2p_psk_file.as_deref(),
            &args.trust.data_dir,
        )?;
        if let Some(p2p) = &mut p2p {
            p2p.data_port = args.p2p.p2p_data_port;
        }
        let single_flight = args.p2p.p2p_single_flight;
        Ok(Config {
            cgroup: cgroup::resolve(&args.cgroup)?,
            registries,
            ca_unconstrained: args.trust.ca_unconstrained,
            upstream_ca: args.upstream_ca.clone(),
            upstream_auth_file: args.upstream_auth_file.clone(),
            listen,
            listen6: SocketAddr::from((Ipv6Addr::LOCALHOST, listen.port())),
            intercept_ports: ports,
            admin: args.admin,
            data_dir: args.trust.data_dir.clone(),
            ca_dir: args.trust.ca_dir(),
            pin_dir: args.bpf_pin_dir.clone(),
            socket_mark: args.socket_mark,
            heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            cache_policy: args.cache.policy(),
            p2p,
            single_flight,
            upstream_idle_timeout: args.upstream_idle_timeout,
            bpf_log: args.bpf_log,
            chains,
            containerd: ContainerdConfig::from_args(
                &args.containerd_socket,
                &args.containerd_namespaces,
            )?,
        })
    }

    /// How often the heartbeat is refreshed: several beats per timeout, so one late tick
    /// (a busy node) does not bypass a healthy eddy.
    /// The hooks' part of the configuration.
    pub fn hook(&self) -> crate::hook::bpf::HookConfig {
        crate::hook::bpf::HookConfig {
            listen: self.listen,
            intercept_ports: self.intercept_ports.clone(),
            pin_dir: self.pin_dir.clone(),
            socket_mark: self.socket_mark,
            heartbeat_timeout: self.heartbeat_timeout,
            cgroup_id: self.cgroup.id,
            bpf_log: self.bpf_log,
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_timeout / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["eddy", "run", "--cgroup", "/nonexistent"];
        argv.extend_from_slice(extra);
        match crate::app::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::app::cli::Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    /// clap's error for `eddy run` with `extra` (which must not parse).
    fn clap_error(extra: &[&str]) -> String {
        let argv = [&["eddy", "run"], extra].concat();
        crate::app::cli::Cli::try_parse_from(argv)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_parse() {
        let a = args(&[]);
        assert_eq!(a.listen.to_string(), "127.0.0.1:15443");
        assert_eq!(a.intercept_ports, vec![443]);
        assert_eq!(a.admin.to_string(), "127.0.0.1:15090");
    }

    #[test]
    fn rejects_bad_values_before_touching_the_system() {
        let e = Config::from_args(&args(&["--listen", "[::1]:1"])).unwrap_err();
        assert!(matches!(e, ConfigError::ListenNotV4 { .. }));
        let e = Config::from_args(&args(&["--intercept-port", "0"])).unwrap_err();
        assert!(matches!(e, ConfigError::PortZero));
        let e = Config::from_args(&args(&["--heartbeat-timeout-ms", "5000"])).unwrap_err();
        assert!(matches!(e, ConfigError::HeartbeatTimeout { .. }));
        let e = Config::from_args(&args(&["--socket-mark", "0"])).unwrap_err();
        assert!(matches!(e, ConfigError::MarkZero));
    }

    #[test]
    fn cache_flags_parse_and_default() {
        use crate::store::lifecycle::CacheSize;
        let a = args(&[]);
        assert_eq!(a.cache.cache_max_size, CacheSize::Percent(80));
        assert_eq!(a.cache.cache_ttl, Duration::from_secs(7 * 86_400));
        let a = args(&["--cache-max-size", "500MiB", "--cache-ttl", "12h"]);
        assert_eq!(a.cache.cache_max_size, CacheSize::Bytes(500 << 20));
        assert_eq!(a.cache.cache_ttl, Duration::from_secs(12 * 3600));
        let e = clap_error(&["--cache-ttl", "soon"]);
        assert!(e.contains("not a duration"), "{e}");
        let e = clap_error(&["--cache-max-size", "lots"]);
        assert!(e.contains("not a size"), "{e}");
    }

    #[test]
    fn upstream_idle_timeout_parses_and_defaults() {
        assert_eq!(args(&[]).upstream_idle_timeout, Duration::from_secs(60));
        let a = args(&["--upstream-idle-timeout", "2s"]);
        assert_eq!(a.upstream_idle_timeout, Duration::from_secs(2));
        let e = clap_error(&["--upstream-idle-timeout", "0s"]);
        assert!(e.contains("not a duration"), "{e}");
    }

    #[test]
    fn containerd_flags_default_parse_and_reject_bad_namespaces() {
        let a = args(&[]);
        let c = ContainerdConfig::from_args(&a.containerd_socket, &a.containerd_namespaces)
            .unwrap()
            .unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/containerd/containerd.sock"));
        assert_eq!(c.namespaces, vec!["k8s.io".to_string()]);
        let a = args(&[
            "--containerd-socket",
            "/run/k3s/containerd/containerd.sock",
            "--containerd-namespace",
            "k8s.io",
            "--containerd-namespace",
            "moby,k8s.io",
        ]);
        let c = ContainerdConfig::from_args(&a.containerd_socket, &a.containerd_namespaces)
            .unwrap()
            .unwrap();
        assert_eq!(
            c.socket,
            PathBuf::from("/run/k3s/containerd/containerd.sock")
        );
        assert_eq!(c.namespaces, vec!["k8s.io".to_string(), "moby".to_string()]);
        let a = args(&["--containerd-socket", "none"]);
        assert_eq!(
            ContainerdConfig::from_args(&a.containerd_socket, &a.containerd_namespaces).unwrap(),
            None
        );
        let e = ContainerdConfig::from_args("/x.sock", &["k8s/io".into()]).unwrap_err();
        assert!(e.to_string().contains("\"k8s/io\""), "{e}");
        let e = ContainerdConfig::from_args("/x.sock", &[" ".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::NoContainerdNamespaces), "{e}");
    }

    #[test]
    fn missing_cgroup_is_reported() {
        let e = Config::from_args(&args(&[])).unwrap_err();
        assert!(e.to_string().contains("/nonexistent"), "{e}");
    }

    #[test]
    fn a_bad_chain_flag_is_one_line_from_clap() {
        let e = clap_error(&["--fallback", "anubis"]);
        assert!(
            e.contains("--fallback") && e.contains("expected REGISTRY=ENDPOINT"),
            "{e}"
        );
    }

    #[test]
    fn chained_registries_are_intercepted_on_their_ports() {
        let a = args(&[
            "--fallback",
            "anubis:32000=ghcr.io/acme,docker.io",
            "--mirror",
            "10.0.0.7:5000=http://10.0.0.8:5000",
        ]);
        let r = Registries::parse(&a.trust.registry_values()).unwrap();
        assert!(r.has_host("anubis") && r.has_host("ghcr.io"));
        assert!(r.has_addr("10.0.0.7:5000".parse().unwrap()));
        assert!(!r.has_addr("10.0.0.8:5000".parse().unwrap()));
        assert_eq!(a.trust.chains().ports(), [5000, 32000]);
        // `;` separates values (as in EDDY_MIRROR); `,` separates a value's endpoints.
        let a = args(&["--mirror", "a.test=m1.test,m2.test;b.test=m3.test"]);
        assert_eq!(a.trust.mirrors.len(), 2);
        assert_eq!(a.trust.mirrors[0].endpoints.len(), 2);
        assert_eq!(a.trust.chains().registry_values(), ["a.test", "b.test"]);
    }

    #[test]
    fn default_registries_include_docker_hub() {
        let a = args(&[]);
        let r = Registries::parse(&a.trust.registries).unwrap();
        assert!(r.has_host("registry-1.docker.io") && r.has_host("ghcr.io"));
    }

    #[test]
    fn ports_are_deduplicated() {
        let a = args(&["--intercept-port", "443", "--intercept-port", "443"]);
        assert_eq!(a.intercept_ports, vec![443, 443]);
        // dedup happens in from_args; the cgroup error comes after port validation.
        assert!(matches!(
            Config::from_args(&a).unwrap_err(),
            ConfigError::Cgroup(_)
        ));
    }

    #[test]
    fn p2p_flags_parse_and_a_bad_key_file_stops_the_start() {
        let a = args(&[]);
        assert!(a.p2p.p2p_listen.is_none());
        let a = args(&[
            "--p2p-listen",
            "0.0.0.0:4001",
            "--p2p-bootstrap",
            "10.0.0.1:4001",
            "--p2p-bootstrap",
            "eddy-p2p:4001",
        ]);
        let p2p = crate::peers::p2p::P2pConfig::from_flags(
            a.p2p.p2p_listen.as_deref(),
            &a.p2p.p2p_bootstrap,
            None,
            &a.trust.data_dir,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p2p.listen.to_string(), "/ip4/0.0.0.0/tcp/4001");
        assert_eq!(p2p.bootstrap.len(), 2);
        assert!(p2p.identity_file.ends_with("p2p/identity"));
        let e = Config::from_args(&args(&[
            "--p2p-listen",
            "0.0.0.0:4001",
            "--p2p-psk-file",
            "/nonexistent/swarm.key",
        ]))
        .unwrap_err();
        assert!(matches!(e, ConfigError::P2p(_)), "{e}");
        assert!(e.to_string().contains("/nonexistent/swarm.key"), "{e}");
        let e = Config::from_args(&args(&[
            "--p2p-listen",
            "0.0.0.0:4001",
            "--p2p-bootstrap",
            "no port",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("--p2p-bootstrap"), "{e}");
    }
}
