//! P2P configuration: the listen address, the bootstrap addresses (re-resolved host names),
//! the swarm key (libp2p pnet) and the node's identity in the data dir.
use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use libp2p::{
    identity::{self, ed25519},
    multiaddr::Protocol,
    Multiaddr, PeerId,
};

use crate::node::durable;

/// How often bootstrap host names are re-resolved (and unconnected addresses re-dialled).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// How often what the node serves is compared with what it advertises.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum P2pConfigError {
    #[error("--p2p-listen {value:?}: not IP:PORT or a TCP multiaddr (/ip4/0.0.0.0/tcp/4001)")]
    BadListen { value: String },
    #[error("--p2p-bootstrap {value:?}: not IP:PORT, HOST:PORT or a TCP multiaddr (optionally ending in /p2p/ID)")]
    BadBootstrap { value: String },
    #[error("--p2p-psk-file {path}: {what}")]
    Psk { path: PathBuf, what: String },
}

/// What `P2p::start` needs.
#[derive(Clone)]
pub struct P2pConfig {
    pub listen: Multiaddr,
    pub bootstrap: Vec<Bootstrap>,
    /// The pre-shared key of a private swarm (`--p2p-psk-file`).
    pub psk: Option<[u8; 32]>,
    /// Where the node's ed25519 key lives (`<data dir>/p2p/identity`), created on first start.
    pub identity_file: PathBuf,
    pub resolve_interval: Duration,
    pub reconcile_interval: Duration,
    /// `--p2p-data-port`: None for the P2P port + 1 (any free port when that is 0).
    pub data_port: Option<u16>,
}

impl std::fmt::Debug for P2pConfig {
    // The key stays out of logs: only whether there is one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pConfig")
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("psk", &self.psk.is_some())
            .field("identity_file", &self.identity_file)
            .field("data_port", &self.data_port)
            .finish()
    }
}

impl P2pConfig {
    /// A config with the default intervals, no bootstrap and no key.
    pub fn new(listen: Multiaddr, data_dir: &Path) -> P2pConfig {
        P2pConfig {
            listen,
            bootstrap: Vec::new(),
            psk: None,
            identity_file: data_dir.join("p2p").join("identity"),
            resolve_interval: RESOLVE_INTERVAL,
            reconcile_interval: RECONCILE_INTERVAL,
            data_port: None,
        }
    }

    /// The swarm's listen address as a socket address.
    pub fn listen_socket(&self) -> SocketAddr {
        let mut ip = IpAddr::from([0, 0, 0, 0]);
        let mut port = 0u16;
        for p in self.listen.iter() {
            match p {
                Protocol::Ip4(v4) => ip = IpAddr::V4(v4),
                Protocol::Ip6(v6) => ip = IpAddr::V6(v6),
                Protocol::Tcp(p) => port = p,
                _ => {}
            }
        }
        SocketAddr::new(ip, port)
    }

    /// Where the data port listens: the P2P listen address's IP, port `data_port`.
    pub fn data_listen(&self) -> SocketAddr {
        let listen = self.listen_socket();
        let port = listen.port();
        let data_port = self
            .data_port
            .unwrap_or(if port == 0 { 0 } else { port.wrapping_add(1) });
        SocketAddr::new(listen.ip(), data_port)
    }

    /// From the `run` flags: None when `--p2p-listen` is absent (P2P off). Reads the PSK
    /// file, so a bad one stops the start with one line naming it.
    pub fn from_flags(
        listen: Option<&str>,
        bootstrap: &[String],
        psk_file: Option<&Path>,
        data_dir: &Path,
    ) -> Result<Option<P2pConfig>, P2pConfigError> {
        let Some(listen) = listen else {
            return Ok(None);
        };
        let mut config = P2pConfig::new(parse_listen(listen)?, data_dir);
        config.bootstrap = bootstrap
            .iter()
            .map(|b| b.trim())
            .filter(|b| !b.is_empty())
            .map(Bootstrap::parse)
            .collect::<Result<_, _>>()?;
        if let Some(path) = psk_file {
            config.psk = Some(read_swarm_key(path)?);
        }
        Ok(Some(config))
    }
}

/// `IP:PORT` or a TCP multiaddr.
pub fn parse_listen(value: &str) -> Result<Multiaddr, P2pConfigError> {
    let bad = || P2pConfigError::BadListen {
        value: value.to_string(),
    };
    if let Ok(sa) = value.parse::<SocketAddr>() {
        return Ok(socket_multiaddr(sa));
    }
    let addr = Multiaddr::from_str(value).map_err(|_| bad())?;
    let mut it = addr.iter();
    match (it.next(), it.next(), it.next()) {
        (Some(Protocol::Ip4(_) | Protocol::Ip6(_)), Some(Protocol::Tcp(_)), None) => Ok(addr),
        _ => Err(bad()),
    }
}

pub fn socket_multiaddr(sa: SocketAddr) -> Multiaddr {
    let ip = match sa.ip() {
        IpAddr::V4(v4) => Protocol::Ip4(v4),
        IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(sa.port()))
}

/// One `--p2p-bootstrap` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub target: Target,
    /// The peer's id, when the address names it (`/p2p/ID`).
    pub peer: Option<PeerId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A fixed address: `/ip4|ip6/…/tcp/PORT`.
    Addr(Multiaddr),
    /// A host name, re-resolved every [`RESOLVE_INTERVAL`] (a headless Service lists every
    /// pod behind one name).
    Host { host: String, port: u16 },
}

impl Bootstrap {
    pub fn parse(value: &str) -> Result<Bootstrap, P2pConfigError> {
        let bad = || P2pConfigError::BadBootstrap {
            value: value.to_string(),
        };
        if let Ok(sa) = value.parse::<SocketAddr>() {
            return Ok(Bootstrap {
                target: Target::Addr(socket_multiaddr(sa)),
                peer: None,
            });
        }
        if value.starts_with('/') {
            let addr = Multiaddr::from_str(value).map_err(|_| bad())?;
            let parts: Vec<Protocol> = addr.iter().collect();
            let (peer, rest) = match parts.split_last() {
                Some((Protocol::P2p(id), rest)) => (Some(*id), rest),
                _ => (None, parts.as_slice()),
            };
            let target = match rest {
                [ip @ (Protocol::Ip4(_) | Protocol::Ip6(_)), Protocol::Tcp(port)] => Target::Addr(
                    Multiaddr::empty()
                        .with(ip.clone())
                        .with(Protocol::Tcp(*port)),
                ),
                [Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h), Protocol::Tcp(port)]
                    if crate::oci::host::is_host_name(h) =>
                {
                    Target::Host {
                        host: h.to_string(),
                        port: *port,
                    }
                }
                _ => return Err(bad()),
            };
            return Ok(Bootstrap { target, peer });
        }
        let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 || !crate::oci::host::is_host_name(host) {
            return Err(bad());
        }
        Ok(Bootstrap {
            target: Target::Host {
                host: host.to_ascii_lowercase(),
                port,
            },
            peer: None,
        })
    }

    /// The addresses to dial now (a host name resolved once; a failure is logged, not fatal:
    /// no reachable peer is a normal state).
    pub async fn resolve(&self) -> Vec<Multiaddr> {
        let with_peer = |a: Multiaddr| match self.peer {
            Some(id) => a.with(Protocol::P2p(id)),
            None => a,
        };
        match &self.target {
            Target::Addr(a) => vec![with_peer(a.clone())],
            Target::Host { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => {
                        let mut out: Vec<Multiaddr> =
                            addrs.map(|sa| with_peer(socket_multiaddr(sa))).collect();
                        out.sort();
                        out.dedup();
                        out
                    }
                    Err(e) => {
                        tracing::debug!(%host, error = %e, "p2p bootstrap host does not resolve (yet)");
                        Vec::new()
                    }
                }
            }
        }
    }
}

/// The most of a swarm.key file read (the real one is about 100 bytes).
const MAX_SWARM_KEY: u64 = 4096;

pub fn read_swarm_key(path: &Path) -> Result<[u8; 32], P2pConfigError> {
    let err = |what: String| P2pConfigError::Psk {
        path: path.to_path_buf(),
        what,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_SWARM_KEY {
        return Err(err(format!(
            "{} bytes: too large for a swarm.key file",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    parse_swarm_key(&bytes).map_err(|e| err(e.to_string()))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwarmKeyError {
    #[error("not UTF-8 text")]
    NotText,
    #[error("first line must be /key/swarm/psk/1.0.0/, found {0:?}")]
    BadHeader(String),
    #[error("second line must be /base16/, found {0:?}")]
    BadEncoding(String),
    #[error("the key must be 64 hex digits, found {0} characters")]
    BadLength(usize),
    #[error("the key is not hexadecimal")]
    BadHex,
    #[error("unexpected text after the key")]
    TrailingText,
}

/// The swarm.key format of go-libp2p/IPFS private networks:
/// `/key/swarm/psk/1.0.0/\n/base16/\n<64 hex digits>\n`.
pub fn parse_swarm_key(bytes: &[u8]) -> Result<[u8; 32], SwarmKeyError> {
    let text = std::str::from_utf8(bytes).map_err(|_| SwarmKeyError::NotText)?;
    let mut lines = text.lines().map(str::trim);
    let short = |s: &str| s.chars().take(40).collect::<String>();
    match lines.next() {
        Some("/key/swarm/psk/1.0.0/") => {}
        other => return Err(SwarmKeyError::BadHeader(short(other.unwrap_or_default()))),
    }
    match lines.next() {
        Some("/base16/") => {}
        other => return Err(SwarmKeyError::BadEncoding(short(other.unwrap_or_default()))),
    }
    let key = lines.next().unwrap_or_default();
    if key.len() != 64 {
        return Err(SwarmKeyError::BadLength(key.chars().count()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(key, &mut out).map_err(|_| SwarmKeyError::BadHex)?;
    if lines.any(|l| !l.is_empty()) {
        return Err(SwarmKeyError::TrailingText);
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
#[error("p2p identity {path}: {what}")]
pub struct IdentityError {
    pub path: PathBuf,
    pub what: String,
}

/// The node's ed25519 key: read from `path`, or generated and written there (mode 0600)
/// on first start, so the PeerId survives restarts.
pub fn load_or_create_identity(path: &Path) -> Result<identity::Keypair, IdentityError> {
    let err = |what: String| IdentityError {
        path: path.to_path_buf(),
        what,
    };
    match std::fs::read(path) {
        Ok(mut bytes) => {
            let secret = ed25519::SecretKey::try_from_bytes(&mut bytes).map_err(|e| {
                err(format!(
                    "not a 32-byte ed25519 key ({e}); remove it to get a new identity"
                ))
            })?;
            Ok(ed25519::Keypair::from(secret).into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
            let keypair = ed25519::Keypair::generate();
            // Written under a temporary name and renamed, so a crash never leaves half a key.
            let key_file = durable::Options::new().mode(0o600);
            durable::write_atomic(path, keypair.secret().as_ref(), &key_file)
                .map_err(|e| err(e.to_string()))?;
            Ok(keypair.into())
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "/key/swarm/psk/1.0.0/\n/base16/\n0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n";

    #[test]
    fn swarm_key_parses() {
        let k = parse_swarm_key(KEY.as_bytes()).unwrap();
        assert_eq!(k[0], 0x01);
        assert_eq!(k[31], 0xef);
        // CRLF and no final newline are fine too.
        let crlf = KEY.replace('\n', "\r\n");
        assert_eq!(parse_swarm_key(crlf.trim_end().as_bytes()).unwrap(), k);
    }

    #[test]
    fn swarm_key_errors_say_what_is_wrong() {
        let e = parse_swarm_key(b"/key/swarm/psk/2.0.0/\n/base16/\n00").unwrap_err();
        assert!(matches!(e, SwarmKeyError::BadHeader(_)), "{e}");
        let e = parse_swarm_key(b"/key/swarm/psk/1.0.0/\n/base64/\nAA==").unwrap_err();
        assert!(matches!(e, SwarmKeyError::BadEncoding(_)), "{e}");
        let e = parse_swarm_key(b"/key/swarm/psk/1.0.0/\n/base16/\n0123").unwrap_err();
        assert_eq!(e, SwarmKeyError::BadLength(4));
        let bad_hex = KEY.replace("0123456789abcdef\n", "0123456789abcdeg\n");
        let e = parse_swarm_key(bad_hex.as_bytes()).unwrap_err();
        assert_eq!(e, SwarmKeyError::BadHex);
        let e = parse_swarm_key(format!("{KEY}more\n").as_bytes()).unwrap_err();
        assert_eq!(e, SwarmKeyError::TrailingText);
        let e = parse_swarm_key(&[0xff, 0xfe]).unwrap_err();
        assert_eq!(e, SwarmKeyError::NotText);
        let e = parse_swarm_key(b"").unwrap_err();
        assert!(matches!(e, SwarmKeyError::BadHeader(_)), "{e}");
    }

    #[test]
    fn a_bad_key_file_is_one_line_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nxyz\n").unwrap();
        let e = read_swarm_key(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("64 hex digits"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let missing = dir.path().join("nope");
        let e = read_swarm_key(&missing).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn listen_takes_ip_port_or_a_multiaddr() {
        assert_eq!(
            parse_listen("0.0.0.0:4001").unwrap().to_string(),
            "/ip4/0.0.0.0/tcp/4001"
        );
        assert_eq!(
            parse_listen("[::]:4001").unwrap().to_string(),
            "/ip6/::/tcp/4001"
        );
        assert_eq!(
            parse_listen("/ip4/10.0.0.1/tcp/9").unwrap().to_string(),
            "/ip4/10.0.0.1/tcp/9"
        );
        for bad in [
            "4001",
            "host:4001",
            "/ip4/1.2.3.4/udp/9",
            "/dns4/x/tcp/1",
            "",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bootstrap_addresses_parse() {
        let id = PeerId::random();
        let b = Bootstrap::parse("10.0.0.2:4001").unwrap();
        assert_eq!(
            b.target,
            Target::Addr("/ip4/10.0.0.2/tcp/4001".parse().unwrap())
        );
        assert_eq!(b.peer, None);
        let b = Bootstrap::parse("eddy-p2p.kube-system.svc:4001").unwrap();
        assert_eq!(
            b.target,
            Target::Host {
                host: "eddy-p2p.kube-system.svc".into(),
                port: 4001
            }
        );
        let b = Bootstrap::parse("/ip4/10.0.0.3/tcp/4001").unwrap();
        assert_eq!(
            b.target,
            Target::Addr("/ip4/10.0.0.3/tcp/4001".parse().unwrap())
        );
        assert_eq!(b.peer, None);
        let b = Bootstrap::parse(&format!("/ip6/fd00::1/tcp/4001/p2p/{id}")).unwrap();
        assert_eq!(
            b.target,
            Target::Addr("/ip6/fd00::1/tcp/4001".parse().unwrap())
        );
        assert_eq!(b.peer, Some(id));
        let b = Bootstrap::parse(&format!("/dns4/eddy-p2p/tcp/4001/p2p/{id}")).unwrap();
        assert_eq!(
            b.target,
            Target::Host {
                host: "eddy-p2p".into(),
                port: 4001
            }
        );
        assert_eq!(b.peer, Some(id));
        for bad in [
            "eddy-p2p",
            "eddy-p2p:0",
            "eddy-p2p:http",
            "bad host:1",
            "/ip4/1.2.3.4/udp/1",
            "/ip4/1.2.3.4",
            "/p2p/12D3KooW",
        ] {
            let e = Bootstrap::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--p2p-bootstrap"), "{e}");
        }
    }

    #[tokio::test]
    async fn bootstrap_host_names_resolve() {
        let b = Bootstrap::parse("localhost:4001").unwrap();
        let addrs = b.resolve().await;
        assert!(
            addrs
                .iter()
                .any(|a| a.to_string() == "/ip4/127.0.0.1/tcp/4001"),
            "{addrs:?}"
        );
        let b = Bootstrap::parse("does-not-exist.invalid:4001").unwrap();
        assert!(b.resolve().await.is_empty());
    }

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p2p").join("identity");
        let a = load_or_create_identity(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_identity(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(&path, b"short").unwrap();
        let e = load_or_create_identity(&path).unwrap_err().to_string();
        assert!(e.contains("identity") && e.contains("ed25519"), "{e}");
    }
}
