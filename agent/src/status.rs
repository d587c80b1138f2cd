//! `eddy status`: what is attached where, the BPF counters and the heartbeat age, read
//! from the pinned maps and the kernel, so it works whether eddy is healthy, hung or dead.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{bpf::PinnedMaps, cgroup, sys};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no eddy maps are pinned at {dir}: eddy is not running (or uses another --bpf-pin-dir)"
    )]
    NotPinned { dir: PathBuf },
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
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
    /// The node's containerd as found now (distro, socket, unit); None if none was found.
    pub containerd: Option<crate::distro::Containerd>,
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

pub fn collect(pin_dir: &Path) -> Result<Status, StatusError> {
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
        containerd: crate::distro::detect(Path::new("/proc")).ok(),
    })
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
    let _ = writeln!(out, "pinned:    {}", s.pin_dir.display());
    for (name, v) in &s.counters {
        let _ = writeln!(out, "  {name:<20} {v}");
    }
    out
}
