//! Restarting the node's containerd once, so that it reloads its trust roots.
//!
//! containerd (Go) reads the system roots once per process: a CA added to the host bundle is
//! only seen after a restart. `eddy ca install --restart-containerd` does that restart, and
//! only when the CA was newly added, so a DaemonSet's init step restarts containerd once per
//! node, not on every pod start. eddy runs in a container: it enters the mount namespace of
//! the host's PID 1 (the chart runs it with hostPID) and runs the host's own
//! `systemctl restart UNIT`, where UNIT is the systemd service whose cgroup holds containerd
//! (containerd, k3s or k3s-agent, rke2-server or rke2-agent, microk8s' snap service).
// unsafe: pre_exec (setns into the host's mount namespace before exec) is unsafe. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
};

use crate::node::distro::Containerd;

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error(
        "containerd (pid {pid}, cgroup {cgroup:?}) does not run as a systemd service: restart it by hand"
    )]
    NoUnit { pid: u32, cgroup: String },
    #[error("opening the mount namespace of pid {pid} (needs hostPID and privileges): {source}")]
    Namespace { pid: u32, source: std::io::Error },
    #[error("running `{command}` in the host's namespaces: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The command that restarts `containerd`, run inside the host's namespaces.
pub fn restart_command(containerd: &Containerd) -> Result<Vec<String>, RestartError> {
    let unit = containerd
        .unit
        .as_ref()
        .ok_or_else(|| RestartError::NoUnit {
            pid: containerd.pid,
            cgroup: containerd.cgroup.clone(),
        })?;
    Ok(vec!["systemctl".into(), "restart".into(), unit.clone()])
}

/// Run `argv` in the mount namespace of `host_pid` (1: the host's init), with the host's
/// usual PATH, and wait for it. Returns its stdout.
pub fn run_in_host(host_pid: u32, argv: &[String]) -> Result<String, RestartError> {
    let command = argv.join(" ");
    // Opened here, before fork: the child only calls setns, which is async-signal-safe.
    let ns = File::open(format!("/proc/{host_pid}/ns/mnt")).map_err(|source| {
        RestartError::Namespace {
            pid: host_pid,
            source,
        }
    })?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    // SAFETY: runs in the forked child before exec; setns is async-signal-safe and `fd`
    // stays open in the child (it is not close-on-exec until exec). The child has one
    // thread, which setns(CLONE_NEWNS) requires. The program is then looked up in the
    // host's file system.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = cmd.output().map_err(|source| RestartError::Spawn {
        command: command.clone(),
        source,
    })?;
    drop(ns);
    if !output.status.success() {
        return Err(RestartError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::distro::Distro;

    fn containerd(unit: Option<&str>) -> Containerd {
        Containerd {
            pid: 42,
            distro: Distro::K3s,
            socket: "/run/k3s/containerd/containerd.sock".into(),
            cgroup: "/system.slice/k3s-agent.service".into(),
            unit: unit.map(str::to_string),
        }
    }

    #[test]
    fn restarts_the_unit_that_holds_containerd() {
        assert_eq!(
            restart_command(&containerd(Some("k3s-agent.service"))).unwrap(),
            ["systemctl", "restart", "k3s-agent.service"]
        );
        let err = restart_command(&containerd(None)).unwrap_err();
        assert!(err.to_string().contains("restart it by hand"), "{err}");
    }

    /// The namespace switch and exec really happen: into our own mount namespace (root
    /// needed for setns; as another user the open or setns fails with a clear error).
    #[test]
    fn runs_a_command_in_a_mount_namespace() {
        let me = std::process::id();
        match run_in_host(me, &["sh".into(), "-c".into(), "echo in-ns".into()]) {
            Ok(out) => assert_eq!(out.trim(), "in-ns"),
            Err(e) => assert!(
                !crate::node::sys::has_bpf_privileges(),
                "failed although privileged: {e}"
            ),
        }
        let err = run_in_host(me, &["false".into()]);
        assert!(err.is_err());
        let err = run_in_host(u32::MAX, &["true".into()]).unwrap_err();
        assert!(err.to_string().contains("mount namespace of pid"), "{err}");
    }
}
