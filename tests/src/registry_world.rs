//! A compact registry world for the hardening tests (abuse, fault injection, soak): the
//! harness's docker-registry upstream in a netns, a hooked cgroup, eddy with
//! `--registry registry.test`, and clients (curl, ctr) inside the cgroup that resolve
//! registry.test to the upstream and trust eddy's CA. Fields drop in declaration order.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    cgroup::CgroupGuard,
    containerd::{http_status, Client},
    eddy::eddy_bin,
    netns::Netns,
    oci::{self, Image, ImageSpec},
    pki::{write_bundle, Pki},
    registry::{check_programs, Upstream, UpstreamOptions, CDN_HOST, REGISTRY_HOST},
    registry_eddy::{ca_export, RegistryEddy, RegistryEddyConfig},
    token_auth::AUTH_HOST,
};

pub struct RegistryWorld {
    pub eddy: Option<RegistryEddy>,
    pub upstream: Upstream,
    pub netns: Netns,
    pub cgroup: CgroupGuard,
    /// curl/ctr inside the hooked cgroup (through eddy).
    pub client: Client,
    pub eddy_config: RegistryEddyConfig,
    pub pki: Pki,
    pub work: tempfile::TempDir,
}

/// One curl's outcome: curl may fail (eddy hung up); then `status` is None.
#[derive(Debug)]
pub struct Curl {
    pub ok: bool,
    pub status: Option<u16>,
    pub headers: String,
    pub body: Vec<u8>,
    pub stderr: String,
}

impl RegistryWorld {
    /// Upstream and cgroup, then eddy on `data_dir` (a fresh dir under the world's work
    /// dir when None).
    pub fn start(options: UpstreamOptions, data_dir: Option<PathBuf>) -> Result<Self> {
        Self::start_with_args(options, data_dir, Vec::new())
    }

    /// As [`RegistryWorld::start`], with more `eddy run` arguments (kept for restarts).
    pub fn start_with_args(
        options: UpstreamOptions,
        data_dir: Option<PathBuf>,
        extra_args: Vec<std::ffi::OsString>,
    ) -> Result<Self> {
        check_programs()?;
        let work = tempfile::Builder::new().prefix("eddy-hard-").tempdir()?;
        let cgroup = CgroupGuard::new()?;
        let netns = Netns::new()?;
        let pki = Pki::create(
            &work.path().join("pki"),
            &[REGISTRY_HOST, CDN_HOST, AUTH_HOST],
            &[netns.ns_v4.into()],
        )?;
        let upstream = Upstream::start(&netns, &pki, options)?;
        let client_hosts = work.path().join("hosts.client");
        Client::write_hosts(&client_hosts, netns.ns_v4, &[REGISTRY_HOST])?;
        let eddy_hosts = work.path().join("hosts.eddy");
        Client::write_hosts(&eddy_hosts, netns.ns_v4, &[REGISTRY_HOST, CDN_HOST])?;
        let eddy_config = RegistryEddyConfig {
            cgroup: cgroup.path().to_path_buf(),
            data_dir: data_dir.unwrap_or_else(|| work.path().join("eddy-data")),
            registries: vec![REGISTRY_HOST.to_string()],
            upstream_cas: vec![pki.ca_cert.clone()],
            hosts: Some(eddy_hosts),
            quiet_start: false,
            extra_args,
            in_netns: None,
        };
        let bin = eddy_bin();
        let eddy_ca = work.path().join("eddy-ca.pem");
        fs::create_dir_all(&eddy_config.data_dir)?;
        fs::write(
            &eddy_ca,
            ca_export(&bin, &eddy_config.data_dir, &eddy_config.registries)?,
        )?;
        let bundle = work.path().join("ca-bundle.pem");
        write_bundle(&bundle, &[&eddy_ca, &pki.ca_cert])?;
        let eddy = RegistryEddy::start(&bin, &eddy_config)?;
        let client = Client {
            cgroup: Some(cgroup.path().to_path_buf()),
            hosts: client_hosts,
            ca_bundle: bundle,
            netns: None,
        };
        Ok(Self {
            eddy: Some(eddy),
            upstream,
            netns,
            cgroup,
            client,
            eddy_config,
            pki,
            work,
        })
    }

    pub fn eddy(&self) -> &RegistryEddy {
        self.eddy.as_ref().expect("eddy is running")
    }

    /// Kill eddy (SIGKILL) and start it again on the same data dir.
    pub fn restart_eddy(&mut self) -> Result<()> {
        if let Some(mut eddy) = self.eddy.take() {
            eddy.kill9()?;
        }
        self.eddy = Some(RegistryEddy::start(&eddy_bin(), &self.eddy_config)?);
        Ok(())
    }

    /// Stop eddy as a rolling update does (SIGTERM: stop redirecting, drain, exit), then
    /// start it again on the same data dir. Returns how long the old one took to exit.
    pub fn rolling_restart_eddy(&mut self, drain: Duration) -> Result<Duration> {
        let started = std::time::Instant::now();
        if let Some(mut eddy) = self.eddy.take() {
            eddy.terminate(drain)?;
        }
        let stopped = started.elapsed();
        self.eddy = Some(RegistryEddy::start(&eddy_bin(), &self.eddy_config)?);
        Ok(stopped)
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

    /// curl `https://registry.test<path>` through eddy with `extra` arguments.
    pub fn curl(&self, path: &str, extra: &[&str]) -> Result<Curl> {
        self.curl_as(&self.client, path, extra)
    }

    /// The same request straight to upstream (from outside the hooked cgroup).
    pub fn curl_direct(&self, path: &str, extra: &[&str]) -> Result<Curl> {
        let direct = Client {
            cgroup: None,
            ..self.client.clone()
        };
        self.curl_as(&direct, path, extra)
    }

    fn curl_as(&self, client: &Client, path: &str, extra: &[&str]) -> Result<Curl> {
        let n = crate::next_id();
        let body = self.work.path().join(format!("curl-{n}.body"));
        let headers = self.work.path().join(format!("curl-{n}.headers"));
        let mut args = vec!["--cacert", client.ca_bundle.to_str().context("utf-8 path")?];
        args.extend_from_slice(extra);
        let run = client.curl(
            &format!("https://{REGISTRY_HOST}{path}"),
            &args,
            &body,
            &headers,
            Duration::from_secs(60),
        )?;
        let headers = fs::read_to_string(&headers).unwrap_or_default();
        let out = Curl {
            ok: run.ok(),
            status: http_status(&headers),
            headers,
            body: fs::read(&body).unwrap_or_default(),
            stderr: run.stderr(),
        };
        let _ = fs::remove_file(&body);
        Ok(out)
    }

    pub fn data_dir(&self) -> &Path {
        &self.eddy_config.data_dir
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised comm; utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// VmHWM (peak RSS) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}
