//! `eddy status`: what is attached where, the BPF counters and the heartbeat age, read
//! from the pinned maps and the kernel, so it works whether eddy is healthy, hung or dead.
//! The clients that do not trust eddy's CA come from the running agent (`GET /trust` on
//! its admin listener), and so do the P2P peers (`GET /peers`); when it does not answer, the
//! rest is shown anyway.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{hook::bpf::PinnedMaps, hook::cgroup, node::sys, trust::TrustReport};

/// How long `eddy status` waits for the agent's admin listener.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a `/trust` answer read.
const MAX_TRUST_REPORT: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no eddy maps are pinned at {dir}: eddy is not running (or uses another --bpf-pin-dir)"
    )]
    NotPinned { dir: PathBuf },
    #[error(transparent)]
    Bpf(#[from] crate::hook::bpf::BpfError),
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub running: bool,
    pub pid: u32,
    pub cgroup: CgroupStatus,
    pub attached: Vec<Attached>,
    pub listen: String,
    pub intercept_ports: Vec<u16>,
    /// Milliseconds since the last heartbeat; null if eddy cleared it (shutting down).
    pub heartbeat_age_ms: Option<u64>,
    pub counters: BTreeMap<&'static str, u64>,
    /// Clients that do not trust eddy's CA (from the agent); None when it did not answer.
    pub trust: Option<TrustReport>,
    /// Why `trust` is missing.
    pub trust_error: Option<String>,
    /// The node's containerd as found now (distro, socket, unit); None if none was found.
    pub containerd: Option<crate::node::distro::Containerd>,
    /// This node's P2P identity and peers (from the agent); None when P2P is off or the
    /// agent did not answer.
    pub p2p: Option<crate::peers::p2p::PeersReport>,
    /// Why `p2p` is missing.
    pub p2p_note: Option<String>,
    /// The containerd content source (from the agent); None when it did not answer.
    pub containerd_source: Option<crate::sources::containerd::ContainerdStatus>,
    /// Why `containerd_source` is missing (the source is off, or the agent did not answer).
    pub containerd_source_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CgroupStatus {
    pub id: u64,
    pub path: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Attached {
    pub attach_type: &'static str,
    pub prog_id: u32,
    pub name: String,
}

pub fn collect(pin_dir: &Path, admin: SocketAddr) -> Result<Status, StatusError> {
    if !pin_dir.join("config").exists() {
        return Err(StatusError::NotPinned {
            dir: pin_dir.to_path_buf(),
        });
    }
    let maps = PinnedMaps::open(pin_dir)?;
    let cgroup_path = cgroup::path_of_id(maps.config.attached_cgroup_id);
    let attached = cgroup_path
        .as_deref()
        .map(attached_programs)
        .unwrap_or_default();
    let now = sys::monotonic_ns();
    let (trust, trust_error) = match fetch_trust(admin) {
        Ok(report) => (Some(report), None),
        Err(e) => (
            None,
            Some(format!(
                "the agent at {admin} did not answer GET /trust: {e}"
            )),
        ),
    };
    let (p2p, p2p_note) = match fetch_peers(admin) {
        Ok(report) => (Some(report), None),
        Err(note) => (None, Some(note)),
    };
    let (containerd_source, containerd_source_error) = match fetch_containerd_source(admin) {
        Ok(source) => (Some(source), None),
        Err(e) => (None, Some(e)),
    };
    Ok(Status {
        pin_dir: pin_dir.to_path_buf(),
        running: sys::process_alive(maps.config.agent_pid),
        pid: maps.config.agent_pid,
        cgroup: CgroupStatus {
            id: maps.config.attached_cgroup_id,
            path: cgroup_path,
        },
        attached,
        listen: maps.listen().to_string(),
        intercept_ports: maps.ports.clone(),
        heartbeat_age_ms: (maps.heartbeat_ns != 0)
            .then(|| now.saturating_sub(maps.heartbeat_ns) / 1_000_000),
        counters: maps.counters.iter().map(|(c, v)| (c.name(), *v)).collect(),
        trust,
        trust_error,
        containerd: crate::node::distro::detect(Path::new("/proc")).ok(),
        p2p,
        p2p_note,
        containerd_source,
        containerd_source_error,
    })
}

/// `GET /peers` from the agent's admin listener. A 404 means P2P is off.
fn fetch_peers(admin: SocketAddr) -> Result<crate::peers::p2p::PeersReport, String> {
    match http_get(admin, "/peers") {
        Ok(body) => serde_json::from_slice(&body).map_err(|e| format!("unreadable answer: {e}")),
        Err(e) if e.to_string().contains(" 404 ") => Err("off (no --p2p-listen)".into()),
        Err(e) => Err(format!(
            "unknown (the agent at {admin} did not answer GET /peers: {e})"
        )),
    }
}

/// `GET /containerd` from the agent's admin listener.
fn fetch_containerd_source(
    admin: SocketAddr,
) -> Result<crate::sources::containerd::ContainerdStatus, String> {
    let body = http_get(admin, "/containerd").map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("unreadable answer: {e}"))
}

/// `GET /trust` from the agent's admin listener, with the cgroup paths filled in.
fn fetch_trust(admin: SocketAddr) -> Result<TrustReport, String> {
    let body = http_get(admin, "/trust").map_err(|e| e.to_string())?;
    let mut report: TrustReport =
        serde_json::from_slice(&body).map_err(|e| format!("unreadable answer: {e}"))?;
    let mut paths = BTreeMap::new();
    for client in &mut report.untrusting {
        let path = paths
            .entry(client.cgroup_id)
            .or_insert_with(|| cgroup::path_of_id(client.cgroup_id));
        client.cgroup = path.as_ref().map(|p| p.display().to_string());
    }
    Ok(report)
}

/// A minimal, bounded HTTP/1.1 GET (the admin listener is local and speaks HTTP/1.1).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, ADMIN_TIMEOUT)?;
    stream.set_read_timeout(Some(ADMIN_TIMEOUT))?;
    stream.set_write_timeout(Some(ADMIN_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(MAX_TRUST_REPORT).read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!("answered {status_line:?}")));
    }
    Ok(response[split + 4..].to_vec())
}

/// eddy's programs attached to the cgroup, by kernel query (other agents' programs on the
/// same cgroup are left out).
fn attached_programs(cgroup: &Path) -> Vec<Attached> {
    let names: BTreeMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_string()))
        .collect();
    let mut out = Vec::new();
    for attach in sys::AttachType::ALL {
        for id in sys::query_cgroup_programs(cgroup, attach).unwrap_or_default() {
            let name = names.get(&id).cloned().unwrap_or_default();
            if name.starts_with("eddy_") {
                out.push(Attached {
                    attach_type: attach.name(),
                    prog_id: id,
                    name,
                });
            }
        }
    }
    out
}

pub fn render_text(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let state = if s.running {
        "running"
    } else {
        "NOT running (maps left by a previous instance)"
    };
    let _ = writeln!(out, "eddy pid {}: {state}", s.pid);
    let path = s
        .cgroup
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(gone)".into());
    let _ = writeln!(out, "cgroup:    {path} (id {})", s.cgroup.id);
    if s.attached.is_empty() {
        let _ = writeln!(out, "attached:  nothing");
    }
    for a in &s.attached {
        let _ = writeln!(
            out,
            "attached:  {:<9} prog {} ({})",
            a.attach_type, a.prog_id, a.name
        );
    }
    let _ = writeln!(out, "listen:    {}", s.listen);
    let _ = writeln!(out, "ports:     {:?}", s.intercept_ports);
    match s.heartbeat_age_ms {
        Some(ms) => {
            let _ = writeln!(out, "heartbeat: {ms} ms ago");
        }
        None => {
            let _ = writeln!(out, "heartbeat: cleared (redirects off)");
        }
    }
    match &s.containerd {
        Some(c) => {
            let _ = writeln!(
                out,
                "containerd: pid {} ({}), socket {}, unit {}",
                c.pid,
                c.distro,
                c.socket.display(),
                c.unit.as_deref().unwrap_or("none")
            );
        }
        None => {
            let _ = writeln!(out, "containerd: not found in /proc");
        }
    }
    render_containerd_source(&mut out, s);
    let _ = writeln!(out, "pinned:    {}", s.pin_dir.display());
    for (name, v) in &s.counters {
        let _ = writeln!(out, "  {name:<20} {v}");
    }
    render_trust(&mut out, s);
    render_peers(&mut out, s);
    out
}

fn render_peers(out: &mut String, s: &Status) {
    use std::fmt::Write;
    let Some(p2p) = &s.p2p else {
        let note = s.p2p_note.as_deref().unwrap_or("unknown");
        let _ = writeln!(out, "p2p:       {note}");
        return;
    };
    let _ = writeln!(
        out,
        "p2p:       peer id {} on {}; {} peer(s) connected",
        p2p.peer_id,
        p2p.listen.join(", "),
        p2p.peers.len()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    for peer in &p2p.peers {
        let _ = writeln!(
            out,
            "  {} at {} (connected {} s ago)",
            peer.peer_id,
            peer.addresses.join(", "),
            now.saturating_sub(peer.connected_since)
        );
    }
}

fn render_containerd_source(out: &mut String, s: &Status) {
    use std::fmt::Write;
    match (&s.containerd_source, &s.containerd_source_error) {
        (Some(c), _) if c.connected => {
            let _ = writeln!(
                out,
                "containerd source: on, {} digests (socket {}, namespaces {})",
                c.digests,
                c.socket.display(),
                c.namespaces.join(",")
            );
        }
        (Some(c), _) => {
            let _ = writeln!(
                out,
                "containerd source: off, containerd does not answer at {} (eddy retries in the background)",
                c.socket.display()
            );
        }
        (None, why) => {
            let _ = writeln!(
                out,
                "containerd source: unknown ({})",
                why.as_deref().unwrap_or("unknown")
            );
        }
    }
}

fn render_trust(out: &mut String, s: &Status) {
    use std::fmt::Write;
    let Some(trust) = &s.trust else {
        let why = s.trust_error.as_deref().unwrap_or("unknown");
        let _ = writeln!(out, "trust:     unknown ({why})");
        return;
    };
    if !trust.pids_visible {
        let _ = writeln!(
            out,
            "trust:     eddy cannot see host process ids (run it with hostPID): every registry connection passes through uncached"
        );
    }
    if trust.untrusting.is_empty() {
        let _ = writeln!(out, "trust:     every client seen trusts eddy's CA");
        return;
    }
    let _ = writeln!(
        out,
        "trust:     {} client(s) do not trust eddy's CA; their pulls pass through uncached:",
        trust.untrusting.len()
    );
    for c in &trust.untrusting {
        let pid = c
            .pid
            .map_or_else(|| "any pid".to_string(), |p| format!("pid {p}"));
        let cgroup = c
            .cgroup
            .clone()
            .unwrap_or_else(|| format!("cgroup id {}", c.cgroup_id));
        let guard = c
            .guarded_secs
            .map(|secs| format!(", passed through for {secs} s more"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {pid} {} in {cgroup}: {}{guard}",
            c.exe,
            c.reason.label()
        );
    }
    let _ = writeln!(out, "  fix: {}", trust.fix);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{Reason, UntrustingClient, FIX};

    fn status(trust: Option<TrustReport>) -> Status {
        Status {
            pin_dir: "/sys/fs/bpf/eddy".into(),
            running: true,
            pid: 1,
            cgroup: CgroupStatus { id: 1, path: None },
            attached: vec![],
            listen: "127.0.0.1:15443".into(),
            intercept_ports: vec![443],
            heartbeat_age_ms: Some(1),
            counters: BTreeMap::new(),
            trust_error: trust.is_none().then(|| "connection refused".into()),
            trust,
            containerd: None,
            p2p: None,
            p2p_note: Some("off (no --p2p-listen)".into()),
            containerd_source: Some(crate::sources::containerd::ContainerdStatus {
                socket: "/run/containerd/containerd.sock".into(),
                namespaces: vec!["k8s.io".into()],
                connected: true,
                digests: 42,
            }),
            containerd_source_error: None,
        }
    }

    #[test]
    fn shows_the_containerd_source() {
        let mut s = status(None);
        let text = render_text(&s);
        assert!(text.contains("containerd source: on, 42 digests (socket /run/containerd/containerd.sock, namespaces k8s.io)"), "{text}");
        s.containerd_source.as_mut().unwrap().connected = false;
        let text = render_text(&s);
        assert!(text.contains("containerd source: off, containerd does not answer at /run/containerd/containerd.sock"), "{text}");
    }

    #[test]
    fn names_each_untrusting_client_and_the_fix() {
        let report = TrustReport {
            pids_visible: true,
            untrusting: vec![UntrustingClient {
                pid: Some(812),
                exe: "/usr/bin/containerd".into(),
                cgroup_id: 9,
                cgroup: Some("/sys/fs/cgroup/system.slice/containerd.service".into()),
                reason: Reason::StartedBeforeCa,
                guarded_secs: None,
            }],
            fix: FIX.into(),
        };
        let text = render_text(&status(Some(report)));
        assert!(text.contains("pid 812 /usr/bin/containerd in /sys/fs/cgroup/system.slice/containerd.service: started_before_ca"), "{text}");
        assert!(text.contains("restart containerd once (after `eddy ca install`), or set trust.restartContainerd in the chart"), "{text}");
    }

    #[test]
    fn an_unreachable_agent_leaves_the_rest_of_the_status() {
        let text = render_text(&status(None));
        assert!(text.contains("listen:    127.0.0.1:15443"), "{text}");
        assert!(
            text.contains("trust:     unknown (connection refused)"),
            "{text}"
        );
    }

    #[test]
    fn fetching_from_a_closed_port_fails_soft() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(fetch_trust(addr).is_err());
    }

    #[test]
    fn lists_p2p_peers() {
        let mut s = status(None);
        let text = render_text(&s);
        assert!(text.contains("p2p:       off (no --p2p-listen)"), "{text}");
        s.p2p = Some(crate::peers::p2p::PeersReport {
            peer_id: "12D3KooWA".into(),
            listen: vec!["/ip4/10.0.0.1/tcp/4001".into()],
            peers: vec![crate::peers::p2p::PeerInfo {
                peer_id: "12D3KooWB".into(),
                addresses: vec!["/ip4/10.0.0.2/tcp/4001".into()],
                connected_since: 0,
            }],
        });
        let text = render_text(&s);
        assert!(
            text.contains(
                "p2p:       peer id 12D3KooWA on /ip4/10.0.0.1/tcp/4001; 1 peer(s) connected"
            ),
            "{text}"
        );
        assert!(
            text.contains("  12D3KooWB at /ip4/10.0.0.2/tcp/4001 (connected"),
            "{text}"
        );
    }
}
