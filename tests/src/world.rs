//! The one world builder of the registry end-to-end tests, benchmarks and demos.
//!
//! A world is what a node looks like to eddy: docker-registry upstreams, each in a network
//! namespace of its own with a certificate from a throwaway test CA; a fresh cgroup that
//! eddy hooks; eddy as a caching registry proxy (`--registry registry.test` unless the
//! spec says otherwise) on a data dir the test owns; and a client (ctr, curl) that runs
//! inside the hooked cgroup, resolves the registry names through a private /etc/hosts and
//! trusts eddy's CA and the test CA.
//!
//! [`WorldSpec::new`] describes the common world; its methods change one thing each, and
//! [`WorldSpec::start`] builds it:
//!
//! ```ignore
//! let world = WorldSpec::new()
//!     .upstream(UpstreamOptions { redirect_to_cdn: true, ..Default::default() })
//!     .eddy_args(["--upstream-idle-timeout", "2s"])
//!     .start()?;
//! ```
use std::{
    ffi::OsString,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
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
    require_privileges,
    token_auth::AUTH_HOST,
};

/// When the world starts eddy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EddyStart {
    /// While the world is built: the common case.
    Now,
    /// When the test calls [`RegistryWorld::start_eddy`] (after a baseline, say). Its CA
    /// exists from the start, so clients can be given it first.
    Later,
    /// Never: a baseline of the harness itself. Clients trust the test CA alone.
    Never,
}

/// Adjusts eddy's configuration once the upstreams are up (their addresses are known then).
type Configure = Box<dyn FnOnce(&mut RegistryEddyConfig, &[&Upstream])>;

/// What to build; see the module docs. Upstreams are numbered in the order they are added,
/// the first being the one [`WorldSpec::new`] adds.
pub struct WorldSpec {
    upstreams: Vec<UpstreamOptions>,
    /// The names in the upstreams' certificate (it carries every upstream's address too).
    cert_names: Vec<String>,
    /// The client's /etc/hosts: (name, upstream number).
    client_hosts: Vec<(String, usize)>,
    /// eddy's /etc/hosts (bind-mounted over its own): (name, upstream number).
    eddy_hosts: Vec<(String, usize)>,
    data_dir: Option<PathBuf>,
    eddy_args: Vec<OsString>,
    configure: Option<Configure>,
    eddy: EddyStart,
    /// Take eddy's CA from its data dir once it has started (it creates the CA then,
    /// constrained to the registries its flags name), instead of `eddy ca export` before.
    ca_created_at_start: bool,
}

impl Default for WorldSpec {
    fn default() -> Self {
        Self::new()
    }
}

impl WorldSpec {
    /// One HTTPS upstream for registry.test (which may redirect to cdn.test, and whose
    /// certificate also names the token host), eddy with `--registry registry.test`, and a
    /// client that resolves registry.test to the upstream.
    pub fn new() -> Self {
        Self {
            upstreams: vec![UpstreamOptions::default()],
            cert_names: [REGISTRY_HOST, CDN_HOST, AUTH_HOST]
                .map(String::from)
                .to_vec(),
            client_hosts: vec![(REGISTRY_HOST.to_string(), 0)],
            eddy_hosts: vec![(REGISTRY_HOST.to_string(), 0), (CDN_HOST.to_string(), 0)],
            data_dir: None,
            eddy_args: Vec::new(),
            configure: None,
            eddy: EddyStart::Now,
            ca_created_at_start: false,
        }
    }

    /// How the first upstream serves.
    pub fn upstream(mut self, options: UpstreamOptions) -> Self {
        self.upstreams[0] = options;
        self
    }

    /// Another upstream, in a namespace of its own ([`RegistryWorld::others`]).
    pub fn and_upstream(mut self, options: UpstreamOptions) -> Self {
        self.upstreams.push(options);
        self
    }

    /// The names the upstreams' certificate carries (instead of registry.test, cdn.test
    /// and the token host).
    pub fn cert_names(mut self, names: &[&str]) -> Self {
        self.cert_names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// The client's /etc/hosts: each name at the upstream with that number.
    pub fn client_hosts(mut self, hosts: &[(&str, usize)]) -> Self {
        self.client_hosts = hosts.iter().map(|(n, i)| (n.to_string(), *i)).collect();
        self
    }

    /// eddy's /etc/hosts: each name at the upstream with that number.
    pub fn eddy_hosts(mut self, hosts: &[(&str, usize)]) -> Self {
        self.eddy_hosts = hosts.iter().map(|(n, i)| (n.to_string(), *i)).collect();
        self
    }

    /// eddy's `--data-dir` (a fresh dir in the world's work dir otherwise).
    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    /// More `eddy run` arguments (kept for restarts).
    pub fn eddy_args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.eddy_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Change eddy's configuration, given the upstreams, before its CA is made and it
    /// starts (registries named by address, intercepted ports, chain flags).
    pub fn configure_eddy(
        mut self,
        configure: impl FnOnce(&mut RegistryEddyConfig, &[&Upstream]) + 'static,
    ) -> Self {
        self.configure = Some(Box::new(configure));
        self
    }

    /// Build everything but leave eddy to [`RegistryWorld::start_eddy`].
    pub fn eddy_started_later(mut self) -> Self {
        self.eddy = EddyStart::Later;
        self
    }

    /// No eddy at all: the harness's own baseline.
    pub fn without_eddy(mut self) -> Self {
        self.eddy = EddyStart::Never;
        self
    }

    /// The client trusts the CA eddy creates when it starts (with chain flags, which `eddy
    /// ca export` does not see, it covers more registries than the export would).
    pub fn eddy_ca_created_at_start(mut self) -> Self {
        self.ca_created_at_start = true;
        self
    }

    /// The world, or None (having said why) where this machine cannot run privileged tests.
    /// Panics if the world cannot be built.
    pub fn start_if_privileged(self) -> Option<RegistryWorld> {
        if !require_privileges() {
            return None;
        }
        Some(self.start().expect("setting up the registry world"))
    }

    pub fn start(self) -> Result<RegistryWorld> {
        check_programs()?;
        let work = tempfile::Builder::new().prefix("eddy-world-").tempdir()?;
        let cgroup = CgroupGuard::new()?;
        let namespaces: Vec<Netns> = self
            .upstreams
            .iter()
            .map(|_| Netns::new())
            .collect::<Result<_>>()?;
        let names: Vec<&str> = self.cert_names.iter().map(String::as_str).collect();
        let ips: Vec<_> = namespaces.iter().map(|ns| ns.ns_v4.into()).collect();
        let pki = Pki::create(&work.path().join("pki"), &names, &ips)?;
        let upstreams: Vec<Upstream> = namespaces
            .iter()
            .zip(self.upstreams)
            .map(|(netns, options)| Upstream::start(netns, &pki, options))
            .collect::<Result<_>>()?;
        let address_of = |hosts: &[(String, usize)]| -> Vec<(Ipv4Addr, String)> {
            hosts
                .iter()
                .map(|(name, i)| (namespaces[*i].ns_v4, name.clone()))
                .collect()
        };
        let client_hosts = work.path().join("hosts.client");
        write_hosts(&client_hosts, &address_of(&self.client_hosts))?;
        let eddy_hosts = work.path().join("hosts.eddy");
        write_hosts(&eddy_hosts, &address_of(&self.eddy_hosts))?;

        let mut eddy_config = RegistryEddyConfig {
            extra_args: self.eddy_args,
            ..RegistryEddyConfig::caching(
                cgroup.path(),
                self.data_dir
                    .unwrap_or_else(|| work.path().join("eddy-data")),
                &pki,
                eddy_hosts,
            )
        };
        if let Some(configure) = self.configure {
            configure(&mut eddy_config, &upstreams.iter().collect::<Vec<_>>());
        }
        // Where the bundle is not written here, it is once eddy has made its CA.
        let bundle = work.path().join("ca-bundle.pem");
        let eddy_ca = if self.ca_created_at_start {
            eddy_config.data_dir.join("ca/ca.crt")
        } else if self.eddy == EddyStart::Never {
            write_bundle(&bundle, &[&pki.ca_cert])?;
            work.path().join("eddy-ca.pem")
        } else {
            trust_eddy_and_test_ca(work.path(), &eddy_config, &pki)?;
            work.path().join("eddy-ca.pem")
        };
        let client = Client {
            cgroup: Some(cgroup.path().to_path_buf()),
            hosts: client_hosts,
            ca_bundle: bundle,
            netns: None,
        };
        let mut namespaces = namespaces.into_iter();
        let mut upstreams = upstreams.into_iter();
        let netns = namespaces.next().expect("the first upstream's namespace");
        let upstream = upstreams.next().expect("the first upstream");
        let others = upstreams
            .zip(namespaces)
            .map(|(upstream, netns)| UpstreamHost { upstream, netns })
            .collect();
        let mut world = RegistryWorld {
            eddy: None,
            upstream,
            others,
            netns,
            cgroup,
            client,
            eddy_config,
            eddy_ca,
            ca_created_at_start: self.ca_created_at_start,
            pki,
            work,
        };
        if self.eddy == EddyStart::Now {
            world.start_eddy()?;
        }
        Ok(world)
    }
}

/// An upstream beyond the first, with its namespace (dropped after it).
pub struct UpstreamHost {
    pub upstream: Upstream,
    pub netns: Netns,
}

/// A built world. Fields drop in declaration order: eddy, then the upstream servers, then
/// the namespaces and the cgroup, then the files.
pub struct RegistryWorld {
    pub eddy: Option<RegistryEddy>,
    /// The first upstream: registry.test, unless the spec named others.
    pub upstream: Upstream,
    /// The upstreams added with [`WorldSpec::and_upstream`], in that order.
    pub others: Vec<UpstreamHost>,
    /// The first upstream's namespace (shape its link to throttle the upstream).
    pub netns: Netns,
    pub cgroup: CgroupGuard,
    /// curl/ctr inside the hooked cgroup (through eddy).
    pub client: Client,
    /// How eddy runs (and runs again after a restart).
    pub eddy_config: RegistryEddyConfig,
    /// eddy's CA (PEM).
    pub eddy_ca: PathBuf,
    ca_created_at_start: bool,
    /// The test CA and the upstreams' certificate.
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
    pub fn eddy(&self) -> &RegistryEddy {
        self.eddy.as_ref().expect("eddy is running")
    }

    /// The upstream with number `i` (0: the first).
    pub fn upstream_at(&self, i: usize) -> &Upstream {
        match i {
            0 => &self.upstream,
            i => &self.others[i - 1].upstream,
        }
    }

    /// Start eddy (waiting until it is ready) with the world's configuration.
    pub fn start_eddy(&mut self) -> Result<()> {
        self.eddy = Some(RegistryEddy::start(&eddy_bin(), &self.eddy_config)?);
        if self.ca_created_at_start {
            write_bundle(&self.client.ca_bundle, &[&self.eddy_ca, &self.pki.ca_cert])?;
        }
        Ok(())
    }

    /// Kill eddy (SIGKILL) and start it again on the same data dir.
    pub fn restart_eddy(&mut self) -> Result<()> {
        if let Some(mut eddy) = self.eddy.take() {
            eddy.kill9()?;
        }
        self.start_eddy()
    }

    /// Stop eddy as a rolling update does (SIGTERM: stop redirecting, drain, exit), then
    /// start it again on the same data dir. Returns how long the old one took to exit.
    pub fn rolling_restart_eddy(&mut self, drain: Duration) -> Result<Duration> {
        let started = Instant::now();
        if let Some(mut eddy) = self.eddy.take() {
            eddy.terminate(drain)?;
        }
        let stopped = started.elapsed();
        self.start_eddy()?;
        Ok(stopped)
    }

    /// A client like the world's, trusting `bundle` alone, in the hooked cgroup or (not
    /// `hooked`) outside any.
    pub fn client_trusting(&self, bundle: &Path, hooked: bool) -> Client {
        Client {
            cgroup: hooked.then(|| self.cgroup.path().to_path_buf()),
            ca_bundle: bundle.to_path_buf(),
            ..self.client.clone()
        }
    }

    /// Write an image layout and push it as registry.test/<repo>:<tag>.
    pub fn image(&self, repo: &str, tag: &str, spec: &ImageSpec) -> Result<Image> {
        self.image_at(&self.upstream, repo, tag, spec)
    }

    /// Write an image layout (random layers of `spec`'s sizes) and push it to `upstream`
    /// as `repo:tag`.
    pub fn image_at(
        &self,
        upstream: &Upstream,
        repo: &str,
        tag: &str,
        spec: &ImageSpec,
    ) -> Result<Image> {
        let layout = self
            .work
            .path()
            .join(format!("layouts-{}", crate::basics::next_id()))
            .join(repo.replace('/', "_"));
        let image = oci::write_layout(&layout, tag, spec)?;
        upstream.push(&image, repo)?;
        Ok(image)
    }

    /// curl `https://registry.test<path>` through eddy with `extra` arguments.
    pub fn curl(&self, path: &str, extra: &[&str]) -> Result<Curl> {
        self.curl_as(&self.client, path, extra)
    }

    /// The same request straight to upstream (from outside the hooked cgroup).
    pub fn curl_direct(&self, path: &str, extra: &[&str]) -> Result<Curl> {
        let direct = self.client_trusting(&self.client.ca_bundle, false);
        self.curl_as(&direct, path, extra)
    }

    fn curl_as(&self, client: &Client, path: &str, extra: &[&str]) -> Result<Curl> {
        curl_registry(client, self.work.path(), path, extra)
    }

    pub fn data_dir(&self) -> &Path {
        &self.eddy_config.data_dir
    }
}

/// curl `https://registry.test<path>` as `client` (trusting its bundle) with `extra`
/// arguments, keeping the headers in `dir`.
pub fn curl_registry(client: &Client, dir: &Path, path: &str, extra: &[&str]) -> Result<Curl> {
    let n = crate::basics::next_id();
    let body = dir.join(format!("curl-{n}.body"));
    let headers = dir.join(format!("curl-{n}.headers"));
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

/// A hosts file at `path`: localhost, and each name at its address.
pub fn write_hosts(path: &Path, entries: &[(Ipv4Addr, String)]) -> Result<()> {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for (ip, name) in entries {
        text.push_str(&format!("{ip} {name}\n"));
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// One upstream on its own: a test CA whose certificate names `cert_names` and `netns`'s
/// address (under `work/pki`), and docker-registry in `netns` serving with it.
pub fn upstream_host(
    work: &Path,
    netns: &Netns,
    cert_names: &[&str],
    options: UpstreamOptions,
) -> Result<(Pki, Upstream)> {
    let pki = Pki::create(&work.join("pki"), cert_names, &[netns.ns_v4.into()])?;
    let upstream = Upstream::start(netns, &pki, options)?;
    Ok((pki, upstream))
}

/// eddy's CA for `config` (`eddy ca export`, created if missing) at `dir/eddy-ca.pem`,
/// and a client bundle of it and the test CA at `dir/ca-bundle.pem`, which it returns.
pub fn trust_eddy_and_test_ca(
    dir: &Path,
    config: &RegistryEddyConfig,
    pki: &Pki,
) -> Result<PathBuf> {
    let eddy_ca = dir.join("eddy-ca.pem");
    fs::write(
        &eddy_ca,
        ca_export(&eddy_bin(), &config.data_dir, &config.registries)?,
    )?;
    let bundle = dir.join("ca-bundle.pem");
    write_bundle(&bundle, &[&eddy_ca, &pki.ca_cert])?;
    Ok(bundle)
}
