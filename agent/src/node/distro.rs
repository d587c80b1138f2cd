//! Which containerd runs this node, and how the distribution runs it.
//!
//! Kubernetes distributions run containerd differently: kubeadm-style nodes as
//! `containerd.service`, k3s and rke2 as a child of their own agent (`k3s.service`,
//! `k3s-agent.service`, `rke2-server.service`, `rke2-agent.service`) with the socket under
//! /run/k3s, microk8s from its snap (`snap.microk8s.daemon-containerd.service`), and Talos
//! runs two: its own system containerd under /system/run and the CRI one the kubelet uses.
//! Everything here is read from /proc (the chart runs eddy with hostPID), so it needs no
//! configuration: the process's command line gives its socket, its cgroup gives the systemd
//! unit that restarts it.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum DistroError {
    #[error("no containerd process found in {proc}")]
    NoContainerd { proc: PathBuf },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no containerd socket at the known paths ({tried}); give it with --containerd-socket PATH"
    )]
    NoSocket { tried: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distro {
    /// containerd as its own service: kubeadm, most managed and hand-built nodes.
    Vanilla,
    K3s,
    Rke2,
    Microk8s,
    Talos,
}

impl fmt::Display for Distro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distro::Vanilla => "vanilla",
            Distro::K3s => "k3s",
            Distro::Rke2 => "rke2",
            Distro::Microk8s => "microk8s",
            Distro::Talos => "talos",
        })
    }
}

/// The containerd that serves the kubelet on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Containerd {
    pub pid: u32,
    pub distro: Distro,
    /// Its gRPC socket (`--address`/`-a`, else containerd's default).
    pub socket: PathBuf,
    /// Its cgroup v2 path, relative to the cgroup2 mount (`/system.slice/containerd.service`).
    pub cgroup: String,
    /// The systemd unit whose cgroup holds it: what restarts it.
    pub unit: Option<String>,
}

/// containerd's own default socket.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// Sockets of the known distributions, most common first (`--containerd-socket auto` without
/// a visible process, e.g. without hostPID).
pub const KNOWN_SOCKETS: &[&str] = &[
    DEFAULT_SOCKET,
    "/run/k3s/containerd/containerd.sock",
    "/var/snap/microk8s/common/run/containerd.sock",
];
/// Talos' system containerd: not the one that pulls the cluster's images.
const TALOS_SYSTEM_SOCKET_DIR: &str = "/system/run/containerd";

/// Find the node's containerd in `proc` (normally /proc).
pub fn detect(proc: &Path) -> Result<Containerd, DistroError> {
    detect_where(proc, |_| true)
}

/// The oldest containerd process for which `wanted` holds (e.g. the one in a given cgroup).
pub fn detect_where(
    proc: &Path,
    wanted: impl Fn(&Containerd) -> bool,
) -> Result<Containerd, DistroError> {
    let entries = fs::read_dir(proc).map_err(|source| DistroError::Io {
        path: proc.to_path_buf(),
        source,
    })?;
    let mut found: Vec<Containerd> = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let dir = entry.path();
        // A process may exit while we scan: skip what cannot be read.
        let Ok(comm) = fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != "containerd" {
            continue;
        }
        let Ok(cmdline) = fs::read(dir.join("cmdline")) else {
            continue;
        };
        let cgroup = fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let args = split_cmdline(&cmdline);
        // The config file's paths are the host's; read them through the process's own root.
        let config_socket = flag_value(&args, &["-c", "--config"])
            .and_then(|c| fs::read_to_string(dir.join("root").join(c.trim_start_matches('/'))).ok())
            .and_then(|text| grpc_address(&text));
        if let Some(c) = classify(pid, &args, config_socket, &cgroup) {
            if wanted(&c) {
                found.push(c);
            }
        }
    }
    choose(found).ok_or(DistroError::NoContainerd {
        proc: proc.to_path_buf(),
    })
}

/// The first existing socket among the known paths (under `root`, normally /).
pub fn find_socket(root: &Path) -> Result<PathBuf, DistroError> {
    KNOWN_SOCKETS
        .iter()
        .map(PathBuf::from)
        .find(|s| root.join(s.strip_prefix("/").unwrap_or(s)).exists())
        .ok_or_else(|| DistroError::NoSocket {
            tried: KNOWN_SOCKETS.join(", "),
        })
}

/// The oldest containerd (lowest pid): the node's, not one a test or a nested runtime
/// started later.
fn choose(mut found: Vec<Containerd>) -> Option<Containerd> {
    found.sort_by_key(|c| c.pid);
    found.into_iter().next()
}

fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// What a containerd process is, from its arguments and /proc/PID/cgroup. None for Talos'
/// system containerd.
fn classify(
    pid: u32,
    args: &[String],
    config_socket: Option<PathBuf>,
    cgroup_file: &str,
) -> Option<Containerd> {
    // The flag wins over the config file, as in containerd.
    let socket = flag_value(args, &["-a", "--address"])
        .map(PathBuf::from)
        .or(config_socket)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if socket.starts_with(TALOS_SYSTEM_SOCKET_DIR) {
        return None;
    }
    let cgroup = cgroup_file
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_string();
    let unit = unit_of(&cgroup);
    let text = format!("{} {cgroup}", args.join(" "));
    let distro = if text.contains("/rancher/rke2") || text.contains("rke2-") {
        Distro::Rke2
    } else if text.contains("/rancher/k3s") || text.contains("k3s") {
        Distro::K3s
    } else if text.contains("microk8s") {
        Distro::Microk8s
    } else if cgroup.starts_with("/podruntime") || text.contains("/etc/cri/") {
        Distro::Talos
    } else {
        Distro::Vanilla
    };
    Some(Containerd {
        pid,
        distro,
        socket,
        cgroup,
        unit,
    })
}

/// `address` in the `[grpc]` table of a containerd config.toml (a line-based reading: the
/// table and key are always written this way).
fn grpc_address(config: &str) -> Option<PathBuf> {
    let mut in_grpc = false;
    for line in config.lines().map(str::trim) {
        if line.starts_with('[') {
            in_grpc = line == "[grpc]";
        } else if in_grpc {
            if let Some(value) = line.strip_prefix("address") {
                let value = value
                    .trim_start()
                    .strip_prefix('=')?
                    .trim()
                    .trim_matches('"');
                return (!value.is_empty()).then(|| PathBuf::from(value));
            }
        }
    }
    None
}

/// `-a PATH`, `--address PATH` or `--address=PATH`.
fn flag_value(args: &[String], names: &[&str]) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        for name in names {
            if arg == name {
                return it.next().cloned();
            }
            if let Some(v) = arg.strip_prefix(&format!("{name}=")) {
                return Some(v.to_string());
            }
        }
    }
    None
}

/// The innermost systemd service in a cgroup path: `/system.slice/k3s.service` → k3s.service.
/// k3s and rke2 run containerd inside their own unit's cgroup, so restarting that unit is
/// what restarts their containerd.
fn unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .split('/')
        .rev()
        .find(|c| c.ends_with(".service"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn kubeadm_containerd() {
        let c = classify(
            812,
            &args("/usr/bin/containerd"),
            None,
            "0::/system.slice/containerd.service\n",
        )
        .unwrap();
        assert_eq!(c.distro, Distro::Vanilla);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.unit.as_deref(), Some("containerd.service"));
    }

    #[test]
    fn k3s_server_and_agent() {
        let line = "containerd -c /var/lib/rancher/k3s/agent/etc/containerd/config.toml \
                    -a /run/k3s/containerd/containerd.sock --state /run/k3s/containerd \
                    --root /var/lib/rancher/k3s/agent/containerd";
        let c = classify(1, &args(line), None, "0::/system.slice/k3s.service\n").unwrap();
        assert_eq!(c.distro, Distro::K3s);
        assert_eq!(
            c.socket,
            PathBuf::from("/run/k3s/containerd/containerd.sock")
        );
        assert_eq!(c.unit.as_deref(), Some("k3s.service"));
        let agent = classify(1, &args(line), None, "0::/system.slice/k3s-agent.service\n").unwrap();
        assert_eq!(agent.unit.as_deref(), Some("k3s-agent.service"));
    }

    #[test]
    fn rke2_uses_the_k3s_socket_but_is_rke2() {
        let line = "/var/lib/rancher/rke2/data/v1.30.1-rke2r1-abc/bin/containerd \
                    -c /var/lib/rancher/rke2/agent/etc/containerd/config.toml \
                    -a /run/k3s/containerd/containerd.sock";
        let c = classify(
            1,
            &args(line),
            None,
            "0::/system.slice/rke2-agent.service\n",
        )
        .unwrap();
        assert_eq!(c.distro, Distro::Rke2);
        assert_eq!(c.unit.as_deref(), Some("rke2-agent.service"));
    }

    #[test]
    fn microk8s_snap() {
        let line = "/snap/microk8s/7229/bin/containerd --config \
                    /var/snap/microk8s/7229/args/containerd.toml --root \
                    /var/snap/microk8s/common/var/lib/containerd --state \
                    /var/snap/microk8s/common/run/containerd --address \
                    /var/snap/microk8s/common/run/containerd.sock";
        let c = classify(
            1,
            &args(line),
            None,
            "0::/system.slice/snap.microk8s.daemon-containerd.service\n",
        )
        .unwrap();
        assert_eq!(c.distro, Distro::Microk8s);
        assert_eq!(
            c.socket,
            PathBuf::from("/var/snap/microk8s/common/run/containerd.sock")
        );
        assert_eq!(
            c.unit.as_deref(),
            Some("snap.microk8s.daemon-containerd.service")
        );
    }

    #[test]
    fn talos_system_containerd_is_skipped_and_cri_one_found() {
        assert_eq!(
            classify(
                5,
                &args("/bin/containerd --address /system/run/containerd/containerd.sock"),
                None,
                "0::/system/runtime\n"
            ),
            None
        );
        let cri = classify(
            9,
            &args("/bin/containerd --address /run/containerd/containerd.sock --config /etc/cri/containerd.toml"),
            None,
            "0::/podruntime/runtime\n",
        )
        .unwrap();
        assert_eq!(cri.distro, Distro::Talos);
        assert_eq!(cri.unit, None);
    }

    #[test]
    fn address_with_equals_sign() {
        let c = classify(1, &args("containerd --address=/tmp/x.sock"), None, "").unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.unit, None);
    }

    #[test]
    fn socket_from_the_config_file_unless_given_as_a_flag() {
        let config = "version = 2\nroot = \"/r\"\n[grpc]\n  address = \"/run/c/c.sock\"\n[ttrpc]\n  address = \"/run/c/t.sock\"\n";
        assert_eq!(grpc_address(config), Some(PathBuf::from("/run/c/c.sock")));
        assert_eq!(grpc_address("[ttrpc]\naddress = \"/x\"\n"), None);
        let c = classify(
            1,
            &args("containerd --config /etc/c.toml"),
            grpc_address(config),
            "",
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/c/c.sock"));
        let c = classify(
            1,
            &args("containerd -a /flag.sock"),
            grpc_address(config),
            "",
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/flag.sock"));
    }

    #[test]
    fn oldest_containerd_wins() {
        let mk = |pid| classify(pid, &args("containerd"), None, "0::/x.service\n").unwrap();
        assert_eq!(choose(vec![mk(900), mk(12), mk(400)]).unwrap().pid, 12);
        assert_eq!(choose(vec![]), None);
    }

    /// A fake /proc: the scan reads comm, cmdline and cgroup, and ignores other processes.
    #[test]
    fn detects_from_a_proc_tree() {
        let proc = tempfile::tempdir().unwrap();
        let add = |pid: u32, comm: &str, cmdline: &str, cgroup: &str| {
            let dir = proc.path().join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(dir.join("cmdline"), cmdline.replace(' ', "\0") + "\0").unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
        };
        add(1, "systemd", "/sbin/init", "0::/init.scope\n");
        add(
            40,
            "containerd-shim",
            "containerd-shim-runc-v2 -namespace k8s.io",
            "0::/kubepods\n",
        );
        add(
            30,
            "containerd",
            "containerd -a /run/k3s/containerd/containerd.sock -c /var/lib/rancher/k3s/x.toml",
            "0::/system.slice/k3s.service\n",
        );
        fs::create_dir_all(proc.path().join("self")).unwrap();
        let c = detect(proc.path()).unwrap();
        assert_eq!((c.pid, c.distro), (30, Distro::K3s));

        let empty = tempfile::tempdir().unwrap();
        let err = detect(empty.path()).unwrap_err();
        assert!(err.to_string().contains("no containerd process"), "{err}");
    }

    #[test]
    fn finds_a_known_socket_under_a_root() {
        let root = tempfile::tempdir().unwrap();
        let err = find_socket(root.path()).unwrap_err();
        assert!(err.to_string().contains("--containerd-socket"), "{err}");
        let k3s = root.path().join("run/k3s/containerd");
        fs::create_dir_all(&k3s).unwrap();
        fs::write(k3s.join("containerd.sock"), "").unwrap();
        assert_eq!(
            find_socket(root.path()).unwrap(),
            PathBuf::from("/run/k3s/containerd/containerd.sock")
        );
    }
}
