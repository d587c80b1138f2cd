//! eddy-registry-bench: eddy as a registry cache, measured against pulling direct and
//! against distribution's pull-through cache (run as root, EDDY_BIN set; `cargo xtask
//! bench` runs it after eddy-bench).
//!
//! The upstream is docker-registry over TLS in a network namespace behind a tbf-shaped
//! veth (200 Mbit/s by default, a WAN). Every pull is `ctr content fetch` (fetch only, no
//! unpack) into a fresh containerd, timed around the ctr process.
//!
//! a. Cold pull of a multi-layer image: direct (ctr trusts the test CA, no eddy), through
//!    eddy (fresh store, ctr in the hooked cgroup), through a distribution pull-through
//!    cache (`proxy.remoteurl`, a mirror the client names as cache.test).
//! b. Warm pull from a fresh containerd: eddy vs the distribution cache, with the CPU time
//!    of ctr, containerd and the server, and direct over the unshaped link as the client's
//!    ceiling.
//! c. One warm 512 MiB blob over TLS through eddy with curl and with `eddy-probe https-get`
//!    (rustls, a leaner client: on a 2-core machine curl is the bottleneck), HTTP/1.1 and
//!    HTTP/2, beside `openssl speed -evp aes-128-gcm` on one core and curl straight from the
//!    upstream.
//! d. 8 concurrent cold pulls through eddy: upstream bytes (the registry's log) / image size.
//! e. eddy's peak RSS during d (VmHWM, and the largest sampled VmRSS).
//!
//! Short measurements run `--runs` times (median); nothing is hard-coded.
// unsafe: sysconf(_SC_CLK_TCK), to turn /proc ticks into seconds. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    ffi::OsString,
    fs,
    io::Write,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use eddy_tests::{
    cgroup::CgroupGuard,
    containerd::{Client, Containerd, Run},
    eddy::eddy_bin,
    netns::Netns,
    oci::{self, Image, ImageSpec},
    pki::Pki,
    process::{cpu_seconds, run_bounded, rusage_cpu_seconds, ProcessGuard},
    registry::{
        check_programs, parse_registry_log, shape_link, Upstream, UpstreamOptions, REGISTRY_HOST,
    },
    registry_eddy::{store_has, RegistryEddy, RegistryEddyConfig},
    require_privileges,
    wire::HttpsGetReport,
    world::trust_eddy_and_test_ca,
    MIB,
};

const NS: &str = "bench";
const REPO: &str = "bench/app";
const BLOB_REPO: &str = "bench/blob";
const TAG: &str = "v1";
/// The distribution pull-through cache's name (clients pull from it as a mirror).
const CACHE_HOST: &str = "cache.test";
const PULL_TIMEOUT: Duration = Duration::from_secs(150);

/// Measure eddy as a registry cache against direct pulls and distribution's pull-through cache
#[derive(Parser)]
#[command(name = "eddy-registry-bench")]
struct Args {
    /// Repetitions of each short measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// tbf rate of the link to the upstream (tc syntax).
    #[arg(long, default_value = "200mbit")]
    rate: String,
    /// Layer sizes of the pulled image, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,48,32,16,8")]
    layers_mib: Vec<u64>,
    /// Size of the single blob for the throughput figure, in MiB.
    #[arg(long, default_value_t = 512)]
    blob_mib: u64,
    /// Concurrent cold pulls for the upstream-bytes and RSS figures.
    #[arg(long, default_value_t = 8)]
    concurrent: usize,
    /// Where to write the markdown report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Append to `--out` instead of replacing it.
    #[arg(long)]
    append: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!((1..=9).contains(&args.runs), "--runs must be in 1..=9");
    ensure!(
        (1..=16).contains(&args.concurrent),
        "--concurrent must be in 1..=16"
    );
    ensure!(
        !args.layers_mib.is_empty() && args.layers_mib.iter().all(|m| (1..=1024).contains(m)),
        "--layers-mib: 1..=1024 MiB each"
    );
    ensure!(
        (1..=4096).contains(&args.blob_mib),
        "--blob-mib must be in 1..=4096"
    );
    if !require_privileges() {
        bail!("registry benchmarks skipped: not privileged (see the SKIPPED line above)");
    }
    check_programs()?;
    let started = Instant::now();
    let env = Env::new(&args)?;
    let md = measure(&args, &env)?;
    println!("{md}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(args.append)
            .truncate(!args.append)
            .open(out)
            .with_context(|| format!("opening {}", out.display()))?;
        if args.append {
            file.write_all(b"\n")?;
        }
        file.write_all(md.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    eprintln!(
        "registry bench done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("registry bench: {}", msg.as_ref());
}

/// The world every measurement shares. Fields drop in declaration order: the registry,
/// then the namespace and the cgroup, then the files.
struct Env {
    upstream: Upstream,
    netns: Netns,
    cgroup: CgroupGuard,
    pki: Pki,
    image: Image,
    blob_image: Image,
    /// ctr outside the hooked cgroup, trusting the test CA: the direct path.
    direct: Client,
    /// /etc/hosts for eddy and the cache: registry.test → the upstream.
    upstream_hosts: PathBuf,
    /// /etc/hosts for the cache's clients: cache.test → the host side of the veth.
    cache_hosts: PathBuf,
    work: tempfile::TempDir,
}

impl Env {
    fn new(args: &Args) -> Result<Self> {
        let work = tempfile::Builder::new()
            .prefix("eddy-regbench-")
            .tempdir()?;
        let cgroup = CgroupGuard::new()?;
        let netns = Netns::new()?;
        // The cache serves on the host side of the veth: its address is in the certificate.
        let pki = Pki::create(
            &work.path().join("pki"),
            &[REGISTRY_HOST, CACHE_HOST],
            &[netns.ns_v4.into(), netns.host_v4.into()],
        )?;
        let upstream = Upstream::start(&netns, &pki, UpstreamOptions::default())?;

        let sizes: Vec<u64> = args.layers_mib.iter().map(|m| m * MIB).collect();
        progress(format!(
            "writing and pushing a {}-layer image ({} MiB) and a {} MiB blob (unshaped link)",
            sizes.len(),
            args.layers_mib.iter().sum::<u64>(),
            args.blob_mib
        ));
        let image = oci::write_layout(
            &work.path().join("layout-app"),
            TAG,
            &ImageSpec::single(&sizes),
        )?;
        upstream.push(&image, REPO)?;
        let blob_image = oci::write_layout(
            &work.path().join("layout-blob"),
            TAG,
            &ImageSpec::single(&[args.blob_mib * MIB]),
        )?;
        upstream.push(&blob_image, BLOB_REPO)?;
        // The layouts are pushed; their bytes are not needed any more.
        let _ = fs::remove_dir_all(&image.layout);
        let _ = fs::remove_dir_all(&blob_image.layout);

        let upstream_hosts = work.path().join("hosts.upstream");
        Client::write_hosts(&upstream_hosts, netns.ns_v4, &[REGISTRY_HOST])?;
        let cache_hosts = work.path().join("hosts.cache");
        Client::write_hosts(&cache_hosts, netns.host_v4, &[CACHE_HOST])?;
        let direct = Client {
            cgroup: None,
            hosts: upstream_hosts.clone(),
            ca_bundle: pki.ca_cert.clone(),
            netns: None,
        };
        Ok(Self {
            upstream,
            netns,
            cgroup,
            pki,
            image,
            blob_image,
            direct,
            upstream_hosts,
            cache_hosts,
            work,
        })
    }

    fn shape(&self, rate: Option<&str>) -> Result<()> {
        shape_link(&self.netns, rate)
    }

    /// Bytes the host has received from the namespace (the veth's host side).
    fn link_rx_bytes(&self) -> u64 {
        fs::read_to_string(format!(
            "/sys/class/net/{}/statistics/rx_bytes",
            self.netns.name()
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    }

    /// Wait (bounded) until nothing flows from the upstream: distribution's cache goes on
    /// fetching after its client is done, which would slow the next measurement.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = self.link_rx_bytes();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(500));
            let now = self.link_rx_bytes();
            if now - last < 64 * 1024 {
                return;
            }
            last = now;
        }
        progress("warning: the upstream link was still busy after 60 s");
    }

    /// Bytes the registry's log says it sent in successful blob and manifest GETs.
    fn upstream_sent(&self) -> Result<u64> {
        Ok(self.upstream.served()?.bytes())
    }

    /// A fresh eddy (empty store) and a client in the hooked cgroup that trusts its CA.
    fn start_eddy(&self, name: &str) -> Result<(RegistryEddy, Client)> {
        let dir = self.work.path().join(name);
        let config = RegistryEddyConfig {
            // The harness's "starting eddy: ..." line stays off the report's stderr.
            quiet_start: true,
            ..RegistryEddyConfig::caching(
                self.cgroup.path(),
                dir.join("data"),
                &self.pki,
                self.upstream_hosts.clone(),
            )
        };
        let bundle = trust_eddy_and_test_ca(&dir, &config, &self.pki)?;
        let eddy = RegistryEddy::start(&eddy_bin(), &config)?;
        let client = Client {
            cgroup: Some(self.cgroup.path().to_path_buf()),
            hosts: self.upstream_hosts.clone(),
            ca_bundle: bundle,
            netns: None,
        };
        Ok((eddy, client))
    }

    /// A fresh distribution pull-through cache (empty storage) on the host side of the
    /// veth, and a client (outside the hooked cgroup) that pulls from it by name.
    fn start_cache(&self, name: &str) -> Result<(Cache, Client)> {
        let cache = Cache::start(self, name)?;
        let client = Client {
            cgroup: None,
            hosts: self.cache_hosts.clone(),
            ca_bundle: self.pki.ca_cert.clone(),
            netns: None,
        };
        Ok((cache, client))
    }

    fn reference(&self, host: &str, repo: &str) -> String {
        format!("{host}/{repo}:{TAG}")
    }
}

/// docker-registry with `proxy.remoteurl: https://registry.test`, on host_v4:443. It
/// trusts the test CA through SSL_CERT_FILE and resolves registry.test through a private
/// /etc/hosts. Killed on drop.
struct Cache {
    process: ProcessGuard,
    log: PathBuf,
}

impl Cache {
    fn start(env: &Env, name: &str) -> Result<Self> {
        let dir = env.work.path().join(name);
        let storage = dir.join("storage");
        fs::create_dir_all(&storage)?;
        let addr = SocketAddr::from((env.netns.host_v4, 443));
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 cache:\n    blobdescriptor: inmemory\n\
             http:\n  addr: {addr}\n  tls:\n    certificate: {cert}\n    key: {key}\n\
             proxy:\n  remoteurl: https://{REGISTRY_HOST}\n",
            storage = storage.display(),
            cert = env.pki.server_cert.display(),
            key = env.pki.server_key.display(),
        );
        let config_path = dir.join("config.yml");
        fs::write(&config_path, config)?;
        let log = dir.join("cache.log");
        let log_file = fs::File::create(&log)?;
        let mut process = ProcessGuard::spawn(
            "docker-registry (pull-through cache)",
            Command::new("unshare")
                .args(["--mount", "sh", "-c"])
                .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
                .arg(&env.upstream_hosts)
                .arg("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .env("SSL_CERT_FILE", &env.pki.ca_cert)
                .env_remove("SSL_CERT_DIR")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file),
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = process.try_wait()? {
                bail!(
                    "the pull-through cache exited ({status}) at start: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the pull-through cache does not listen on {addr} after 15 s: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { process, log })
    }

    /// Bytes the cache sent its clients (its own log).
    fn served_bytes(&self) -> u64 {
        parse_registry_log(&fs::read_to_string(&self.log).unwrap_or_default()).bytes()
    }
}

/// One timed `ctr content fetch`.
struct Fetch {
    elapsed: Duration,
    /// CPU seconds of the ctr process, the containerd daemon and the server (eddy or the
    /// cache) during the fetch.
    ctr_cpu: f64,
    containerd_cpu: f64,
    server_cpu: Option<f64>,
    /// Bytes the upstream registry sent (its log), measured after the link went quiet.
    upstream_bytes: u64,
}

/// `ctr content fetch` of `reference` into a fresh containerd, as `client`.
fn fetch(
    env: &Env,
    client: &Client,
    reference: &str,
    server_pid: Option<u32>,
    what: &str,
) -> Result<Fetch> {
    let containerd = Containerd::start()?;
    let daemon_pid = containerd_pid(&containerd);
    let sent_before = env.upstream_sent()?;
    let daemon_before = daemon_pid.map(cpu_seconds).unwrap_or(0.0);
    let server_before = server_pid.map(cpu_seconds);
    let children_before = children_cpu_seconds();
    let run = client
        .fetch(&containerd, NS, reference, &[], PULL_TIMEOUT)?
        .check(what)?;
    let ctr_cpu = children_cpu_seconds() - children_before;
    let containerd_cpu = daemon_pid.map(cpu_seconds).unwrap_or(0.0) - daemon_before;
    let server_cpu = server_pid
        .map(cpu_seconds)
        .zip(server_before)
        .map(|(a, b)| a - b);
    containerd.ensure_content(NS, &env.image.blobs())?;
    drop(containerd);
    env.settle();
    let upstream_bytes = env.upstream_sent()? - sent_before;
    progress(format!(
        "{what}: {:.2} s (ctr {ctr_cpu:.2} s CPU, containerd {containerd_cpu:.2} s, server {}), \
         upstream sent {:.1} MiB",
        run.elapsed.as_secs_f64(),
        server_cpu.map_or("-".into(), |c| format!("{c:.2} s")),
        mib(upstream_bytes)
    ));
    Ok(Fetch {
        elapsed: run.elapsed,
        ctr_cpu,
        containerd_cpu,
        server_cpu,
        upstream_bytes,
    })
}

/// Medians over runs of one path.
#[derive(Default)]
struct Series(Vec<Fetch>);

impl Series {
    fn median_by(&self, f: impl Fn(&Fetch) -> f64) -> f64 {
        median(self.0.iter().map(f).collect())
    }
    fn secs(&self) -> f64 {
        self.median_by(|r| r.elapsed.as_secs_f64())
    }
    fn all_secs(&self) -> String {
        self.0
            .iter()
            .map(|r| format!("{:.2}", r.elapsed.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    }
    fn upstream(&self) -> f64 {
        self.median_by(|r| r.upstream_bytes as f64)
    }
}

// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn measure(args: &Args, env: &Env) -> Result<String> {
    let load_start = loadavg();
    let image_bytes = env.image.total_bytes();
    let app_upstream = env.reference(REGISTRY_HOST, REPO);
    let app_cache = env.reference(CACHE_HOST, REPO);

    // a + b: cold and warm pulls, the three paths interleaved per round so that drift
    // hits them alike.
    env.shape(Some(&args.rate))?;
    progress(format!("link shaped to {} (tbf)", args.rate));
    let (mut direct, mut eddy_cold, mut eddy_warm, mut cache_cold, mut cache_warm) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    let mut unshaped = Series::default();
    let mut cache_served_cold = Vec::new();
    for round in 0..args.runs {
        direct.0.push(fetch(
            env,
            &env.direct,
            &app_upstream,
            None,
            &format!("round {round}: direct cold"),
        )?);

        let (eddy, client) = env.start_eddy(&format!("eddy-{round}"))?;
        eddy_cold.0.push(fetch(
            env,
            &client,
            &app_upstream,
            Some(eddy.pid()),
            &format!("round {round}: eddy cold"),
        )?);
        eddy_warm.0.push(fetch(
            env,
            &client,
            &app_upstream,
            Some(eddy.pid()),
            &format!("round {round}: eddy warm"),
        )?);
        eddy.stop_quietly();

        let (cache, client) = env.start_cache(&format!("cache-{round}"))?;
        cache_cold.0.push(fetch(
            env,
            &client,
            &app_cache,
            Some(cache.process.pid()),
            &format!("round {round}: distribution cache cold"),
        )?);
        cache_served_cold.push(cache.served_bytes());
        cache_warm.0.push(fetch(
            env,
            &client,
            &app_cache,
            Some(cache.process.pid()),
            &format!("round {round}: distribution cache warm"),
        )?);
        drop(cache);
        let _ = fs::remove_dir_all(env.work.path().join(format!("eddy-{round}")));
        let _ = fs::remove_dir_all(env.work.path().join(format!("cache-{round}")));

        // The client's ceiling: direct over the unshaped veth.
        env.shape(None)?;
        unshaped.0.push(fetch(
            env,
            &env.direct,
            &app_upstream,
            None,
            &format!("round {round}: direct, unshaped link"),
        )?);
        env.shape(Some(&args.rate))?;
    }
    env.shape(None)?;

    // c: one warm blob over TLS.
    let blob = env.blob_image.largest_layer();
    let blob_path = format!("/v2/{BLOB_REPO}/blobs/{}", blob.digest);
    let (eddy, client) = env.start_eddy("eddy-blob")?;
    let fill = curl_blob(
        &client,
        Some(eddy.pid()),
        REGISTRY_HOST,
        &blob_path,
        "--http1.1",
        blob.size,
    )?;
    progress(format!(
        "filled eddy with the {} MiB blob (cold, unshaped link) at {:.2} GB/s",
        blob.size / MIB,
        fill.bytes_per_s / 1e9
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store_has(&eddy.data_dir, &blob.digest) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        store_has(&eddy.data_dir, &blob.digest),
        "the blob is not in eddy's store 30 s after a full GET"
    );
    let probe = probe_bin()?;
    let blob_get = |http2: bool, sha256: bool, suites: &[&str]| {
        probe_blob(
            &probe,
            &client,
            Some(eddy.pid()),
            SocketAddr::from((env.netns.ns_v4, 443)),
            &blob_path,
            ProbeOptions {
                http2,
                sha256,
                cipher_suites: suites,
            },
            blob.size,
        )
    };
    let mut h1 = Vec::new();
    let mut h2 = Vec::new();
    let mut p1 = Vec::new();
    let mut p2 = Vec::new();
    let mut p1_aes128 = Vec::new();
    let mut up_h1 = Vec::new();
    let mut aes = Vec::new();
    for round in 0..args.runs {
        let pid = Some(eddy.pid());
        h1.push(curl_blob(
            &client,
            pid,
            REGISTRY_HOST,
            &blob_path,
            "--http1.1",
            blob.size,
        )?);
        h2.push(curl_blob(
            &client,
            pid,
            REGISTRY_HOST,
            &blob_path,
            "--http2",
            blob.size,
        )?);
        p1.push(blob_get(false, false, &[])?);
        p2.push(blob_get(true, false, &[])?);
        p1_aes128.push(blob_get(false, false, GO_CIPHER_ORDER)?);
        up_h1.push(curl_blob(
            &env.direct,
            None,
            REGISTRY_HOST,
            &blob_path,
            "--http1.1",
            blob.size,
        )?);
        aes.push(openssl_aes_gcm()?);
        let line = |t: &Transfer| {
            format!(
                "{:.2} GB/s ({}{}, {:.2} s; CPU s: eddy {:.2}, client {:.2})",
                t.bytes_per_s / 1e9,
                t.version,
                if t.cipher.is_empty() {
                    String::new()
                } else {
                    format!(", {}, {} KiB per chunk", t.cipher, t.chunk / 1024)
                },
                t.secs,
                t.server_cpu.unwrap_or(f64::NAN),
                t.client_cpu
            )
        };
        progress(format!(
            "round {round}: warm blob through eddy: curl {}, {}; eddy-probe {}, {}, {}; \
             straight from docker-registry {:.2} GB/s; openssl aes-128-gcm {:.2} GB/s",
            line(&h1[round]),
            line(&h2[round]),
            line(&p1[round]),
            line(&p2[round]),
            line(&p1_aes128[round]),
            up_h1[round].bytes_per_s / 1e9,
            aes[round] / 1e9
        ));
    }
    // One more GET each way that hashes the body: the probe's bytes are the blob's.
    let verified = [blob_get(false, true, &[])?, blob_get(true, true, &[])?];
    progress(format!(
        "eddy-probe with --sha256 (digest checked): HTTP/1.1 {:.2} GB/s, HTTP/2 {:.2} GB/s",
        verified[0].bytes_per_s / 1e9,
        verified[1].bytes_per_s / 1e9
    ));
    eddy.stop_quietly();
    let gbps = |v: &[Transfer]| median(v.iter().map(|c| c.bytes_per_s / 1e9).collect());
    let h1_gbps = gbps(&h1);
    let h2_gbps = gbps(&h2);
    let p1_gbps = gbps(&p1);
    let p2_gbps = gbps(&p2);
    let p1_aes128_gbps = gbps(&p1_aes128);
    let up_gbps = gbps(&up_h1);
    let aes_gbps = median(aes.iter().map(|a| a / 1e9).collect());
    let h2_version = h2.first().map(|c| c.version.clone()).unwrap_or_default();
    let p2_version = p2.first().map(|c| c.version.clone()).unwrap_or_default();

    // d + e: concurrent cold pulls through a fresh eddy, over the shaped link.
    env.shape(Some(&args.rate))?;
    let herd = herd(env, args.concurrent, &app_upstream)?;

    // The report.
    let load_end = loadavg();
    let mut md = String::new();
    md.push_str(&format!(
        "## eddy as a registry cache\n\n\
         Upstream: docker-registry 2.8 over TLS in a netns behind a veth shaped with tc tbf \
         to {rate}. Image: {n} layers, {size:.1} MiB. Every pull is `ctr content fetch` \
         (fetch only, no unpack) into a fresh containerd 1.6; times are the ctr process's \
         wall time, median of {runs} (all runs in brackets). eddy: fresh store per cold \
         run, ctr in the hooked cgroup, no mirror config. Distribution: a second \
         docker-registry with `proxy.remoteurl`, fresh storage per cold run, pulled from \
         as `{CACHE_HOST}` (a mirror). Machine: {cpus} CPUs, 1-minute load average \
         {load_start} at the start and {load_end} at the end (other work on the machine \
         lowers the throughput figures; see the CPU columns).\n\n",
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
        rate = args.rate,
        n = env.image.layers().len(),
        size = mib(image_bytes),
        runs = args.runs,
    ));
    md.push_str("### a. cold pull\n\n");
    md.push_str("| path | time s | vs direct | upstream sent / image |\n|---|---:|---:|---:|\n");
    let direct_s = direct.secs();
    for (name, s) in [
        ("direct (no eddy)", &direct),
        ("through eddy, cold", &eddy_cold),
        ("distribution pull-through, cold", &cache_cold),
    ] {
        md.push_str(&format!(
            "| {name} | {:.2} [{}] | {:.3}× | {:.3} |\n",
            s.secs(),
            s.all_secs(),
            s.secs() / direct_s,
            s.upstream() / image_bytes as f64
        ));
    }
    md.push_str(&format!(
        "\nTarget eddy cold ≤ 1.05× direct: **{:.3}×** ({}).\n",
        eddy_cold.secs() / direct_s,
        verdict(eddy_cold.secs() / direct_s <= 1.05)
    ));
    md.push_str("\n### b. warm pull (fresh containerd, warm cache)\n\n");
    md.push_str(
        "| path | time s | vs eddy warm | ctr CPU s | containerd CPU s | server CPU s | upstream sent |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let eddy_warm_s = eddy_warm.secs();
    for (name, s) in [
        ("through eddy, warm", &eddy_warm),
        ("distribution pull-through, warm", &cache_warm),
        ("direct, unshaped link (client ceiling)", &unshaped),
    ] {
        let server = if s.0.iter().all(|r| r.server_cpu.is_some()) {
            format!("{:.2}", s.median_by(|r| r.server_cpu.unwrap_or(0.0)))
        } else {
            "-".into()
        };
        md.push_str(&format!(
            "| {name} | {:.2} [{}] | {:.2}× | {:.2} | {:.2} | {server} | {:.1} MiB |\n",
            s.secs(),
            s.all_secs(),
            s.secs() / eddy_warm_s,
            s.median_by(|r| r.ctr_cpu),
            s.median_by(|r| r.containerd_cpu),
            mib(s.upstream() as u64)
        ));
    }
    let client_cpu = eddy_warm.median_by(|r| r.ctr_cpu + r.containerd_cpu);
    let spread = |s: &Series| {
        let t: Vec<f64> = s.0.iter().map(|r| r.elapsed.as_secs_f64()).collect();
        t.iter().copied().fold(f64::MIN, f64::max) - t.iter().copied().fold(f64::MAX, f64::min)
    };
    let gap = eddy_warm_s - cache_warm.secs();
    md.push_str(&format!(
        "\nTarget eddy warm no slower than distribution warm: **{:.2} s vs {:.2} s, {:.3}×** \
         ({}{}). ctr + containerd use {:.2} CPU s of the {:.2} s eddy-warm pull{}.\n",
        eddy_warm_s,
        cache_warm.secs(),
        eddy_warm_s / cache_warm.secs(),
        verdict(gap <= 0.0),
        if gap > 0.0 && gap < spread(&eddy_warm).max(spread(&cache_warm)) {
            format!(
                "; the {:.2} s gap is within the runs' spread of {:.2} s",
                gap,
                spread(&eddy_warm).max(spread(&cache_warm))
            )
        } else {
            String::new()
        },
        client_cpu,
        eddy_warm_s,
        if client_cpu >= eddy_warm_s * 0.8 {
            format!(
                " (eddy {:.2} s): the client, not the server, is the bottleneck{}",
                eddy_warm.median_by(|r| r.server_cpu.unwrap_or(0.0)),
                if unshaped.secs() >= eddy_warm_s * 0.95 {
                    "; direct over the unshaped link is no faster"
                } else {
                    ""
                }
            )
        } else {
            String::new()
        }
    ));
    md.push_str(&format!(
        "The distribution cache sent its clients {:.1} MiB per cold pull (its log); \
         upstream sent it {:.2}× the image (distribution fetches each missed blob twice).\n",
        mib(median(cache_served_cold.iter().map(|b| *b as f64).collect()) as u64),
        cache_cold.upstream() / image_bytes as f64
    ));

    md.push_str(&format!(
        "\n### c. one warm {} MiB blob over TLS (from the hooked cgroup)\n\n\
         Clients: `curl -o /dev/null`, and `eddy-probe https-get` (rustls with ring, 1 MiB \
         reads, body discarded; one extra run each way with `--sha256` checked the body's \
         digest: {:.2} and {:.2} GB/s while hashing). TLS 1.3 cipher suite: {} by default \
         (the client's order decides), {} when the client offers AES-128-GCM first. GB/s is bytes over the client's whole \
         request (connect, TLS handshake, body); CPU / wall is CPU seconds per second of \
         transfer (1.00 is one core busy throughout).\n\n",
        blob.size / MIB,
        verified[0].bytes_per_s / 1e9,
        verified[1].bytes_per_s / 1e9,
        p1.first().map_or("?", |t| t.cipher.as_str()),
        p1_aes128.first().map_or("?", |t| t.cipher.as_str()),
    ));
    md.push_str(
        "| what | GB/s | runs | server CPU / wall | client CPU / wall | other processes' CPU / wall |\n\
         |---|---:|---|---:|---:|---:|\n",
    );
    let runs = |v: &[Transfer]| {
        v.iter()
            .map(|c| format!("{:.2}", c.bytes_per_s / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // CPU per second of transfer: 1.00 means one core busy for the whole transfer.
    let busy = |v: &[Transfer], f: &dyn Fn(&Transfer) -> Option<f64>| -> String {
        let shares: Vec<f64> = v
            .iter()
            .filter_map(|c| f(c).map(|cpu| cpu / c.secs.max(1e-6)))
            .collect();
        if shares.len() == v.len() {
            format!("{:.2}", median(shares))
        } else {
            "-".into()
        }
    };
    let h2_name = format!("through eddy, HTTP/2 (negotiated {h2_version}), curl");
    let p2_name = format!(
        "through eddy, HTTP/2 (negotiated {p2_version}), rustls client (eddy-probe https-get)"
    );
    let eddy_rows: [(&str, &Vec<Transfer>, f64); 5] = [
        ("through eddy, HTTP/1.1, curl", &h1, h1_gbps),
        (&h2_name, &h2, h2_gbps),
        (
            "through eddy, HTTP/1.1, rustls client (eddy-probe https-get)",
            &p1,
            p1_gbps,
        ),
        (&p2_name, &p2, p2_gbps),
        (
            "through eddy, HTTP/1.1, rustls client offering AES-128-GCM first (Go's order, \
             so containerd's)",
            &p1_aes128,
            p1_aes128_gbps,
        ),
    ];
    for (name, v, gbps) in eddy_rows.into_iter().chain([(
        "straight from docker-registry, HTTP/1.1, unshaped veth",
        &up_h1,
        up_gbps,
    )]) {
        md.push_str(&format!(
            "| {name} | {gbps:.2} | {} | {} | {} | {} |\n",
            runs(v),
            busy(v, &|c| c.server_cpu),
            busy(v, &|c| Some(c.client_cpu)),
            busy(v, &|c| c.others_cpu),
        ));
    }
    md.push_str(&format!(
        "| `openssl speed -evp aes-128-gcm` (16 KiB blocks, one core) | {aes_gbps:.2} | {} | | | |\n",
        aes.iter()
            .map(|a| format!("{:.2}", a / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let (best_name, _, best_gbps) = eddy_rows
        .iter()
        .copied()
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .context("no rows")?;
    md.push_str(&format!(
        "\nTarget ≥ 1.5 GB/s: **{best_gbps:.2} GB/s** ({}), the best client: {}; {:.0}% of one \
         core's AES-GCM. curl over HTTP/1.1: {h1_gbps:.2} GB/s.\n",
        verdict(best_gbps >= 1.5),
        best_name
            .strip_prefix("through eddy, ")
            .unwrap_or(best_name),
        100.0 * best_gbps / aes_gbps
    ));

    md.push_str(&format!(
        "\n### d/e. {} concurrent cold pulls through eddy (fresh store, {})\n\n",
        args.concurrent, args.rate
    ));
    md.push_str("| figure | value | target |\n|---|---:|---|\n");
    md.push_str(&format!(
        "| upstream sent (registry log) / image | **{:.3}** ({:.1} MiB for {:.1} MiB) | ≤ 1.02: {} |\n",
        herd.upstream_bytes as f64 / image_bytes as f64,
        mib(herd.upstream_bytes),
        mib(image_bytes),
        verdict(herd.upstream_bytes as f64 <= image_bytes as f64 * 1.02)
    ));
    md.push_str(&format!(
        "| eddy peak RSS (VmHWM) | **{:.1} MiB** | ≤ 64 MiB: {} |\n",
        herd.vm_hwm_kib as f64 / 1024.0,
        verdict(herd.vm_hwm_kib <= 64 * 1024)
    ));
    md.push_str(&format!(
        "| eddy largest sampled VmRSS ({} samples) | {:.1} MiB | |\n",
        herd.samples,
        herd.max_rss_kib as f64 / 1024.0
    ));
    md.push_str(&format!(
        "| all {} pulls done | {:.2} s (first {:.2} s) | |\n",
        args.concurrent, herd.last_s, herd.first_s
    ));
    md.push_str(&format!(
        "| eddy CPU during the pulls | {:.2} s | |\n",
        herd.eddy_cpu
    ));
    Ok(md)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

struct Transfer {
    bytes_per_s: f64,
    version: String,
    /// eddy-probe only: the TLS cipher suite, and the mean body chunk it was handed.
    cipher: String,
    chunk: u64,
    /// Wall seconds of the transfer (the client's whole request), the client's CPU seconds,
    /// and the server's CPU seconds (when its pid is given).
    secs: f64,
    client_cpu: f64,
    server_cpu: Option<f64>,
    /// CPU seconds the rest of the machine used meanwhile (all CPU time less the client's and
    /// the server's; only when the server's pid is given).
    others_cpu: Option<f64>,
}

/// curl a blob to /dev/null as `client`, checking status, size and (for h2) the protocol.
fn curl_blob(
    client: &Client,
    server_pid: Option<u32>,
    host: &str,
    path: &str,
    http: &str,
    size: u64,
) -> Result<Transfer> {
    let argv: Vec<OsString> = [
        "curl",
        "-sS",
        http,
        "--cacert",
        client.ca_bundle.to_str().context("utf-8 path")?,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{speed_download} %{http_version} %{time_total}",
        &format!("https://{host}{path}"),
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let (run, cpu): (Run, _) = measure_cpu(server_pid, || {
        client
            .run(&argv, Duration::from_secs(120))?
            .check(&format!("curl {http} {host}{path}"))
    })?;
    let out = run.stdout();
    let fields: Vec<&str> = out.split_whitespace().collect();
    ensure!(fields.len() == 5, "unexpected curl -w output: {out:?}");
    ensure!(fields[0] == "200", "curl {host}{path}: HTTP {}", fields[0]);
    let got: u64 = fields[1].parse()?;
    ensure!(
        got == size,
        "curl {host}{path}: {got} bytes, expected {size}"
    );
    Ok(Transfer {
        bytes_per_s: fields[2].parse()?,
        version: match fields[3] {
            "2" => "h2".into(),
            v => format!("HTTP/{v}"),
        },
        cipher: String::new(),
        chunk: 0,
        secs: fields[4].parse()?,
        client_cpu: cpu.client,
        server_cpu: cpu.server,
        others_cpu: cpu.others,
    })
}

/// Go's crypto/tls TLS 1.3 order on a CPU with AES instructions (containerd is a Go client).
const GO_CIPHER_ORDER: &[&str] = &[
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
];

/// How `probe_blob` runs the probe: HTTP/2, hash the body, offer these cipher suites (in
/// this order; empty: ring's default order).
struct ProbeOptions<'a> {
    http2: bool,
    sha256: bool,
    cipher_suites: &'a [&'a str],
}

/// `eddy-probe https-get` of a blob, from `client`'s cgroup (the probe joins it itself and
/// dials `connect`, which eddy's hook redirects), trusting `client`'s CA bundle. Checks the
/// status, the size and (with `sha256`) the digest.
fn probe_blob(
    probe: &Path,
    client: &Client,
    server_pid: Option<u32>,
    connect: SocketAddr,
    path: &str,
    options: ProbeOptions,
    size: u64,
) -> Result<Transfer> {
    let ProbeOptions {
        http2,
        sha256,
        cipher_suites,
    } = options;
    let mut cmd = Command::new(probe);
    cmd.args(["https-get", "--connect", &connect.to_string()])
        .args(["--sni", REGISTRY_HOST, "--path", path, "--cacert"])
        .arg(&client.ca_bundle)
        // eddy's trust gate terminates TLS only for a client whose trust roots hold its
        // CA: declare the probe's roots the way a Go or OpenSSL client would.
        .env("SSL_CERT_FILE", &client.ca_bundle)
        .env_remove("SSL_CERT_DIR");
    if let Some(cgroup) = &client.cgroup {
        cmd.arg("--join-cgroup").arg(cgroup);
    }
    if http2 {
        cmd.arg("--http2");
    }
    if sha256 {
        cmd.arg("--sha256");
    }
    if !cipher_suites.is_empty() {
        cmd.arg("--cipher-suites").arg(cipher_suites.join(","));
    }
    let (out, cpu) = measure_cpu(server_pid, || {
        run_bounded(&mut cmd, Duration::from_secs(150))
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let what = format!(
        "eddy-probe https-get{} {path}",
        if http2 { " --http2" } else { "" }
    );
    let report: HttpsGetReport = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "{what}: exit {}, no report: {stdout:?} (stderr: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(
        report.ok && out.status.success(),
        "{what} failed: {}",
        report.error.as_deref().unwrap_or("exit status")
    );
    ensure!(
        report.bytes == size,
        "{what}: {} bytes, expected {size}",
        report.bytes
    );
    ensure!(
        !sha256 || report.sha256_match == Some(true),
        "{what}: the digest was not checked"
    );
    let secs = report.elapsed_us as f64 / 1e6;
    Ok(Transfer {
        bytes_per_s: report.bytes as f64 / secs.max(1e-6),
        version: report.alpn.unwrap_or_else(|| "?".into()),
        cipher: report.cipher.unwrap_or_else(|| "?".into()),
        chunk: report.bytes / report.chunks.max(1),
        secs,
        client_cpu: cpu.client,
        server_cpu: cpu.server,
        others_cpu: cpu.others,
    })
}

/// The probe next to this binary (both are built into the same target directory), or
/// `EDDY_PROBE_BIN`.
fn probe_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("EDDY_PROBE_BIN") {
        return Ok(bin.into());
    }
    let bin = std::env::current_exe()?.with_file_name("eddy-probe");
    ensure!(
        bin.exists(),
        "{} not found (build with cargo build -p eddy-tests --bins)",
        bin.display()
    );
    Ok(bin)
}

/// One core's AES-128-GCM rate from `openssl speed`, bytes per second.
fn openssl_aes_gcm() -> Result<f64> {
    let out = run_bounded(
        Command::new("openssl").args([
            "speed",
            "-evp",
            "aes-128-gcm",
            "-seconds",
            "1",
            "-bytes",
            "16384",
        ]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "openssl speed failed");
    let text = String::from_utf8_lossy(&out.stdout);
    // The result line: "AES-128-GCM    4389936.32k" (1000s of bytes per second).
    let value = text
        .lines()
        .rev()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            let name = fields.next()?;
            let value = fields.next()?.strip_suffix('k')?;
            name.eq_ignore_ascii_case("aes-128-gcm")
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .with_context(|| format!("no aes-128-gcm figure in openssl speed output: {text}"))?;
    Ok(value * 1000.0)
}

struct Herd {
    upstream_bytes: u64,
    vm_hwm_kib: u64,
    max_rss_kib: u64,
    samples: u64,
    first_s: f64,
    last_s: f64,
    eddy_cpu: f64,
}

/// `n` cold pulls of one image at once through a fresh eddy; samples eddy's RSS meanwhile.
fn herd(env: &Env, n: usize, reference: &str) -> Result<Herd> {
    let (eddy, client) = env.start_eddy("eddy-herd")?;
    progress(format!("starting {n} containerd daemons"));
    let daemons: Vec<Containerd> = (0..n).map(|_| Containerd::start()).collect::<Result<_>>()?;
    let sent_before = env.upstream_sent()?;
    let cpu_before = cpu_seconds(eddy.pid());
    progress(format!("{n} concurrent cold pulls through eddy"));
    let started = Instant::now();
    let mut pulls = Vec::new();
    for (i, daemon) in daemons.iter().enumerate() {
        let argv = daemon.ctr_args(NS, &["content", "fetch", reference]);
        let log = env.work.path().join(format!("herd-{i}.log"));
        pulls.push((client.spawn(&argv, &log)?, log, None::<f64>));
    }
    let (mut max_rss_kib, mut samples) = (0, 0);
    let deadline = started + PULL_TIMEOUT;
    loop {
        if let Some(rss) = status_kib(eddy.pid(), "VmRSS") {
            max_rss_kib = max_rss_kib.max(rss);
            samples += 1;
        }
        let mut running = 0;
        for (pull, _, done) in pulls.iter_mut() {
            if done.is_none() {
                if pull.try_wait()?.is_some() {
                    *done = Some(started.elapsed().as_secs_f64());
                } else {
                    running += 1;
                }
            }
        }
        if running == 0 || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let mut failures = Vec::new();
    for (i, (pull, log, _)) in pulls.iter_mut().enumerate() {
        let ok = matches!(pull.try_wait()?, Some(s) if s.success());
        if !ok {
            failures.push(format!(
                "pull {i}: {}",
                fs::read_to_string(&log).unwrap_or_default().trim()
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "concurrent pulls failed (or timed out):\n{}\neddy log:\n{}",
        failures.join("\n"),
        eddy.log_tail(30)
    );
    for daemon in &daemons {
        daemon.ensure_content(NS, &env.image.blobs())?;
    }
    let vm_hwm_kib = status_kib(eddy.pid(), "VmHWM").context("reading eddy's VmHWM")?;
    let eddy_cpu = cpu_seconds(eddy.pid()) - cpu_before;
    let times: Vec<f64> = pulls.iter().filter_map(|(_, _, t)| *t).collect();
    drop(daemons);
    env.settle();
    let upstream_bytes = env.upstream_sent()? - sent_before;
    eddy.stop_quietly();
    let herd = Herd {
        upstream_bytes,
        vm_hwm_kib,
        max_rss_kib,
        samples,
        first_s: times.iter().copied().fold(f64::MAX, f64::min),
        last_s: times.iter().copied().fold(0.0, f64::max),
        eddy_cpu,
    };
    progress(format!(
        "{n} concurrent pulls: all done by {:.2} s; upstream sent {:.1} MiB; eddy VmHWM {:.1} MiB, \
         max sampled VmRSS {:.1} MiB",
        herd.last_s,
        mib(herd.upstream_bytes),
        herd.vm_hwm_kib as f64 / 1024.0,
        herd.max_rss_kib as f64 / 1024.0
    ));
    Ok(herd)
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Busy CPU seconds of the whole machine since boot, over all CPUs (/proc/stat).
fn machine_cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / hz
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// CPU seconds of every reaped child of this process so far.
fn children_cpu_seconds() -> f64 {
    rusage_cpu_seconds(libc::RUSAGE_CHILDREN)
}

/// Where the CPU time went while one client ran.
struct CpuSplit {
    /// The client: this process's children reaped meanwhile.
    client: f64,
    /// The server, when its pid is known.
    server: Option<f64>,
    /// The rest of the machine (all CPU time less the client's and the server's).
    others: Option<f64>,
}

/// Run the client `run`, and split the CPU time the machine spent meanwhile.
fn measure_cpu<T>(
    server_pid: Option<u32>,
    run: impl FnOnce() -> Result<T>,
) -> Result<(T, CpuSplit)> {
    let server_before = server_pid.map(cpu_seconds);
    let children_before = children_cpu_seconds();
    let machine_before = machine_cpu_seconds();
    let out = run()?;
    let machine = machine_cpu_seconds() - machine_before;
    let client = children_cpu_seconds() - children_before;
    let server = server_pid
        .map(cpu_seconds)
        .zip(server_before)
        .map(|(a, b)| a - b);
    let others = server.map(|server| (machine - server - client).max(0.0));
    Ok((
        out,
        CpuSplit {
            client,
            server,
            others,
        },
    ))
}

/// The pid of a harness containerd: the process whose command line names its config,
/// which sits beside its socket.
fn containerd_pid(containerd: &Containerd) -> Option<u32> {
    let config = containerd.socket.parent()?.join("config.toml");
    let config = config.to_str()?.as_bytes().to_vec();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        (args.first().is_some_and(|a| a.ends_with(b"containerd"))
            && args.contains(&config.as_slice()))
        .then_some(pid)
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn mib(n: u64) -> f64 {
    n as f64 / MIB as f64
}
