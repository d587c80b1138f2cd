//! eddy as a caching registry proxy: `eddy run --registry HOST --upstream-ca FILE` with a
//! data dir the test owns (so a restarted eddy finds the same store and CA), its CA for
//! clients (`eddy ca export`), and a check that every stored blob hashes to its name.
use std::{
    ffi::OsString,
    fs,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use sha2::{Digest as _, Sha256};

use crate::{
    eddy::{EddyProcess, RunCommand},
    pki::Pki,
    process::run_bounded,
    registry::REGISTRY_HOST,
};

pub const UPSTREAM_BYTES: &str = r#"eddy_bytes_total{source="upstream"}"#;
pub const STORE_BYTES: &str = r#"eddy_bytes_total{source="store"}"#;
pub const STALE_MANIFESTS: &str = "eddy_stale_manifests_served_total";
pub const INFLIGHT_FETCHES: &str = "eddy_inflight_fetches";

/// `eddy_connections_total{route="..."}`: `registry_tls`, `registry_http`, `passthrough`.
pub fn connections_series(route: &str) -> String {
    format!(r#"eddy_connections_total{{route="{route}"}}"#)
}

pub fn requests_series(kind: &str, source: &str) -> String {
    format!(r#"eddy_requests_total{{kind="{kind}",source="{source}"}}"#)
}

#[derive(Clone, Debug, Default)]
pub struct RegistryEddyConfig {
    /// The cgroup whose connects eddy hooks.
    pub cgroup: PathBuf,
    /// `--data-dir`: owned by the test, so it survives a restart.
    pub data_dir: PathBuf,
    /// `--registry`, repeatable.
    pub registries: Vec<String>,
    /// `--upstream-ca`, repeatable.
    pub upstream_cas: Vec<PathBuf>,
    /// Run eddy with this file bind-mounted over /etc/hosts (in a private mount namespace),
    /// so it can resolve a CDN host named in a 307.
    pub hosts: Option<PathBuf>,
    /// Start without printing eddy's command line (a benchmark's output stays its own).
    /// The log's tail is still printed when the guard drops, unless it is stopped with
    /// [`RegistryEddy::stop_quietly`].
    pub quiet_start: bool,
    /// More `eddy run` arguments, appended as they are.
    pub extra_args: Vec<OsString>,
    /// Run eddy inside a network namespace of the test's (a cluster node).
    pub in_netns: Option<InNetns>,
    /// `--intercept-port`, repeatable (none: just [`crate::basics::INTERCEPTED_PORT`]).
    pub intercept_ports: Vec<u16>,
}

impl RegistryEddyConfig {
    /// eddy caching registry.test for `cgroup` on `data_dir`, trusting the test CA of
    /// `pki` upstream and resolving names through `hosts`.
    pub fn caching(cgroup: &Path, data_dir: PathBuf, pki: &Pki, hosts: PathBuf) -> Self {
        Self {
            cgroup: cgroup.to_path_buf(),
            data_dir,
            registries: vec![REGISTRY_HOST.to_string()],
            upstream_cas: vec![pki.ca_cert.clone()],
            hosts: Some(hosts),
            ..Default::default()
        }
    }
}

/// Where an eddy in a network namespace runs, and the `--admin` address the test reaches it
/// at (the node's own address: its loopback is out of the test's reach).
#[derive(Clone, Debug)]
pub struct InNetns {
    /// nsenter's argument, `--net=/run/netns/NAME` (see [`crate::netns::Netns::enter_arg`]).
    pub enter_arg: String,
    pub admin: SocketAddr,
}

/// A running eddy. Killed on drop (printing the tail of its log); its pins are removed.
pub struct RegistryEddy {
    inner: EddyProcess,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub pin_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl RegistryEddy {
    /// Start eddy and wait (bounded) until /readyz answers 200.
    pub fn start(bin: &Path, config: &RegistryEddyConfig) -> Result<Self> {
        // Holds the log.
        let work = tempfile::Builder::new().prefix("eddy-reg-").tempdir()?;
        fs::create_dir_all(&config.data_dir)?;

        let mut wrapper: Vec<OsString> = Vec::new();
        if let Some(netns) = &config.in_netns {
            // nsenter execs: eddy keeps the pid, and /sys (cgroup, bpffs) stays the host's.
            wrapper.extend(["nsenter".into(), OsString::from(&netns.enter_arg)]);
        }
        if let Some(hosts) = &config.hosts {
            // Same pid throughout: unshare and sh exec, so signals reach eddy itself.
            wrapper.extend(
                [
                    "unshare",
                    "--mount",
                    "sh",
                    "-c",
                    r#"mount --bind "$0" /etc/hosts && exec "$@""#,
                ]
                .map(OsString::from),
            );
            wrapper.push(hosts.into());
        }
        let ports = match config.intercept_ports.as_slice() {
            [] => vec![crate::basics::INTERCEPTED_PORT],
            ports => ports.to_vec(),
        };
        let mut run = RunCommand::new(
            wrapper,
            bin,
            config.cgroup.as_os_str(),
            None,
            &ports,
            &config.data_dir,
        )?;
        for registry in &config.registries {
            run.flag("--registry", registry);
        }
        for ca in &config.upstream_cas {
            run.flag("--upstream-ca", ca);
        }
        if let Some(netns) = &config.in_netns {
            run.set_admin(netns.admin);
        }
        run.argv.extend(config.extra_args.iter().cloned());
        let mut inner = run.spawn(work, config.quiet_start)?;
        if let Err(e) = inner.wait_ready(Duration::from_secs(20)) {
            // Where an eddy in a namespace cannot be reached, say what the namespace looks like.
            let Some(netns) = &config.in_netns else {
                return Err(e);
            };
            let show = |args: &[&str]| {
                std::process::Command::new("nsenter")
                    .arg(&netns.enter_arg)
                    .args(args)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            let host_neigh = std::process::Command::new("ip")
                .args(["neigh", "show", &netns.admin.ip().to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            return Err(e.context(format!(
                "in the node's namespace: listening:\n{}\naddresses:\n{}\nthe host's neighbour entry: {host_neigh}",
                show(&["ss", "-ltn"]),
                show(&["ip", "-br", "addr"])
            )));
        }
        Ok(Self {
            listen: inner.listen,
            admin: inner.admin,
            pin_dir: inner.pin_dir.clone(),
            data_dir: config.data_dir.clone(),
            inner,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// SIGKILL and reap: a crash, with no chance to clean up.
    pub fn kill9(&mut self) -> Result<()> {
        self.inner.child.kill_and_wait().map(drop)
    }

    pub fn log_text(&self) -> String {
        self.inner.log_text()
    }

    /// SIGTERM, then wait (bounded) for eddy to drain and exit cleanly.
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        self.inner.child.signal(libc::SIGTERM)?;
        match self.inner.child.wait_timeout(timeout)? {
            Some(status) if status.success() => Ok(()),
            Some(status) => anyhow::bail!("eddy exited with {status} on SIGTERM"),
            None => anyhow::bail!("eddy did not exit within {timeout:?} of SIGTERM"),
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.inner.log_tail(lines)
    }

    pub fn metrics(&self) -> Result<String> {
        self.inner.metrics()
    }

    /// One series; absent reads as 0 (label sets appear on first use).
    pub fn metric(&self, series: &str) -> Result<f64> {
        self.inner.metric(series)
    }

    pub fn upstream_bytes(&self) -> Result<u64> {
        Ok(self.metric(UPSTREAM_BYTES)? as u64)
    }

    /// Poll `series` until it is at least `min` or `timeout` passes; returns the last value.
    pub fn wait_metric_at_least(&self, series: &str, min: f64, timeout: Duration) -> Result<f64> {
        self.inner.wait_metric_at_least(series, min, timeout)
    }

    /// Kill eddy and clean up as dropping it does, without printing its log (for a run that
    /// went well and keeps its own output readable).
    pub fn stop_quietly(self) {
        self.inner.stop_quietly();
    }
}

/// `eddy ca export --data-dir DIR --registry ...`: eddy's CA in PEM (created if missing).
pub fn ca_export(bin: &Path, data_dir: &Path, registries: &[String]) -> Result<String> {
    fs::create_dir_all(data_dir)?;
    let mut cmd = Command::new(bin);
    cmd.args(["ca", "export", "--data-dir"]).arg(data_dir);
    for registry in registries {
        cmd.args(["--registry", registry]);
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(20))?;
    ensure!(
        out.status.success(),
        "eddy ca export failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let pem = String::from_utf8(out.stdout).context("eddy ca export printed non-UTF-8")?;
    ensure!(
        pem.contains("-----BEGIN CERTIFICATE-----"),
        "eddy ca export printed no certificate: {pem}"
    );
    Ok(pem)
}

/// What the content store holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreReport {
    pub files: usize,
    pub bytes: u64,
}

/// The store's blob directory under a data dir.
pub fn store_blob_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store/blobs/sha256")
}

/// Hash every file in `<data-dir>/store/blobs/sha256`; error on the first whose sha256 is
/// not its name.
pub fn verify_store(data_dir: &Path) -> Result<StoreReport> {
    let dir = store_blob_dir(data_dir);
    let mut report = StoreReport::default();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut file = fs::File::open(entry.path())?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let actual = hex::encode(hasher.finalize());
        ensure!(
            actual == name,
            "store file {} ({size} bytes) hashes to sha256:{actual}: a corrupt blob",
            entry.path().display()
        );
        report.files += 1;
        report.bytes += size;
    }
    Ok(report)
}

/// Whether the store holds `digest` (`sha256:<hex>`).
pub fn store_has(data_dir: &Path, digest: &str) -> bool {
    store_blob_dir(data_dir)
        .join(digest.trim_start_matches("sha256:"))
        .is_file()
}

/// Every file under `dir` (bounded depth by the tree itself; empty when absent).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}
