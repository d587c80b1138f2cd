//! The eBPF side from user space: load, configure, pin, attach, heartbeat, and the
//! original-destination lookup. All `unsafe` for BPF lives here and in `sys`.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf, EbpfLoader,
};
use eddy_common::{map, program, v4_mapped, Config as BpfConfig, ConnKey, Counter, OrigDst};

use crate::{node::sys, trust::ClientProcess};

/// What the hooks are loaded with: the part of `eddy run`'s configuration the kernel side sees.
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// The proxy's IPv4 listener that connects are redirected to.
    pub listen: SocketAddrV4,
    pub intercept_ports: Vec<u16>,
    pub pin_dir: PathBuf,
    /// Marks eddy's own sockets, which the hooks never redirect.
    pub socket_mark: u32,
    /// How stale the heartbeat may be before the hooks stop redirecting (fail-open).
    pub heartbeat_timeout: Duration,
    /// The cgroup v2 id the programs are attached to.
    pub cgroup_id: u64,
    /// `--bpf-log`: log every decision.
    pub bpf_log: bool,
}

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("EDDY_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("eddy run needs root, or CAP_BPF (or CAP_SYS_ADMIN) plus CAP_NET_ADMIN")]
    NotPrivileged,
    #[error("bpffs is not mounted at {dir} and mounting it failed: {source}")]
    MountBpffs {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning map {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("opening cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the network namespace cookie: {0}")]
    NetnsCookie(std::io::Error),
    #[error("the eBPF decision log (--bpf-log): {0}")]
    DecisionLog(#[from] aya_log::Error),
}

/// Loaded, configured and (after `attach`) attached eBPF programs.
pub struct Bpf {
    /// Owns the programs and their links; `None` once detached.
    ebpf: Mutex<Option<Ebpf>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    heartbeat: Mutex<Array<MapData, u64>>,
    counters: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
    /// aya-log's ring buffer, when the decision logs are on (`--bpf-log`), until
    /// [`Bpf::take_decision_log`].
    decision_log: Mutex<Option<crate::hook::decision_log::DecisionLog>>,
}

impl Bpf {
    /// Load the programs and maps, pin the maps under the pin dir, and write the config and
    /// port set. Nothing is attached yet, so a failure here leaves the node untouched.
    /// `ipv6_listener`: whether the proxy listens on [::1]; without it native IPv6
    /// destinations must go direct.
    pub fn load(config: &HookConfig, ipv6_listener: bool) -> Result<Self, BpfError> {
        if !sys::has_bpf_privileges() {
            return Err(BpfError::NotPrivileged);
        }
        prepare_pin_dir(&config.pin_dir)?;
        Self::load_pinned(config, ipv6_listener).inspect_err(|_| {
            // A failed start leaves nothing behind, not even the maps.
            let _ = remove_pins(&config.pin_dir);
        })
    }

    fn load_pinned(config: &HookConfig, ipv6_listener: bool) -> Result<Self, BpfError> {
        // The decision logs' level is a constant of the loaded programs: off, their code is
        // dead and the verifier drops it.
        let log_on = crate::hook::decision_log::wanted(config.bpf_log);
        let mut ebpf = EbpfLoader::new()
            .override_global(
                crate::hook::decision_log::LEVEL_GLOBAL,
                &crate::hook::decision_log::level(log_on),
                true,
            )
            .load(EBPF_OBJECT)?;
        for (name, file) in map::PINNED {
            let m = ebpf
                .map(name)
                .ok_or(BpfError::Missing { kind: "map", name })?;
            let path = config.pin_dir.join(file);
            m.pin(&path).map_err(|source| BpfError::Pin {
                name,
                path: path.clone(),
                source,
            })?;
        }

        // Verify and load now, while every map fd is still open and before anything is
        // attached: a verifier rejection is a startup error that leaves the node untouched.
        for name in [program::CONNECT4, program::CONNECT6] {
            let prog: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        let name = program::SOCK_OPS;
        let prog: &mut SockOps = program_mut(&mut ebpf, name)?;
        prog.load()
            .map_err(|source| BpfError::Program { name, source })?;

        let mut cfg_map: Array<_, BpfConfig> = take_map(&mut ebpf, map::CONFIG)?;
        cfg_map
            .set(0, bpf_config(config, ipv6_listener)?, 0)
            .map_err(|source| BpfError::Map {
                name: map::CONFIG,
                source,
            })?;
        let mut ports: HashMap<_, u16, u32> = take_map(&mut ebpf, map::PORTS)?;
        for port in &config.intercept_ports {
            ports.insert(port, 1, 0).map_err(|source| BpfError::Map {
                name: map::PORTS,
                source,
            })?;
        }

        let decision_log = if log_on {
            Some(crate::hook::decision_log::open(&mut ebpf)?)
        } else {
            None
        };
        let bpf = Bpf {
            decision_log: Mutex::new(decision_log),
            orig_dst: Mutex::new(take_map(&mut ebpf, map::ORIG_DST)?),
            heartbeat: Mutex::new(take_map(&mut ebpf, map::HEARTBEAT)?),
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            ebpf: Mutex::new(Some(ebpf)),
            pin_dir: config.pin_dir.clone(),
        };
        bpf.beat();
        Ok(bpf)
    }

    /// Attach connect4, connect6 and sock_ops to the cgroup. The links are owned by this
    /// process and never pinned: if eddy dies, the kernel detaches them.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let ebpf = self
            .ebpf
            .get_mut()
            .unwrap()
            .as_mut()
            .expect("attach is called once, before detach");
        let cgroup_file = File::open(cgroup).map_err(|source| BpfError::OpenCgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // aya attaches through bpf_link here (kernel >= 5.7). Cgroup links always coexist
        // with other agents' programs (Cilium, ...), and link_create rejects the legacy
        // ALLOW_MULTI flag, so the mode must be the flag-less default.
        let mode = CgroupAttachMode::Single;
        for name in [program::CONNECT4, program::CONNECT6] {
            let prog: &mut CgroupSockAddr = program_mut(ebpf, name)?;
            prog.attach(&cgroup_file, mode)
                .map_err(|source| BpfError::Program { name, source })?;
        }
        let name = program::SOCK_OPS;
        let prog: &mut SockOps = program_mut(ebpf, name)?;
        prog.attach(&cgroup_file, mode)
            .map_err(|source| BpfError::Program { name, source })?;
        Ok(())
    }

    /// The reader of the eBPF decision logs, when they are on (once).
    pub fn take_decision_log(&self) -> Option<crate::hook::decision_log::DecisionLog> {
        self.decision_log.lock().unwrap().take()
    }

    /// Refresh the heartbeat. Redirects stop when it goes stale.
    pub fn beat(&self) {
        let now = sys::monotonic_ns();
        if let Err(e) = self.heartbeat.lock().unwrap().set(0, now, 0) {
            tracing::warn!(error = %e, "heartbeat update failed");
        }
    }

    /// Zero the heartbeat: new connects go direct at once (used when shutting down).
    pub fn stop_redirects(&self) {
        if let Err(e) = self.heartbeat.lock().unwrap().set(0, 0, 0) {
            tracing::warn!(error = %e, "clearing the heartbeat failed");
        }
    }

    /// The original destination of an accepted connection and the process that connected,
    /// removed from the map.
    pub fn take_orig_dst(
        &self,
        client: SocketAddr,
        proxy: SocketAddr,
    ) -> Option<(SocketAddr, ClientProcess)> {
        let key = conn_key(client, proxy);
        let mut map = self.orig_dst.lock().unwrap();
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some((orig_dst_addr(&dst), client_process(&dst)))
    }

    /// Sum of each counter over all CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        read_counters(&self.counters)
    }

    /// Detach the programs (dropping them drops their links). Idempotent.
    pub fn detach(&self) {
        drop(self.ebpf.lock().unwrap().take());
    }

    /// Remove the pinned maps: on a clean exit eddy leaves nothing behind.
    pub fn unpin(&self) {
        if let Err(e) = remove_pins(&self.pin_dir) {
            tracing::warn!(dir = %self.pin_dir.display(), error = %e, "removing pinned maps failed");
        }
    }
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(BpfError::Missing { kind: "map", name })?;
    T::try_from(m).map_err(|source| BpfError::Map { name, source })
}

pub(crate) fn read_counters(counters: &PerCpuArray<MapData, u64>) -> Vec<(Counter, u64)> {
    Counter::ALL
        .iter()
        .map(|&c| {
            let total = counters
                .get(&(c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (c, total)
        })
        .collect()
}

fn bpf_config(config: &HookConfig, ipv6_listener: bool) -> Result<BpfConfig, BpfError> {
    Ok(BpfConfig {
        proxy_ip4: config.listen.ip().octets(),
        proxy_port: config.listen.port(),
        proxy_ip6: Ipv6Addr::LOCALHOST.octets(),
        flags: if ipv6_listener {
            eddy_common::CONFIG_FLAG_IPV6
        } else {
            0
        },
        own_mark: config.socket_mark,
        netns_cookie: sys::netns_cookie().map_err(BpfError::NetnsCookie)?,
        heartbeat_timeout_ns: config.heartbeat_timeout.as_nanos() as u64,
        agent_pid: std::process::id(),
        attached_cgroup_id: config.cgroup_id,
        ..BpfConfig::default()
    })
}

/// The map key for an accepted connection: both ends in IPv6 / v4-mapped form.
pub fn conn_key(client: SocketAddr, proxy: SocketAddr) -> ConnKey {
    ConnKey {
        client_addr: ip16(client.ip()),
        proxy_addr: ip16(proxy.ip()),
        client_port: client.port(),
        proxy_port: proxy.port(),
        _pad: 0,
    }
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The process the connect hook saw calling connect().
pub fn client_process(dst: &OrigDst) -> ClientProcess {
    ClientProcess {
        tgid: dst.tgid,
        cgroup_id: dst.cgroup_id,
    }
}

/// The address to dial upstream: IPv4 if the client dialled IPv4 (also v4-mapped).
pub fn orig_dst_addr(dst: &OrigDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(dst.addr);
    match (dst.family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => SocketAddr::from((v4, dst.port)),
        _ => SocketAddr::from((v6, dst.port)),
    }
}

/// Make sure bpffs is mounted and the pin dir exists and is empty of old pins (a crashed
/// eddy leaves its maps pinned; the new instance replaces them).
fn prepare_pin_dir(dir: &Path) -> Result<(), BpfError> {
    let bpffs_root = Path::new("/sys/fs/bpf");
    let on_bpffs = dir.ancestors().any(|a| a.exists() && sys::is_bpffs(a));
    if !on_bpffs {
        if !dir.starts_with(bpffs_root) {
            return Err(BpfError::PinDir {
                path: dir.to_path_buf(),
                source: std::io::Error::other("not on a bpffs mount"),
            });
        }
        sys::mount_bpffs(bpffs_root).map_err(|source| BpfError::MountBpffs {
            dir: bpffs_root.to_path_buf(),
            source,
        })?;
        tracing::info!(dir = %bpffs_root.display(), "mounted bpffs");
    }
    remove_pins(dir).map_err(|source| BpfError::PinDir {
        path: dir.to_path_buf(),
        source,
    })?;
    std::fs::create_dir_all(dir).map_err(|source| BpfError::PinDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Remove eddy's pinned maps, and the pin dir if nothing else lives there.
fn remove_pins(dir: &Path) -> std::io::Result<()> {
    for (_, file) in map::PINNED {
        match std::fs::remove_file(dir.join(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Err(e)
        }
        _ => Ok(()),
    }
}

/// Pinned maps of a running (or crashed) eddy, for `eddy status`.
pub struct PinnedMaps {
    pub config: BpfConfig,
    pub heartbeat_ns: u64,
    pub ports: Vec<u16>,
    pub counters: Vec<(Counter, u64)>,
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self, BpfError> {
        let open = |name: &'static str| -> Result<Map, BpfError> {
            let file = map::PINNED
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, f)| *f)
                .expect("every map has a pin name");
            let data = MapData::from_pin(dir.join(file))
                .map_err(|source| BpfError::Map { name, source })?;
            Map::from_map_data(data).map_err(|source| BpfError::Map { name, source })
        };
        let config: Array<MapData, BpfConfig> =
            Array::try_from(open(map::CONFIG)?).map_err(|source| BpfError::Map {
                name: map::CONFIG,
                source,
            })?;
        let heartbeat: Array<MapData, u64> =
            Array::try_from(open(map::HEARTBEAT)?).map_err(|source| BpfError::Map {
                name: map::HEARTBEAT,
                source,
            })?;
        let ports: HashMap<MapData, u16, u32> =
            HashMap::try_from(open(map::PORTS)?).map_err(|source| BpfError::Map {
                name: map::PORTS,
                source,
            })?;
        let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(map::COUNTERS)?)
            .map_err(|source| BpfError::Map {
                name: map::COUNTERS,
                source,
            })?;
        let mut port_list: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        port_list.sort_unstable();
        Ok(PinnedMaps {
            config: config.get(&0, 0).map_err(|source| BpfError::Map {
                name: map::CONFIG,
                source,
            })?,
            heartbeat_ns: heartbeat.get(&0, 0).unwrap_or(0),
            ports: port_list,
            counters: read_counters(&counters),
        })
    }

    pub fn listen(&self) -> SocketAddr {
        SocketAddr::from((
            Ipv4Addr::from(self.config.proxy_ip4),
            self.config.proxy_port,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_connections_key_as_v4_mapped() {
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let proxy: SocketAddr = "127.0.0.1:15443".parse().unwrap();
        let k = conn_key(client, proxy);
        assert_eq!(k.client_addr, v4_mapped([127, 0, 0, 1]));
        assert_eq!(k.client_port, 40000);
        assert_eq!(k.proxy_port, 15443);
        // A v4-mapped peer on a dual-stack listener gives the same key.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(conn_key(mapped, proxy), k);
    }

    #[test]
    fn orig_dst_keeps_the_family_the_client_dialled() {
        let v4 = OrigDst {
            addr: v4_mapped([10, 99, 0, 1]),
            port: 443,
            family: 4,
            ..Default::default()
        };
        assert_eq!(orig_dst_addr(&v4).to_string(), "10.99.0.1:443");
        let v6 = OrigDst {
            addr: "fd00::1".parse::<Ipv6Addr>().unwrap().octets(),
            port: 443,
            family: 6,
            ..Default::default()
        };
        assert_eq!(orig_dst_addr(&v6).to_string(), "[fd00::1]:443");
    }

    #[test]
    fn the_record_names_the_connecting_process() {
        let dst = OrigDst {
            tgid: 4242,
            cgroup_id: 77,
            ..Default::default()
        };
        assert_eq!(
            client_process(&dst),
            ClientProcess {
                tgid: 4242,
                cgroup_id: 77
            }
        );
    }
}
