//! End-to-end tests of the trust gate with real programs: docker-registry upstream in a
//! network namespace, ctr, curl and a long-lived Go daemon (docker-registry as a pull-through
//! mirror) in the hooked cgroup. A client that does not trust eddy's CA must pull
//! successfully through eddy, untouched and uncached; one that trusts it is served and
//! cached; a client that rejects eddy's certificate anyway fails once, then passes through.
//!
//! Run as root: `cargo xtask test --privileged-only -- trust_` (or `cargo xtask test`).
use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use eddy_tests::{
    cgroup::CgroupGuard,
    containerd::{http_status, Client, Containerd},
    eddy::{eddy_bin, free_port},
    netns::Netns,
    oci::{self, Image, ImageSpec},
    pki::{write_bundle, Pki},
    process::{run_bounded, ProcessGuard},
    registry::{check_programs, Upstream, UpstreamOptions, CDN_HOST, REGISTRY_HOST},
    registry_eddy::{
        ca_export, connections_series, verify_store, RegistryEddy, RegistryEddyConfig,
    },
    require_privileges,
};

const MIB: u64 = 1 << 20;
const PULL_TIMEOUT: Duration = Duration::from_secs(120);
const NS: &str = "trust";
const REPO: &str = "trust/app";
const REJECTIONS: &str = "eddy_trust_rejections_total";

fn untrusted_series() -> String {
    connections_series("passthrough_untrusted")
}

fn tls_series() -> String {
    connections_series("registry_tls")
}

/// One test's world. Fields drop in declaration order: eddy, then the upstream, then the
/// namespace and the cgroup, then the files.
struct World {
    eddy: Option<RegistryEddy>,
    upstream: Upstream,
    _netns: Netns,
    cgroup: CgroupGuard,
    eddy_config: RegistryEddyConfig,
    /// /etc/hosts for clients: registry.test is the upstream.
    hosts: PathBuf,
    /// The test CA alone: a bundle WITHOUT eddy's CA.
    without_eddy: PathBuf,
    /// eddy's CA and the test CA.
    with_eddy: PathBuf,
    eddy_ca: PathBuf,
    pki: Pki,
    image: Image,
    work: tempfile::TempDir,
}

impl World {
    /// Upstream with a small image pushed, eddy's CA created, both bundles written; eddy
    /// not started yet.
    fn new() -> Result<Self> {
        check_programs()?;
        let work = tempfile::Builder::new().prefix("eddy-trust-").tempdir()?;
        let cgroup = CgroupGuard::new()?;
        let netns = Netns::new()?;
        let pki = Pki::create(
            &work.path().join("pki"),
            &[REGISTRY_HOST, CDN_HOST],
            &[netns.ns_v4.into()],
        )?;
        let upstream = Upstream::start(&netns, &pki, UpstreamOptions::default())?;
        let hosts = work.path().join("hosts.client");
        Client::write_hosts(&hosts, netns.ns_v4, &[REGISTRY_HOST])?;
        let eddy_hosts = work.path().join("hosts.eddy");
        Client::write_hosts(&eddy_hosts, netns.ns_v4, &[REGISTRY_HOST])?;
        let eddy_config = RegistryEddyConfig {
            cgroup: cgroup.path().to_path_buf(),
            data_dir: work.path().join("eddy-data"),
            registries: vec![REGISTRY_HOST.to_string()],
            upstream_cas: vec![pki.ca_cert.clone()],
            hosts: Some(eddy_hosts),
            quiet_start: false,
            extra_args: Vec::new(),
        };
        let eddy_ca = work.path().join("eddy-ca.pem");
        fs::write(
            &eddy_ca,
            ca_export(&eddy_bin(), &eddy_config.data_dir, &eddy_config.registries)?,
        )?;
        let without_eddy = work.path().join("bundle-without-eddy.pem");
        write_bundle(&without_eddy, &[&pki.ca_cert])?;
        let with_eddy = work.path().join("bundle-with-eddy.pem");
        write_bundle(&with_eddy, &[&eddy_ca, &pki.ca_cert])?;
        let image = oci::write_layout(
            &work.path().join("layout"),
            "v1",
            &ImageSpec::single(&[3 * MIB, MIB]),
        )?;
        upstream.push(&image, REPO)?;
        Ok(World {
            eddy: None,
            upstream,
            _netns: netns,
            cgroup,
            eddy_config,
            hosts,
            without_eddy,
            with_eddy,
            eddy_ca,
            pki,
            image,
            work,
        })
    }

    fn start_eddy(&mut self) -> Result<()> {
        self.eddy = Some(RegistryEddy::start(&eddy_bin(), &self.eddy_config)?);
        Ok(())
    }

    fn eddy(&self) -> &RegistryEddy {
        self.eddy.as_ref().expect("eddy was started")
    }

    /// A client in the hooked cgroup (or none) whose SSL_CERT_FILE is `bundle`.
    fn client(&self, bundle: &Path, hooked: bool) -> Client {
        Client {
            cgroup: hooked.then(|| self.cgroup.path().to_path_buf()),
            hosts: self.hosts.clone(),
            ca_bundle: bundle.to_path_buf(),
        }
    }

    fn reference(&self) -> String {
        format!("{REGISTRY_HOST}/{REPO}:v1")
    }

    fn layer_bytes(&self) -> u64 {
        self.image.layers().iter().map(|b| b.size).sum()
    }

    /// Layer bytes the upstream registry itself sent so far (its log).
    fn upstream_blob_bytes(&self) -> Result<u64> {
        Ok(self.upstream.served()?.blob_bytes)
    }

    fn store_files(&self) -> Result<usize> {
        Ok(verify_store(&self.eddy_config.data_dir)?.files)
    }

    /// `eddy status --admin ADDR` as text.
    fn status_text(&self) -> Result<String> {
        let eddy = self.eddy();
        let out = run_bounded(
            Command::new(eddy_bin())
                .args(["status", "--bpf-pin-dir"])
                .arg(&eddy.pin_dir)
                .arg("--admin")
                .arg(eddy.admin.to_string()),
            Duration::from_secs(20),
        )?;
        ensure!(
            out.status.success(),
            "eddy status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn world() -> Option<World> {
    if !require_privileges() {
        return None;
    }
    Some(World::new().expect("setting up upstream, cgroup and eddy's CA"))
}

/// a) and b): ctr whose SSL_CERT_FILE lacks eddy's CA pulls through the hooked cgroup on
/// the first try, passed through untouched and uncached (a baseline without eddy first);
/// a new ctr whose bundle has the CA is served by eddy and cached.
#[test]
fn trust_ctr_without_the_ca_passes_through_and_with_it_is_cached() -> Result<()> {
    let Some(mut world) = world() else {
        return Ok(());
    };
    let reference = world.reference();

    // Baseline: the same client without eddy (outside the hooked cgroup).
    let baseline_ctd = Containerd::start()?;
    let baseline = world
        .client(&world.without_eddy, false)
        .fetch(&baseline_ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("baseline ctr content fetch without eddy")?;
    baseline_ctd.ensure_content(NS, &world.image.blobs())?;
    println!("baseline (no eddy): {:.2?}", baseline.elapsed);

    world.start_eddy()?;
    let eddy = world.eddy();
    let upstream_before = world.upstream_blob_bytes()?;
    let ctd = Containerd::start()?;
    let untrusting = world
        .client(&world.without_eddy, true)
        .fetch(&ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("ctr content fetch through eddy, bundle without eddy's CA")?;
    ctd.ensure_content(NS, &world.image.blobs())?;
    let passed = eddy.metric(&untrusted_series())?;
    let terminated = eddy.metric(&tls_series())?;
    let direct_bytes = world.upstream_blob_bytes()? - upstream_before;
    println!(
        "untrusting ctr through eddy: {:.2?}; {} = {passed}, registry_tls = {terminated}; \
         upstream sent {direct_bytes} layer bytes straight to ctr; eddy upstream bytes {}",
        untrusting.elapsed,
        untrusted_series(),
        eddy.upstream_bytes()?
    );
    ensure!(
        passed >= 1.0 && terminated == 0.0,
        "the untrusting ctr was not passed through: passthrough_untrusted {passed}, \
         registry_tls {terminated}; eddy log:\n{}",
        eddy.log_tail(30)
    );
    ensure!(
        eddy.metric(r#"eddy_trust_verdicts_total{verdict="ca_not_in_roots"}"#)? >= 1.0,
        "no ca_not_in_roots verdict recorded"
    );
    ensure!(
        world.store_files()? == 0 && eddy.upstream_bytes()? == 0,
        "eddy cached or fetched content for an untrusting client"
    );
    ensure!(
        direct_bytes >= world.layer_bytes(),
        "upstream sent {direct_bytes} layer bytes, less than the image's {}",
        world.layer_bytes()
    );

    // b) A new ctr process whose bundle has eddy's CA: terminated and cached.
    let ctd2 = Containerd::start()?;
    world
        .client(&world.with_eddy, true)
        .fetch(&ctd2, NS, &reference, &[], PULL_TIMEOUT)?
        .check("ctr content fetch through eddy, bundle with eddy's CA")?;
    ctd2.ensure_content(NS, &world.image.blobs())?;
    let terminated = eddy.metric(&tls_series())?;
    let files = world.store_files()?;
    println!(
        "trusting ctr: registry_tls = {terminated}, {} still {}, store holds {files} blobs",
        untrusted_series(),
        eddy.metric(&untrusted_series())?
    );
    ensure!(terminated >= 1.0, "the trusting ctr was not terminated");
    ensure!(
        eddy.metric(&untrusted_series())? == passed,
        "the trusting ctr was passed through"
    );
    for blob in world.image.layers() {
        ensure!(
            eddy_tests::registry_eddy::store_has(&world.eddy_config.data_dir, &blob.digest),
            "eddy did not cache {}",
            blob.digest
        );
    }
    Ok(())
}

/// A docker-registry pull-through mirror: a long-lived Go daemon that pulls from
/// registry.test in its own process (as containerd's CRI plugin does) and reads its roots
/// once. Runs in the hooked cgroup; clients reach it over plain HTTP on loopback.
struct Mirror {
    process: ProcessGuard,
    addr: SocketAddr,
    log: PathBuf,
}

impl Mirror {
    fn start(world: &World, name: &str, bundle: &Path) -> Result<Self> {
        let dir = world.work.path().join(name);
        let storage = dir.join("storage");
        fs::create_dir_all(&storage)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n\
             proxy:\n  remoteurl: https://{REGISTRY_HOST}\n",
            storage = storage.display(),
        );
        let config_path = dir.join("config.yml");
        fs::write(&config_path, config)?;
        let log = dir.join("mirror.log");
        let argv = ["docker-registry", "serve"]
            .map(Into::into)
            .into_iter()
            .chain([config_path.into_os_string()])
            .collect::<Vec<_>>();
        let mut process = world.client(bundle, true).spawn(&argv, &log)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = process.try_wait()? {
                bail!(
                    "the mirror exited ({status}) at start: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the mirror does not listen on {addr} after 15 s: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Mirror { process, addr, log })
    }

    /// `ctr content fetch --plain-http` of the image from the mirror, by a ctr outside the
    /// hooked cgroup (only the mirror's own upstream connections go through eddy).
    fn pull(&self, world: &World, what: &str) -> Result<()> {
        let ctd = Containerd::start()?;
        let reference = format!("{}/{REPO}:v1", self.addr);
        let run = world.client(&world.without_eddy, false).fetch(
            &ctd,
            NS,
            &reference,
            &["--plain-http"],
            PULL_TIMEOUT,
        )?;
        ensure!(
            run.ok(),
            "{what}: ctr content fetch from the mirror failed: {}\nmirror log:\n{}",
            run.stderr(),
            eddy_tests::tail(&fs::read_to_string(&self.log).unwrap_or_default(), 15)
        );
        ctd.ensure_content(NS, &world.image.blobs())
    }
}

/// c) A daemon started BEFORE eddy's CA entered its bundle (containerd after `eddy ca
/// install`, before its restart) pulls successfully through eddy, uncached, and `eddy
/// status` names it with the fix. After a restart with the CA in its bundle, eddy caches
/// its pulls by itself.
#[test]
fn trust_daemon_started_before_the_ca_passes_through_until_restarted() -> Result<()> {
    let Some(mut world) = world() else {
        return Ok(());
    };
    // The daemon's bundle lacks eddy's CA when it starts (it dials upstream at once, through
    // eddy, and keeps that connection alive)...
    world.start_eddy()?;
    let bundle = world.work.path().join("daemon-bundle.pem");
    write_bundle(&bundle, &[&world.pki.ca_cert])?;
    let mirror = Mirror::start(&world, "mirror-1", &bundle)?;
    // ... then `eddy ca install` adds the CA, and eddy restarts (as a DaemonSet rollout
    // does): the new eddy has never seen the daemon, and finds the CA in its bundle, but
    // put there after the daemon started. The restart also ends the daemon's pooled
    // upstream connections, which the old eddy was splicing.
    thread::sleep(Duration::from_millis(50));
    write_bundle(&bundle, &[&world.pki.ca_cert, &world.eddy_ca])?;
    world.eddy = None;
    world.start_eddy()?;

    mirror.pull(&world, "daemon started before the CA")?;
    let eddy = world.eddy();
    let passed = eddy.metric(&untrusted_series())?;
    println!(
        "daemon started before the CA: {} = {passed}, registry_tls = {}, store {} files",
        untrusted_series(),
        eddy.metric(&tls_series())?,
        world.store_files()?
    );
    ensure!(
        passed >= 1.0 && eddy.metric(&tls_series())? == 0.0,
        "the daemon's connections were not passed through; eddy log:\n{}",
        eddy.log_tail(30)
    );
    ensure!(
        eddy.metric(r#"eddy_trust_verdicts_total{verdict="started_before_ca"}"#)? >= 1.0,
        "no started_before_ca verdict recorded"
    );
    ensure!(
        world.store_files()? == 0,
        "eddy cached an untrusting daemon's pull"
    );
    let status = world.status_text()?;
    println!("eddy status:\n{status}");
    let pid_line = format!("pid {} ", mirror.process.pid());
    ensure!(
        status.lines().any(|l| l.contains(&pid_line)
            && l.contains("docker-registry")
            && l.contains("started_before_ca")
            && l.contains(&world.cgroup.path().display().to_string())),
        "eddy status does not name the untrusting daemon (pid, exe, cgroup):\n{status}"
    );
    ensure!(
        status.contains(
            "restart containerd once (after `eddy ca install`), or set trust.restartContainerd in the chart"
        ),
        "eddy status does not give the fix:\n{status}"
    );
    drop(mirror);

    // Restarted with the CA in its bundle: caching starts by itself.
    let mirror = Mirror::start(&world, "mirror-2", &bundle)?;
    mirror.pull(&world, "daemon restarted with the CA")?;
    let terminated = eddy.metric(&tls_series())?;
    let files = world.store_files()?;
    println!("restarted daemon: registry_tls = {terminated}, store {files} files");
    ensure!(
        terminated >= 1.0,
        "the restarted daemon was not terminated; eddy log:\n{}",
        eddy.log_tail(30)
    );
    for blob in world.image.layers() {
        ensure!(
            eddy_tests::registry_eddy::store_has(&world.eddy_config.data_dir, &blob.digest),
            "eddy did not cache {} for the restarted daemon",
            blob.digest
        );
    }
    let status = world.status_text()?;
    ensure!(
        status.contains("every client seen trusts eddy's CA"),
        "eddy status still lists untrusting clients after the restart:\n{status}"
    );
    Ok(())
}

/// d) The reactive guard: curl whose SSL_CERT_FILE has eddy's CA (so the gate trusts it) but
/// whose `--cacert` does not. Its first connection fails (it rejects eddy's certificate);
/// later connections from curl in that cgroup pass through and succeed.
#[test]
fn trust_a_client_that_rejects_eddys_certificate_fails_once_then_passes_through() -> Result<()> {
    let Some(mut world) = world() else {
        return Ok(());
    };
    world.start_eddy()?;
    let client = world.client(&world.with_eddy, true);
    let url = format!("https://{REGISTRY_HOST}/v2/");
    let cacert = world
        .without_eddy
        .to_str()
        .context("utf-8 path")?
        .to_string();
    let mut outcomes = Vec::new();
    for i in 0..3 {
        let body = world.work.path().join(format!("curl{i}.body"));
        let headers = world.work.path().join(format!("curl{i}.headers"));
        let run = client.curl(
            &url,
            &["--cacert", &cacert],
            &body,
            &headers,
            Duration::from_secs(30),
        )?;
        let status = http_status(&fs::read_to_string(&headers).unwrap_or_default());
        println!(
            "curl #{i}: ok={} HTTP {status:?} {}",
            run.ok(),
            run.stderr().trim()
        );
        outcomes.push((run.ok() && status == Some(200), run.stderr()));
    }
    let eddy = world.eddy();
    let rejections = eddy.metric(REJECTIONS)?;
    let passed = eddy.metric(&untrusted_series())?;
    println!(
        "{REJECTIONS} = {rejections}, {} = {passed}",
        untrusted_series()
    );
    ensure!(
        !outcomes[0].0,
        "the first curl succeeded: the gate was supposed to misjudge it"
    );
    ensure!(
        outcomes[1].0 && outcomes[2].0,
        "after the rejection, curl still failed: {outcomes:?}; eddy log:\n{}",
        eddy.log_tail(30)
    );
    ensure!(rejections == 1.0, "{REJECTIONS} is {rejections}, not 1");
    ensure!(passed == 2.0, "passthrough_untrusted is {passed}, not 2");
    let status = world.status_text()?;
    println!("eddy status:\n{status}");
    ensure!(
        status.lines().any(|l| l.contains("curl")
            && l.contains("rejected_certificate")
            && l.contains("passed through for")),
        "eddy status does not name the guarded curl:\n{status}"
    );
    Ok(())
}
