//! End-to-end tests of eddy's caching registry proxy with real programs: docker-registry
//! (distribution 2.8.2) as the upstream in a network namespace, skopeo to push, containerd
//! 1.6 + ctr to pull from inside the hooked cgroup, curl for raw requests. No hosts.toml:
//! ctr believes it talks to registry.test; the connect hook sends it to eddy.
//!
//! Upstream bytes are counted from the registry's own log (and the CDN's), not only from
//! eddy's metrics.
//!
//! Run as root: `EDDY_BIN=target/release/eddy cargo test -p eddy-tests --release --test
//! registry_e2e -- --test-threads=1 --nocapture` (or `cargo xtask test`).
use std::{
    ffi::OsString,
    fs,
    io::Write as _,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use eddy_tests::{
    containerd::{header, http_status, Client, Containerd},
    eddy::eddy_bin,
    netns::Netns,
    oci::{Blob, Image, ImageSpec},
    pki::Pki,
    process::ProcessGuard,
    registry::{shape_link, Served, Upstream, UpstreamOptions, CDN_HOST, REGISTRY_HOST},
    registry_eddy::{
        ca_export, connections_series, files_under, requests_series, store_has, verify_store,
        RegistryEddy, INFLIGHT_FETCHES, STALE_MANIFESTS, STORE_BYTES,
    },
    require_privileges,
    token_auth::{Grants, SigningKey, TokenRequest, TokenServer, AUTH_HOST, TOKEN_SERVICE},
    world::{RegistryWorld, WorldSpec},
    MIB,
};
use sha2::{Digest as _, Sha256};

const PULL_TIMEOUT: Duration = Duration::from_secs(120);
const NS: &str = "e2e";

/// One test's world (see [`WorldSpec`]) and the requests this harness makes in it. The
/// world's fields and methods are the setup's own.
struct Setup {
    world: RegistryWorld,
}

impl Deref for Setup {
    type Target = RegistryWorld;

    fn deref(&self) -> &RegistryWorld {
        &self.world
    }
}

impl DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut RegistryWorld {
        &mut self.world
    }
}

impl Setup {
    fn start(spec: WorldSpec) -> Result<Self> {
        Ok(Self {
            world: spec.start()?,
        })
    }

    /// The harness's upstream serving as `options` say, without eddy: a baseline.
    fn without_eddy(options: UpstreamOptions) -> Result<Self> {
        Self::start(WorldSpec::new().upstream(options).without_eddy())
    }

    /// Write an image layout and push it as registry.test/<repo>:<tag>.
    fn image(&self, repo: &str, tag: &str, spec: &ImageSpec) -> Result<Image> {
        let start = Instant::now();
        let image = self.world.image(repo, tag, spec)?;
        println!(
            "image {repo}:{tag}: {} blobs, {:.1} MiB (written and pushed in {:.2?})",
            image.blobs().len(),
            mib(image.total_bytes()),
            start.elapsed()
        );
        Ok(image)
    }

    fn served(&self) -> Result<Served> {
        self.upstream.served()
    }

    fn upstream_bytes(&self) -> Result<u64> {
        self.eddy().upstream_bytes()
    }

    /// A curl through eddy from inside the cgroup: GET (or with `extra`) a registry path.
    fn curl(&self, path: &str, extra: &[&str], name: &str) -> Result<CurlResult> {
        self.curl_url(&format!("https://{REGISTRY_HOST}{path}"), extra, name)
    }

    /// As [`Setup::curl`], for any URL.
    fn curl_url(&self, url: &str, extra: &[&str], name: &str) -> Result<CurlResult> {
        let body = self.work.path().join(format!("{name}.body"));
        let headers = self.work.path().join(format!("{name}.headers"));
        let mut args = vec![
            "--cacert",
            self.client.ca_bundle.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let run = self
            .client
            .curl(url, &args, &body, &headers, Duration::from_secs(90))?;
        let headers = fs::read_to_string(&headers).unwrap_or_default();
        ensure!(
            run.ok(),
            "curl {url} {extra:?} failed: {}\nheaders: {headers}",
            run.stderr()
        );
        Ok(CurlResult {
            status: http_status(&headers).context("no HTTP status in curl's header dump")?,
            body: fs::read(&body).unwrap_or_default(),
            headers,
            elapsed: run.elapsed,
        })
    }
}

/// A curl through eddy running in the background.
struct BackgroundCurl {
    process: ProcessGuard,
    body: PathBuf,
    headers: PathBuf,
    log: PathBuf,
    started: Instant,
}

impl Setup {
    fn curl_background(&self, path: &str, extra: &[&str], name: &str) -> Result<BackgroundCurl> {
        let body = self.work.path().join(format!("{name}.body"));
        let headers = self.work.path().join(format!("{name}.headers"));
        let log = self.work.path().join(format!("{name}.log"));
        let mut argv: Vec<OsString> = ["curl", "-sS", "--http1.1", "--cacert"]
            .map(OsString::from)
            .to_vec();
        argv.push(self.client.ca_bundle.clone().into());
        argv.extend([
            "-o".into(),
            body.clone().into(),
            "-D".into(),
            headers.clone().into(),
        ]);
        argv.extend(extra.iter().map(OsString::from));
        argv.push(format!("https://{REGISTRY_HOST}{path}").into());
        let started = Instant::now();
        let process = self.client.spawn(&argv, &log)?;
        Ok(BackgroundCurl {
            process,
            body,
            headers,
            log,
            started,
        })
    }
}

impl BackgroundCurl {
    /// Body bytes received so far.
    fn received(&self) -> u64 {
        fs::metadata(&self.body).map(|m| m.len()).unwrap_or(0)
    }

    /// Wait (bounded) for curl to finish well.
    fn finish(mut self, timeout: Duration) -> Result<CurlResult> {
        let status = self.process.wait_timeout(timeout)?;
        let headers = fs::read_to_string(&self.headers).unwrap_or_default();
        ensure!(
            matches!(status, Some(s) if s.success()),
            "background curl ended with {status:?}: {}\nheaders: {headers}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        Ok(CurlResult {
            status: http_status(&headers).context("no HTTP status in curl's header dump")?,
            body: fs::read(&self.body)?,
            headers,
            elapsed: self.started.elapsed(),
        })
    }
}

struct CurlResult {
    status: u16,
    headers: String,
    body: Vec<u8>,
    elapsed: Duration,
}

fn setup(options: UpstreamOptions) -> Option<Setup> {
    let world = WorldSpec::new().upstream(options).start_if_privileged()?;
    Some(Setup { world })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn reference(repo: &str, tag: &str) -> String {
    format!("{REGISTRY_HOST}/{repo}:{tag}")
}

/// Every blob is in eddy's store, and every store file hashes to its name.
fn assert_store(setup: &Setup, blobs: &[Blob]) -> Result<()> {
    let report = verify_store(&setup.eddy_config.data_dir)?;
    for blob in blobs {
        ensure!(
            store_has(&setup.eddy_config.data_dir, &blob.digest),
            "eddy's store lacks {} ({})",
            blob.digest,
            blob.media_type
        );
    }
    println!(
        "eddy store: {} files, {:.1} MiB, all hash to their names",
        report.files,
        mib(report.bytes)
    );
    Ok(())
}

/// Files under `dir` that are not finished store blobs or the CA (partial fills, temp files),
/// with their sizes.
fn other_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut found: Vec<(String, u64)> = files_under(dir)
        .into_iter()
        .filter_map(|path| {
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            let finished = rel.starts_with("store/blobs/sha256/") || rel.starts_with("ca/");
            let size = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            (!finished).then_some((rel, size))
        })
        .collect();
    found.sort();
    found
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A baseline and a harness check that needs no eddy: registry, skopeo push, and a direct
/// `ctr images pull` from the (unhooked) cgroup. Its numbers are what eddy is compared to.
#[test]
fn baseline_direct_pull_without_eddy() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let setup = Setup::without_eddy(UpstreamOptions::default())?;
    let image = setup.image(
        "baseline/app",
        "v1",
        &ImageSpec::single(&[24 * MIB, 8 * MIB]),
    )?;
    let containerd = Containerd::start()?;
    let run = setup
        .client
        .pull(
            &containerd,
            NS,
            &reference("baseline/app", "v1"),
            &[],
            PULL_TIMEOUT,
        )?
        .check("direct ctr images pull")?;
    let served = setup.served()?;
    println!(
        "direct pull (no eddy): {:.2?}; registry sent {:.1} MiB in {} blob GETs",
        run.elapsed,
        mib(served.bytes()),
        served.blob_gets
    );
    containerd.ensure_content(NS, &image.blobs())?;
    ensure!(
        served.blob_bytes >= image.layers().iter().map(|b| b.size).sum::<u64>(),
        "the registry log does not account for the layers: {served:?}"
    );
    Ok(())
}

/// The harness's CDN without eddy: a client that can resolve cdn.test follows the 307s
/// itself and the CDN's log accounts for the layers.
#[test]
fn baseline_redirected_pull_without_eddy() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let setup = Setup::without_eddy(UpstreamOptions {
        redirect_to_cdn: true,
        ..Default::default()
    })?;
    let image = setup.image("baseline/cdn", "v1", &ImageSpec::single(&[8 * MIB, MIB]))?;
    let hosts = setup.work.path().join("hosts.with-cdn");
    Client::write_hosts(&hosts, setup.netns.ns_v4, &[REGISTRY_HOST, CDN_HOST])?;
    let client = Client {
        hosts,
        ..setup.client.clone()
    };
    let containerd = Containerd::start()?;
    let run = client
        .fetch(
            &containerd,
            NS,
            &reference("baseline/cdn", "v1"),
            &[],
            PULL_TIMEOUT,
        )?
        .check("direct ctr content fetch following 307s")?;
    let served = setup.served()?;
    let cdn_bytes = setup.upstream.cdn_bytes()?;
    println!(
        "direct redirected pull: {:.2?}; registry: {} redirects; CDN sent {:.1} MiB",
        run.elapsed,
        served.redirects,
        mib(cdn_bytes)
    );
    containerd.ensure_content(NS, &image.blobs())?;
    let layer_bytes: u64 = image.layers().iter().map(|b| b.size).sum();
    ensure!(
        served.redirects >= 2 && cdn_bytes >= layer_bytes,
        "the 307s did not go through the CDN: {served:?}, CDN bytes {cdn_bytes}"
    );
    Ok(())
}

/// The harness's Basic-auth registry and curl client without eddy: pulls need the
/// credentials, and the registry answers `Range: bytes=N-` with 206.
#[test]
fn baseline_private_and_range_without_eddy() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let setup = Setup::without_eddy(UpstreamOptions {
        basic_auth: Some(("bob".into(), "pw".into())),
        ..Default::default()
    })?;
    let image = setup.image("baseline/private", "v1", &ImageSpec::single(&[4 * MIB]))?;
    let reference = reference("baseline/private", "v1");
    let containerd = Containerd::start()?;
    let denied = setup
        .client
        .fetch(&containerd, NS, &reference, &[], PULL_TIMEOUT)?;
    ensure!(!denied.ok(), "a fetch without credentials succeeded");
    setup
        .client
        .fetch(
            &containerd,
            NS,
            &reference,
            &["--user", "bob:pw"],
            PULL_TIMEOUT,
        )?
        .check("direct ctr content fetch with credentials")?;
    containerd.ensure_content(NS, &image.blobs())?;

    let layer = image.largest_layer();
    let data = image.read_blob(&layer)?;
    let path = format!("/v2/baseline/private/blobs/{}", layer.digest);
    let unauth = setup.curl(&path, &[], "direct-unauth")?;
    ensure!(
        unauth.status == 401,
        "direct, no credentials: HTTP {}",
        unauth.status
    );
    let offset = 1_000_000;
    let res = setup.curl(
        &path,
        &["-u", "bob:pw", "-H", &format!("Range: bytes={offset}-")],
        "direct-range",
    )?;
    check_range(&res, offset, &data)?;
    println!(
        "direct Range request: HTTP {} in {:.2?}",
        res.status, res.elapsed
    );
    Ok(())
}

/// 1. A cold pull fills eddy's store; a second containerd (empty content store) then pulls
///    the same tag without one byte from upstream.
#[test]
fn warm_pull_reads_nothing_from_upstream() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let repo = "warm/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[24 * MIB, 8 * MIB, MIB]))?;
    cold_then_warm(&setup, &reference(repo, "v1"), &[], &image, "registry_tls")
}

/// 2. A multi-arch index: all platforms cold, then one platform warm from a fresh content
///    store.
#[test]
fn multi_arch_index() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let repo = "multi/app";
    let image = setup.image(
        repo,
        "v2",
        &ImageSpec::multi_arch(&[12 * MIB, 4 * MIB], &["linux/amd64", "linux/arm64"]),
    )?;
    let reference = reference(repo, "v2");

    let all_ctd = Containerd::start()?;
    let all = setup
        .client
        .fetch(&all_ctd, NS, &reference, &["--all-platforms"], PULL_TIMEOUT)?
        .check("ctr content fetch --all-platforms through eddy")?;
    let served = setup.served()?;
    println!(
        "all platforms: {:.2?}; registry sent {:.1} MiB for a {:.1} MiB index",
        all.elapsed,
        mib(served.bytes()),
        mib(image.total_bytes())
    );
    all_ctd.ensure_content(NS, &image.blobs())?;
    ensure!(
        served.bytes() as f64 <= image.total_bytes() as f64 * 1.02,
        "upstream sent {} bytes for a {}-byte index",
        served.bytes(),
        image.total_bytes()
    );

    let arm_ctd = Containerd::start()?;
    let arm = setup
        .client
        .pull(
            &arm_ctd,
            NS,
            &reference,
            &["--platform", "linux/arm64"],
            PULL_TIMEOUT,
        )?
        .check("warm ctr images pull --platform linux/arm64 through eddy")?;
    let after = setup.served()?;
    println!(
        "arm64 warm pull: {:.2?}; registry sent {} more bytes",
        arm.elapsed,
        after.bytes() - served.bytes()
    );
    let arm64 = image
        .platforms
        .iter()
        .find(|p| p.platform == "linux/arm64")
        .expect("arm64 is in the spec");
    let mut wanted = vec![image.top.clone()];
    wanted.extend(arm64.blobs());
    arm_ctd.ensure_content(NS, &wanted)?;
    ensure!(
        after.bytes() == served.bytes(),
        "the warm arm64 pull read from upstream: before {served:?}, after {after:?}"
    );
    assert_store(&setup, &image.blobs())
}

/// 3. Blob GETs answered 307 to a CDN host that ctr cannot even resolve: eddy follows the
///    redirect itself, so the pull succeeds and the CDN's log shows eddy fetched the layers.
#[test]
fn redirect_to_cdn_is_followed_by_eddy() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions {
        redirect_to_cdn: true,
        ..Default::default()
    }) else {
        return Ok(());
    };
    let repo = "cdn/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[16 * MIB, 4 * MIB]))?;
    let reference = reference(repo, "v1");

    let containerd = Containerd::start()?;
    let run = setup
        .client
        .fetch(&containerd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("ctr content fetch through eddy of a redirected image")?;
    let served = setup.served()?;
    let cdn_bytes = setup.upstream.cdn_bytes()?;
    println!(
        "redirected pull: {:.2?}; registry: {} redirects, {} direct blob bytes; CDN sent {:.1} MiB in {} GETs",
        run.elapsed,
        served.redirects,
        served.blob_bytes,
        mib(cdn_bytes),
        setup.upstream.cdn_gets()
    );
    containerd.ensure_content(NS, &image.blobs())?;
    let layer_bytes: u64 = image.layers().iter().map(|b| b.size).sum();
    ensure!(
        served.redirects >= image.layers().len() as u64,
        "the registry did not redirect the layer GETs: {served:?}"
    );
    ensure!(
        cdn_bytes >= layer_bytes && cdn_bytes as f64 <= image.total_bytes() as f64 * 1.02,
        "the CDN sent {cdn_bytes} bytes for {layer_bytes} layer bytes"
    );
    assert_store(&setup, &image.blobs())?;

    // The control: the same pull without eddy (from outside the hooked cgroup) cannot
    // follow the 307, because ctr cannot resolve the CDN. So the 307 never reached ctr above.
    let direct = Client {
        cgroup: None,
        ..setup.client.clone()
    };
    let other = Containerd::start()?;
    let run = direct.fetch(&other, NS, &reference, &[], Duration::from_secs(60))?;
    println!(
        "control, direct without eddy: ok={} after {:.2?}: {}",
        run.ok(),
        run.elapsed,
        run.stderr().lines().last().unwrap_or("")
    );
    ensure!(
        !run.ok(),
        "a direct ctr fetch followed the 307 to {CDN_HOST}, so the control proves nothing"
    );
    Ok(())
}

/// 3b. The CDN sends blobs chunked, without a Content-Length: eddy streams them to ctr as
///     they arrive and caches them; a warm pull reads nothing from the CDN.
#[test]
fn redirect_to_a_cdn_without_content_length() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions {
        redirect_to_cdn: true,
        cdn_chunked: true,
        ..Default::default()
    }) else {
        return Ok(());
    };
    let repo = "chunked/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[12 * MIB, 3 * MIB]))?;
    let reference = reference(repo, "v1");

    let cold_ctd = Containerd::start()?;
    let cold = setup
        .client
        .fetch(&cold_ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("cold ctr content fetch through eddy from a chunked CDN")?;
    let cdn_cold = setup.upstream.cdn_bytes()?;
    println!(
        "cold fetch from a chunked CDN: {:.2?}; CDN sent {:.1} MiB",
        cold.elapsed,
        mib(cdn_cold)
    );
    cold_ctd.ensure_content(NS, &image.blobs())?;
    assert_store(&setup, &image.blobs())?;

    let warm_ctd = Containerd::start()?;
    let warm = setup
        .client
        .fetch(&warm_ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("warm ctr content fetch through eddy")?;
    let cdn_warm = setup.upstream.cdn_bytes()?;
    println!(
        "warm fetch: {:.2?}; CDN sent {} more bytes",
        warm.elapsed,
        cdn_warm - cdn_cold
    );
    warm_ctd.ensure_content(NS, &image.blobs())?;
    ensure!(
        cdn_warm == cdn_cold,
        "the warm fetch read {} bytes from the CDN",
        cdn_warm - cdn_cold
    );
    Ok(())
}

/// 4. A Basic-auth repository: after an authorised pull filled the cache, requests without
///    valid credentials get 401 and no content; valid ones get the content from the cache.
#[test]
fn private_content_needs_valid_credentials() -> Result<()> {
    let (user, password) = ("alice", "s3cret-pw");
    let Some(setup) = setup(UpstreamOptions {
        basic_auth: Some((user.into(), password.into())),
        ..Default::default()
    }) else {
        return Ok(());
    };
    let repo = "private/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[8 * MIB, 2 * MIB]))?;
    let reference = reference(repo, "v1");
    let creds = format!("{user}:{password}");

    let first = Containerd::start()?;
    let run = setup
        .client
        .fetch(&first, NS, &reference, &["--user", &creds], PULL_TIMEOUT)?
        .check("authorised ctr content fetch through eddy")?;
    println!("authorised cold pull: {:.2?}", run.elapsed);
    first.ensure_content(NS, &image.blobs())?;
    assert_store(&setup, &image.blobs())?;

    let layer = image.largest_layer();
    let blob_path = format!("/v2/{repo}/blobs/{}", layer.digest);
    let manifest_path = format!("/v2/{repo}/manifests/{}", image.top.digest);
    let store_before = setup.eddy().metric(STORE_BYTES)? as u64;
    let bad_user = format!("{user}:wrong");
    let attempts: [(&str, &str, Vec<&str>); 6] = [
        ("no credentials, blob", blob_path.as_str(), vec![]),
        ("no credentials, blob HEAD", blob_path.as_str(), vec!["-I"]),
        (
            "wrong password, blob",
            blob_path.as_str(),
            vec!["-u", bad_user.as_str()],
        ),
        ("no credentials, manifest", manifest_path.as_str(), vec![]),
        (
            "wrong password, manifest",
            manifest_path.as_str(),
            vec!["-u", bad_user.as_str()],
        ),
        (
            "no credentials, manifest by tag",
            "/v2/private/app/manifests/v1",
            vec!["-H", "Accept: application/vnd.oci.image.manifest.v1+json"],
        ),
    ];
    let layer_bytes = image.read_blob(&layer)?;
    let sample = &layer_bytes[1024..1040];
    for (i, (what, path, extra)) in attempts.iter().enumerate() {
        let res = setup.curl(path, extra, &format!("unauth-{i}"))?;
        println!(
            "{what}: HTTP {} with {} body bytes in {:.2?}",
            res.status,
            res.body.len(),
            res.elapsed
        );
        ensure!(
            res.status == 401,
            "{what}: expected 401, got {}\n{}",
            res.status,
            res.headers
        );
        ensure!(
            res.body.len() < 4096 && !res.body.windows(16).any(|w| w == sample),
            "{what}: the 401 carried content ({} bytes)",
            res.body.len()
        );
    }
    let store_after = setup.eddy().metric(STORE_BYTES)? as u64;
    ensure!(
        store_after == store_before,
        "eddy served {} bytes from its store to clients without valid credentials",
        store_after - store_before
    );

    let ok = setup.curl(&blob_path, &["-u", &creds], "auth-blob")?;
    ensure!(
        ok.status == 200,
        "valid credentials: expected 200, got {}\n{}",
        ok.status,
        ok.headers
    );
    ensure!(
        sha256_hex(&ok.body) == layer.hex(),
        "valid credentials: the body ({} bytes) is not the blob",
        ok.body.len()
    );
    println!(
        "valid credentials, blob: HTTP 200, {:.1} MiB in {:.2?}",
        mib(ok.body.len() as u64),
        ok.elapsed
    );

    let before = setup.served()?;
    let second = Containerd::start()?;
    let run = setup
        .client
        .fetch(&second, NS, &reference, &["--user", &creds], PULL_TIMEOUT)?
        .check("second authorised ctr content fetch through eddy")?;
    let after = setup.served()?;
    println!(
        "authorised warm pull: {:.2?}; registry sent {} more blob bytes",
        run.elapsed,
        after.blob_bytes - before.blob_bytes
    );
    second.ensure_content(NS, &image.blobs())?;
    ensure!(
        after.blob_bytes == before.blob_bytes,
        "the authorised warm pull fetched blobs upstream: {before:?} → {after:?}"
    );
    Ok(())
}

/// 5. `Range: bytes=N-` through eddy: while the blob is still coming from a slow upstream
///    (offsets already fetched and not yet fetched), and from the store afterwards.
#[test]
fn range_requests_while_downloading_and_cached() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let repo = "range/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[40 * MIB]))?;
    let layer = image.largest_layer();
    let data = image.read_blob(&layer)?;
    let size = layer.size;
    let path = format!("/v2/{repo}/blobs/{}", layer.digest);

    // 50 Mbit/s: the 40 MiB blob takes about 7 s to come from upstream.
    shape_link(&setup.netns, Some("50mbit"))?;
    let started = Instant::now();
    let full = setup.curl_background(&path, &[], "full")?;

    // Wait (bounded) until the client has received a little: the fetch is under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    while full.received() < 2 * MIB && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let got = full.received();
    ensure!(
        got >= 2 * MIB,
        "the full GET received only {got} bytes in 20 s; eddy log:\n{}",
        setup.eddy().log_tail(30)
    );
    println!(
        "after {:.2?}: the full GET has {:.1} MiB; eddy: upstream bytes {:.1} MiB, {} fetches in flight",
        started.elapsed(),
        mib(got),
        mib(setup.upstream_bytes()?),
        setup.eddy().metric(INFLIGHT_FETCHES)?
    );

    // Both ranges start now, together, while the blob is still arriving.
    let offsets = [
        ("behind the download", MIB),
        ("ahead of the download", size * 3 / 4),
    ];
    let mut ranges = Vec::new();
    for (label, offset) in offsets {
        let range = format!("Range: bytes={offset}-");
        ranges.push((
            label,
            offset,
            setup.curl_background(&path, &["-H", &range], &format!("range-{offset}"))?,
        ));
    }
    let progress = full.received();
    ensure!(
        progress < size / 2,
        "the blob came too fast ({progress} bytes already) to test ranges during the download"
    );
    for (label, offset, curl) in ranges {
        let res = curl.finish(Duration::from_secs(90))?;
        println!(
            "Range bytes={offset}- ({label}; issued when the full GET had {:.1} MiB): HTTP {} {:.1} MiB in {:.2?}",
            mib(progress),
            res.status,
            mib(res.body.len() as u64),
            res.elapsed
        );
        check_range(&res, offset, &data)?;
    }
    let full = full.finish(Duration::from_secs(90))?;
    println!(
        "full GET: HTTP {} {:.1} MiB in {:.2?}",
        full.status,
        mib(full.body.len() as u64),
        full.elapsed
    );
    ensure!(
        full.status == 200,
        "the full GET: HTTP {}\n{}",
        full.status,
        full.headers
    );
    ensure!(
        sha256_hex(&full.body) == layer.hex(),
        "the full GET's body is not the blob"
    );
    shape_link(&setup.netns, None)?;

    // Now from the store (wait for the fill to land; bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store_has(&setup.eddy_config.data_dir, &layer.digest) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let offset = 12_345;
    let res = setup.curl(
        &path,
        &["-H", &format!("Range: bytes={offset}-")],
        "range-cached",
    )?;
    println!(
        "Range bytes={offset}- from the store: HTTP {} {:.1} MiB in {:.2?}",
        res.status,
        mib(res.body.len() as u64),
        res.elapsed
    );
    check_range(&res, offset, &data)?;

    let served = setup.served()?;
    println!(
        "registry sent {:.1} MiB in {} blob GETs for the {:.1} MiB blob",
        mib(served.blob_bytes),
        served.blob_gets,
        mib(size)
    );
    ensure!(
        served.blob_bytes as f64 <= size as f64 * 1.02,
        "upstream sent {} bytes for one {size}-byte blob",
        served.blob_bytes
    );
    assert_store(&setup, &[layer])
}

fn check_range(res: &CurlResult, offset: u64, data: &[u8]) -> Result<()> {
    let size = data.len() as u64;
    ensure!(
        res.status == 206,
        "Range bytes={offset}-: expected 206, got {}\n{}",
        res.status,
        res.headers
    );
    let expected = format!("bytes {offset}-{}/{size}", size - 1);
    let got = header(&res.headers, "Content-Range");
    ensure!(
        got.as_deref() == Some(expected.as_str()),
        "Range bytes={offset}-: Content-Range {got:?}, expected {expected:?}"
    );
    let length = header(&res.headers, "Content-Length");
    ensure!(
        length.as_deref() == Some((size - offset).to_string().as_str()),
        "Range bytes={offset}-: Content-Length {length:?}, expected {}",
        size - offset
    );
    ensure!(
        res.body.len() as u64 == size - offset && res.body == data[offset as usize..],
        "Range bytes={offset}-: {} body bytes, not the blob's bytes from {offset}",
        res.body.len()
    );
    Ok(())
}

/// 5b. containerd's own resume: ctr is killed mid-layer, leaving a partial ingest; the
///     retried pull asks eddy for `Range: bytes=N-` and completes. The fill eddy started
///     goes on without the client, so upstream still sends the layer once.
#[test]
fn containerd_resumes_interrupted_pull_with_range() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let repo = "resume/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[32 * MIB]))?;
    let reference = reference(repo, "v1");
    let layer = image.largest_layer();

    shape_link(&setup.netns, Some("50mbit"))?;
    let containerd = Containerd::start()?;
    let argv = containerd.ctr_args(NS, &["content", "fetch", &reference]);
    let started = Instant::now();
    let mut pull = setup
        .client
        .spawn(&argv, &setup.work.path().join("interrupted.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while containerd.ingest_bytes() < 8 * MIB && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let ingested = containerd.ingest_bytes();
    pull.kill_and_wait()?;
    println!(
        "killed ctr after {:.2?} with {:.1} MiB of the {:.1} MiB layer in containerd's ingest",
        started.elapsed(),
        mib(ingested),
        mib(layer.size)
    );
    ensure!(
        ingested >= 8 * MIB && ingested < layer.size,
        "containerd had {ingested} bytes of the {}-byte layer when ctr was to be killed",
        layer.size
    );

    let retry = setup
        .client
        .fetch(&containerd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("retried ctr content fetch (resuming its ingest)")?;
    shape_link(&setup.netns, None)?;
    containerd.ensure_content(NS, &image.blobs())?;
    // Let the fill finish landing in the store (bounded), then count upstream bytes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store_has(&setup.eddy_config.data_dir, &layer.digest) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let served = setup.served()?;
    println!(
        "resumed pull: {:.2?}; registry sent {:.1} MiB in {} blob GETs for the {:.1} MiB image; \
         eddy blob requests: store {}, upstream {}",
        retry.elapsed,
        mib(served.bytes()),
        served.blob_gets,
        mib(image.total_bytes()),
        setup.eddy().metric(&requests_series("blob", "store"))?,
        setup.eddy().metric(&requests_series("blob", "upstream"))?
    );
    ensure!(
        served.bytes() as f64 <= image.total_bytes() as f64 * 1.02,
        "upstream sent {} bytes for a {}-byte image pulled once with a resume",
        served.bytes(),
        image.total_bytes()
    );
    assert_store(&setup, &image.blobs())
}

/// 6. Eight cold pulls of one image at once (eight containerd daemons): all succeed, and
///    upstream sends the image about once.
#[test]
fn concurrent_cold_pulls_fetch_once() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let repo = "herd/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[24 * MIB, 8 * MIB]))?;
    let reference = reference(repo, "v1");
    let started = Instant::now();
    let daemons: Vec<Containerd> = (0..8).map(|_| Containerd::start()).collect::<Result<_>>()?;
    println!("8 containerd daemons up in {:.2?}", started.elapsed());

    // 200 Mbit/s: slow enough that all eight are in flight together.
    shape_link(&setup.netns, Some("200mbit"))?;
    let started = Instant::now();
    let mut pulls = Vec::new();
    for (i, daemon) in daemons.iter().enumerate() {
        let argv = daemon.ctr_args(NS, &["content", "fetch", &reference]);
        let log = setup.work.path().join(format!("pull-{i}.log"));
        pulls.push((setup.client.spawn(&argv, &log)?, log));
    }
    let mut failures = Vec::new();
    for (i, (pull, log)) in pulls.iter_mut().enumerate() {
        let left = PULL_TIMEOUT.saturating_sub(started.elapsed());
        let status = pull.wait_timeout(left)?;
        let elapsed = started.elapsed();
        let ok = matches!(status, Some(s) if s.success());
        println!("pull {i}: ok={ok} by {elapsed:.2?}");
        if !ok {
            failures.push(format!(
                "pull {i}: {status:?}\n{}",
                fs::read_to_string(log).unwrap_or_default()
            ));
        }
    }
    shape_link(&setup.netns, None)?;
    let served = setup.served()?;
    println!(
        "8 concurrent pulls: {:.2?}; registry sent {:.1} MiB ({} blob GETs, {} manifest GETs) \
         for a {:.1} MiB image ({:.3}×); eddy upstream bytes {:.1} MiB",
        started.elapsed(),
        mib(served.bytes()),
        served.blob_gets,
        served.manifest_gets,
        mib(image.total_bytes()),
        served.bytes() as f64 / image.total_bytes() as f64,
        mib(setup.upstream_bytes()?)
    );
    println!(
        "manifest requests upstream (excluding the push):\n  {}",
        setup
            .upstream
            .manifest_requests()
            .into_iter()
            .filter(|r| !r.starts_with("PUT"))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    ensure!(
        failures.is_empty(),
        "failed pulls:\n{}",
        failures.join("\n")
    );
    for daemon in &daemons {
        daemon.ensure_content(NS, &image.blobs())?;
    }
    ensure!(
        served.bytes() as f64 <= image.total_bytes() as f64 * 1.02,
        "upstream sent {} bytes for a {}-byte image pulled 8 times at once",
        served.bytes(),
        image.total_bytes()
    );
    assert_store(&setup, &image.blobs())?;
    // Docker Hub counts every manifest GET as a pull: one digest, one upstream GET.
    let mut gets = std::collections::BTreeMap::<String, u32>::new();
    for request in setup.upstream.manifest_requests() {
        if request.starts_with("GET ") && request.contains("/manifests/sha256:") {
            *gets.entry(request).or_default() += 1;
        }
    }
    ensure!(
        gets.values().all(|n| *n <= 1),
        "eddy fetched a manifest by digest more than once upstream for 8 concurrent pulls \
         (no single-flight for manifests): {gets:?}"
    );
    Ok(())
}

/// 7. After a warm-up pull, the upstream registry dies; a pull by tag from a fresh content
///    store still works (last known tag, content from the store).
#[test]
fn pull_by_tag_survives_upstream_outage() -> Result<()> {
    let Some(mut setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let repo = "outage/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[8 * MIB, 2 * MIB]))?;
    let reference = reference(repo, "v1");

    let first = Containerd::start()?;
    setup
        .client
        .pull(&first, NS, &reference, &[], PULL_TIMEOUT)?
        .check("warm-up ctr images pull through eddy")?;

    setup.upstream.stop_registry()?;
    let second = Containerd::start()?;
    let run = setup
        .client
        .pull(&second, NS, &reference, &[], PULL_TIMEOUT)?
        .check("ctr images pull by tag with upstream down")?;
    let stale = setup.eddy().metric(STALE_MANIFESTS)?;
    println!(
        "pull with upstream down: {:.2?}; eddy_stale_manifests_served_total {stale}",
        run.elapsed
    );
    second.ensure_content(NS, &image.blobs())?;
    ensure!(stale >= 1.0, "eddy did not count the stale tag it served");
    Ok(())
}

/// 8. eddy is killed (SIGKILL) in the middle of a slow pull. Restarted on the same data
///    dir, it resumes the half-written blob from its verified prefix (`Range`), the retried
///    pull succeeds, upstream sent the image about once (at most 1.1x), and no store file is
///    corrupt.
#[test]
fn crash_mid_pull_leaves_no_corrupt_blob() -> Result<()> {
    let Some(mut setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let repo = "crash/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[64 * MIB, MIB]))?;
    let reference = reference(repo, "v1");
    let big = image.largest_layer();

    // 50 Mbit/s: the 64 MiB layer takes about 11 s.
    shape_link(&setup.netns, Some("50mbit"))?;
    let containerd = Containerd::start()?;
    let argv = containerd.ctr_args(NS, &["content", "fetch", &reference]);
    let log = setup.work.path().join("interrupted.log");
    let started = Instant::now();
    let mut pull = setup.client.spawn(&argv, &log)?;
    // Kill eddy once containerd holds a quarter of the big layer (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    while containerd.ingest_bytes() < 16 * MIB && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let ingested = containerd.ingest_bytes();
    ensure!(
        ingested >= 16 * MIB && ingested < big.size,
        "containerd had {ingested} bytes of the {}-byte layer when eddy was to be killed; log:\n{}",
        big.size,
        setup.eddy().log_tail(30)
    );
    let seen = setup.upstream_bytes()?;
    setup.eddy.as_mut().expect("eddy").kill9()?;
    println!(
        "killed eddy after {:.2?}: containerd had {:.1} MiB of the {:.1} MiB layer, eddy {:.1} MiB from upstream",
        started.elapsed(),
        mib(ingested),
        mib(big.size),
        mib(seen)
    );
    let status = pull.wait_timeout(Duration::from_secs(90))?;
    println!(
        "the interrupted ctr: {status:?}: {}",
        fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("")
    );
    ensure!(
        status.is_some(),
        "the interrupted ctr did not exit within 90 s"
    );
    let report = verify_store(&setup.eddy_config.data_dir)?;
    println!(
        "after the crash: {} store files, {:.1} MiB, none corrupt; other files in the data dir: {:?}",
        report.files,
        mib(report.bytes),
        other_files(&setup.eddy_config.data_dir)
    );

    shape_link(&setup.netns, None)?;
    // The interrupted ctr may have finished by itself: once eddy died, its retries went
    // direct (fail-open). What eddy fetches is counted from here on.
    let before_restart = setup.served()?.bytes();
    setup.restart_eddy()?;
    // The same containerd: it resumes its partial ingest (Range) if the first try failed.
    let retry = setup
        .client
        .fetch(&containerd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("retried ctr content fetch after eddy restarted")?;
    println!("retried pull: {:.2?}", retry.elapsed);
    containerd.ensure_content(NS, &image.blobs())?;

    let fresh = Containerd::start()?;
    let run = setup
        .client
        .fetch(&fresh, NS, &reference, &[], PULL_TIMEOUT)?
        .check("fresh ctr content fetch after the restart")?;
    println!("fresh pull after the restart: {:.2?}", run.elapsed);
    fresh.ensure_content(NS, &image.blobs())?;
    let served = setup.served()?;
    let ratio = served.bytes() as f64 / image.total_bytes() as f64;
    println!(
        "registry sent {:.1} MiB in all for the {:.1} MiB image ({ratio:.3}x); other files in the data dir now: {:?}",
        mib(served.bytes()),
        mib(image.total_bytes()),
        other_files(&setup.eddy_config.data_dir)
    );
    let log = setup.eddy().log_text();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming a fill from its verified prefix"));
    println!(
        "restarted eddy: {}",
        resumed.unwrap_or("(no resume logged)")
    );
    ensure!(
        resumed.is_some_and(|l| l.contains(big.hex())),
        "the restarted eddy did not resume the fill of {}; log:\n{}",
        big.digest,
        setup.eddy().log_tail(30)
    );
    let prefix: u64 = resumed
        .and_then(|l| l.split("bytes=").nth(1))
        .and_then(|b| b.split_whitespace().next())
        .and_then(|b| b.parse().ok())
        .context("the resume line names no byte count")?;
    // Resumed from its prefix: after the restart, upstream sent about the rest of the image.
    let since_restart = served.bytes() - before_restart;
    let rest = image.total_bytes() - prefix;
    println!(
        "since the restart: registry sent {:.1} MiB; the image less the resumed prefix is {:.1} MiB",
        mib(since_restart),
        mib(rest)
    );
    ensure!(
        since_restart as f64 <= rest as f64 * 1.1,
        "after the restart upstream sent {since_restart} bytes, for {rest} bytes missing: \
         the fill started over"
    );
    ensure!(
        other_files(&setup.eddy_config.data_dir)
            .iter()
            .all(|(name, _)| !name.contains(".partial")),
        "a partial fill was left behind: {:?}",
        other_files(&setup.eddy_config.data_dir)
    );
    assert_store(&setup, &image.blobs())
}

/// A cold pull of `reference` then a warm one from a fresh containerd, both through eddy:
/// every connection takes `route`, the cold pull fills the store, the warm one reads no
/// blob (and no manifest) bytes from upstream.
fn cold_then_warm(
    setup: &Setup,
    reference: &str,
    extra: &[&str],
    image: &Image,
    route: &str,
) -> Result<()> {
    let series = connections_series(route);
    let conns_before = setup.eddy().metric(&series)?;
    let cold_ctd = Containerd::start()?;
    let cold = setup
        .client
        .pull(&cold_ctd, NS, reference, extra, PULL_TIMEOUT)?
        .check(&format!("cold ctr images pull {reference} through eddy"))?;
    let after_cold = setup.served()?;
    let upstream_after_cold = setup.upstream_bytes()?;
    let conns_cold = setup.eddy().metric(&series)?;
    println!(
        "cold pull of {reference}: {:.2?}; registry sent {:.1} MiB ({} blob GETs); \
         eddy upstream bytes {:.1} MiB; {series} {conns_before} -> {conns_cold}",
        cold.elapsed,
        mib(after_cold.bytes()),
        after_cold.blob_gets,
        mib(upstream_after_cold),
    );
    cold_ctd.ensure_content(NS, &image.blobs())?;
    ensure!(
        conns_cold > conns_before,
        "the cold pull made no {series} connection (still {conns_cold}); eddy log:\n{}",
        setup.eddy().log_tail(30)
    );
    ensure!(
        after_cold.bytes() as f64 <= image.total_bytes() as f64 * 1.02,
        "cold pull made upstream send {} bytes for a {}-byte image",
        after_cold.bytes(),
        image.total_bytes()
    );
    ensure!(
        upstream_after_cold >= image.layers().iter().map(|b| b.size).sum::<u64>(),
        "eddy fetched only {upstream_after_cold} bytes upstream: did the cold pull bypass it?"
    );
    assert_store(setup, &image.blobs())?;

    let store_before = setup.eddy().metric(STORE_BYTES)? as u64;
    let store_requests_before = setup.eddy().metric(&requests_series("blob", "store"))?;
    let warm_ctd = Containerd::start()?;
    let warm = setup
        .client
        .pull(&warm_ctd, NS, reference, extra, PULL_TIMEOUT)?
        .check(&format!("warm ctr images pull {reference} through eddy"))?;
    let after_warm = setup.served()?;
    let upstream_after_warm = setup.upstream_bytes()?;
    let conns_warm = setup.eddy().metric(&series)?;
    let store_served = setup.eddy().metric(STORE_BYTES)? as u64 - store_before;
    let store_requests =
        setup.eddy().metric(&requests_series("blob", "store"))? - store_requests_before;
    println!(
        "warm pull of {reference}: {:.2?}; registry sent {} more bytes ({} blob GETs, {} manifest \
         GETs); eddy upstream bytes +{}; eddy served {:.1} MiB from its store in {store_requests} \
         blob requests; {series} {conns_cold} -> {conns_warm}",
        warm.elapsed,
        after_warm.bytes() - after_cold.bytes(),
        after_warm.blob_gets - after_cold.blob_gets,
        after_warm.manifest_gets - after_cold.manifest_gets,
        upstream_after_warm - upstream_after_cold,
        mib(store_served),
    );
    warm_ctd.ensure_content(NS, &image.blobs())?;
    ensure!(
        conns_warm > conns_cold,
        "the warm pull made no {series} connection (still {conns_warm})"
    );
    ensure!(
        after_warm.blob_bytes == after_cold.blob_bytes
            && after_warm.blob_gets == after_cold.blob_gets,
        "the warm pull fetched blobs upstream: before {after_cold:?}, after {after_warm:?}"
    );
    ensure!(
        after_warm.bytes() == after_cold.bytes(),
        "the warm pull read manifest bytes upstream: before {after_cold:?}, after {after_warm:?}"
    );
    ensure!(
        upstream_after_warm == upstream_after_cold,
        "eddy_bytes_total{{source=\"upstream\"}} went from {upstream_after_cold} to {upstream_after_warm}"
    );
    let layer_bytes: u64 = image.layers().iter().map(|b| b.size).sum();
    ensure!(
        store_served >= layer_bytes && store_requests >= image.layers().len() as f64,
        "eddy served {store_served} bytes in {store_requests} blob requests from its store, \
         for {layer_bytes} bytes in {} layers",
        image.layers().len()
    );
    Ok(())
}

/// 9. A registry configured by address (`--registry 10.A.B.1`, no host name): ctr pulls
///    `10.A.B.1/repo:tag`, so its ClientHello carries no SNI; eddy terminates TLS with a
///    leaf for the IP (the upstream is verified by its IP SAN) and caches. A TLS
///    connection without SNI to an address that is not configured passes through untouched.
#[test]
fn registry_named_by_ip_address() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let setup = Setup::start(WorldSpec::new().configure_eddy(|config, upstreams| {
        config.registries = vec![upstreams[0].ip.to_string()];
    }))?;
    let repo = "byip/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[16 * MIB, 4 * MIB]))?;
    let reference = format!("{}/{repo}:v1", setup.upstream.ip_authority());
    cold_then_warm(&setup, &reference, &[], &image, "registry_tls")?;

    // By hand: eddy's CA alone verifies the configured address (eddy terminated), ...
    let eddy_ca = setup.work.path().join("eddy-ca.pem");
    let url = format!("https://{}/v2/", setup.upstream.ip);
    let (run, status) = setup.client.curl_status(
        setup.work.path(),
        "byip",
        &url,
        &["--cacert", eddy_ca.to_str().expect("utf-8 path")],
        Duration::from_secs(30),
    )?;
    println!(
        "curl {url} trusting only eddy's CA: ok={} HTTP {status:?}",
        run.ok()
    );
    ensure!(
        run.ok() && status == Some(200),
        "curl {url} trusting only eddy's CA: {status:?}: {}",
        run.stderr()
    );

    // ... while another TLS registry, at an address eddy was not given, keeps its own
    // certificate: only its own test CA verifies it, through the passthrough.
    let other_ns = Netns::new()?;
    let other_pki = Pki::create(
        &setup.work.path().join("other-pki"),
        &[REGISTRY_HOST],
        &[other_ns.ns_v4.into()],
    )?;
    let other = Upstream::start(&other_ns, &other_pki, UpstreamOptions::default())?;
    let passthrough = connections_series("passthrough");
    let (tls_before, pass_before) = (
        setup.eddy().metric(&connections_series("registry_tls"))?,
        setup.eddy().metric(&passthrough)?,
    );
    let url = format!("https://{}/v2/", other.ip);
    let (run, status) = setup.client.curl_status(
        setup.work.path(),
        "other",
        &url,
        &["--cacert", other_pki.ca_cert.to_str().expect("utf-8 path")],
        Duration::from_secs(30),
    )?;
    let (tls_after, pass_after) = (
        setup.eddy().metric(&connections_series("registry_tls"))?,
        setup.eddy().metric(&passthrough)?,
    );
    println!(
        "curl {url} (not a configured registry) trusting only its own CA: ok={} HTTP {status:?}; \
         {passthrough} {pass_before} -> {pass_after}; registry_tls {tls_before} -> {tls_after}",
        run.ok()
    );
    ensure!(
        run.ok() && status == Some(200),
        "a TLS connection without SNI to {url}, not a configured registry, did not reach the \
         upstream's own certificate: {status:?}: {}\neddy log:\n{}",
        run.stderr(),
        setup.eddy().log_tail(20)
    );
    ensure!(
        pass_after > pass_before && tls_after == tls_before,
        "the connection to {url} was not a passthrough: passthrough {pass_before} -> \
         {pass_after}, registry_tls {tls_before} -> {tls_after}"
    );
    ensure!(
        other.served()?.bytes() == 0 && fs::read_to_string(&other.log)?.contains("/v2/"),
        "the other registry's log does not show the /v2/ request"
    );
    Ok(())
}

/// 10. A plain-HTTP registry on a non-443 port (`10.A.B.1:5000`, no TLS), with eddy
///     intercepting that port too: `ctr --plain-http` pulls through eddy's HTTP route,
///     cold then warm.
#[test]
fn plain_http_registry_on_an_intercepted_port() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    const PORT: u16 = 5000;
    let setup = Setup::start(
        WorldSpec::new()
            .upstream(UpstreamOptions {
                plain_http_port: Some(PORT),
                ..Default::default()
            })
            .configure_eddy(|config, _| {
                config.intercept_ports = vec![eddy_tests::INTERCEPTED_PORT, PORT]
            }),
    )?;
    let repo = "plain/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[16 * MIB, 4 * MIB]))?;
    let reference = format!("{}/{repo}:v1", setup.upstream.ip_authority());
    let tls_before = setup.eddy().metric(&connections_series("registry_tls"))?;
    cold_then_warm(
        &setup,
        &reference,
        &["--plain-http"],
        &image,
        "registry_http",
    )?;
    let tls_after = setup.eddy().metric(&connections_series("registry_tls"))?;
    ensure!(
        tls_after == tls_before,
        "plain-HTTP pulls made registry_tls connections: {tls_before} -> {tls_after}"
    );
    Ok(())
}

/// Everything the bearer-token test counts, read at one moment.
#[derive(Clone, Debug)]
struct Counters {
    /// Requests in the token server's log.
    tokens: usize,
    passthrough: f64,
    registry_tls: f64,
    served: Served,
    /// Requests in the registry's log.
    registry_requests: usize,
    /// eddy_bytes_total{source="upstream"} and {source="store"}.
    eddy_upstream: u64,
    eddy_store: u64,
}

impl Counters {
    fn read(setup: &Setup, tokens: &TokenServer) -> Result<Self> {
        Ok(Self {
            tokens: tokens.requests().len(),
            passthrough: setup.eddy().metric(&connections_series("passthrough"))?,
            registry_tls: setup.eddy().metric(&connections_series("registry_tls"))?,
            served: setup.served()?,
            registry_requests: setup.upstream.requests().len(),
            eddy_upstream: setup.upstream_bytes()?,
            eddy_store: setup.eddy().metric(STORE_BYTES)? as u64,
        })
    }
}

/// Print what changed between `a` and `b` (token requests, connections, upstream requests
/// and bytes, eddy's store); returns the token requests made in between.
fn bearer_step(
    label: &str,
    elapsed: Duration,
    setup: &Setup,
    tokens: &TokenServer,
    a: &Counters,
    b: &Counters,
) -> Vec<TokenRequest> {
    let new_tokens: Vec<TokenRequest> = tokens.requests()[a.tokens..b.tokens].to_vec();
    let token_lines: Vec<String> = new_tokens
        .iter()
        .map(|r| {
            format!(
                "{} {} scopes={:?} user={} -> {} granted={:?}",
                r.method,
                r.path,
                r.scopes,
                r.user.as_deref().unwrap_or(if r.credentials {
                    "<bad>"
                } else {
                    "<anonymous>"
                }),
                r.status,
                r.granted
            )
        })
        .collect();
    let mut upstream = std::collections::BTreeMap::<String, u32>::new();
    for r in &setup.upstream.requests()[a.registry_requests..b.registry_requests] {
        let kind = if r.uri.contains("/blobs/") {
            "blob"
        } else if r.uri.contains("/manifests/sha256:") {
            "manifest-by-digest"
        } else if r.uri.contains("/manifests/") {
            "manifest-by-tag"
        } else {
            "other"
        };
        *upstream
            .entry(format!("{} {kind} {}", r.method, r.status))
            .or_default() += 1;
    }
    println!(
        "{label}: {elapsed:.2?}\n  token requests: {}{}\n  eddy connections: passthrough \
         +{}, registry_tls +{}\n  registry requests: {upstream:?}\n  registry sent {} blob bytes \
         in {} GETs, {} manifest bytes in {} GETs; eddy: upstream bytes +{}, store bytes +{}",
        new_tokens.len(),
        token_lines
            .iter()
            .map(|l| format!("\n    {l}"))
            .collect::<String>(),
        b.passthrough - a.passthrough,
        b.registry_tls - a.registry_tls,
        b.served.blob_bytes - a.served.blob_bytes,
        b.served.blob_gets - a.served.blob_gets,
        b.served.manifest_bytes - a.served.manifest_bytes,
        b.served.manifest_gets - a.served.manifest_gets,
        b.eddy_upstream - a.eddy_upstream,
        b.eddy_store - a.eddy_store,
    );
    new_tokens
}

/// The credentials the token host of a [`TokenWorld`] accepts.
const USER: &str = "user";
const SECRET: &str = "secret";

/// Docker Hub / GHCR style auth: the registry wants Bearer tokens from a separate token host
/// (auth.test on a second address, HTTPS on 443) that grants anonymous pulls of one
/// repository and pulls of another to USER:SECRET only. Both ctr and eddy resolve auth.test.
struct TokenWorld {
    // Dropped in this order: the token server, then the namespace it runs in, then its key.
    tokens: TokenServer,
    setup: Setup,
    _keys: tempfile::TempDir,
}

impl TokenWorld {
    fn start(public: &str, private: &str) -> Result<Self> {
        Self::with_eddy_args(public, private, Vec::new())
    }

    /// As [`TokenWorld::start`], with more `eddy run` arguments.
    fn with_eddy_args(public: &str, private: &str, eddy_args: Vec<OsString>) -> Result<Self> {
        let keys = tempfile::Builder::new()
            .prefix("eddy-token-keys-")
            .tempdir()?;
        let signing = SigningKey::create(keys.path())?;
        let mut setup = Setup::start(
            WorldSpec::new()
                .upstream(UpstreamOptions {
                    token_auth: Some(
                        signing.registry_auth_config(&format!("https://{AUTH_HOST}/token")),
                    ),
                    push_creds: Some((USER.into(), SECRET.into())),
                    ..Default::default()
                })
                .eddy_args(eddy_args),
        )?;
        let auth_ip = setup.netns.add_v4(3)?;
        // eddy's hosts file is bind-mounted into its mount namespace: appending shows there.
        for hosts in [&setup.client.hosts, &setup.work.path().join("hosts.eddy")] {
            writeln!(
                fs::OpenOptions::new().append(true).open(hosts)?,
                "{auth_ip} {AUTH_HOST}"
            )?;
        }
        let push_hosts = setup.work.path().join("hosts.push");
        fs::write(
            &push_hosts,
            format!("127.0.0.1 localhost\n{auth_ip} {AUTH_HOST}\n"),
        )?;
        setup.upstream.options.push_hosts = Some(push_hosts);
        let tokens = TokenServer::start(
            Path::new(env!("CARGO_BIN_EXE_eddy-probe")),
            &setup.netns,
            auth_ip,
            &setup.pki,
            &signing,
            &Grants {
                public: vec![public.into()],
                private: vec![private.into()],
                users: vec![(USER.into(), SECRET.into())],
            },
            &setup.work.path().join("tokens.log"),
        )?;
        println!(
            "token server at {} ({AUTH_HOST}); registry at {} ({REGISTRY_HOST})",
            tokens.addr,
            setup.upstream.addr()
        );
        Ok(Self {
            tokens,
            setup,
            _keys: keys,
        })
    }
}

/// 11. Docker Hub / GHCR style auth: the registry wants Bearer tokens from a separate token
///     host (auth.test, another address, port 443). ctr's connections to the token host are
///     intercepted and passed through (its SNI is not a registry); the registry's are
///     terminated and cached. Public content is served warm from the store; private content
///     only to clients whose token upstream accepts for that repository.
#[test]
// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn bearer_token_auth_through_a_passed_through_token_host() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    const PUBLIC: &str = "pub/app";
    const PRIVATE: &str = "priv/app";
    let world = TokenWorld::start(PUBLIC, PRIVATE)?;
    let (setup, tokens) = (&world.setup, &world.tokens);
    let pub_image = setup.image(PUBLIC, "v1", &ImageSpec::single(&[12 * MIB, 3 * MIB]))?;
    let priv_image = setup.image(PRIVATE, "v1", &ImageSpec::single(&[10 * MIB, 2 * MIB]))?;
    let layer_bytes = |image: &Image| image.layers().iter().map(|b| b.size).sum::<u64>();
    let pub_ref = reference(PUBLIC, "v1");
    let priv_ref = reference(PRIVATE, "v1");
    let creds = format!("{USER}:{SECRET}");

    // 1. Anonymous cold pull of the public image.
    let c0 = Counters::read(setup, tokens)?;
    let ctd = Containerd::start()?;
    let run = setup
        .client
        .pull(&ctd, NS, &pub_ref, &[], PULL_TIMEOUT)?
        .check("anonymous cold ctr images pull of pub/app through eddy")?;
    let c1 = Counters::read(setup, tokens)?;
    let asked = bearer_step(
        "1. anonymous cold pull of pub/app:v1",
        run.elapsed,
        setup,
        tokens,
        &c0,
        &c1,
    );
    ctd.ensure_content(NS, &pub_image.blobs())?;
    let pub_pull = format!("repository:{PUBLIC}:pull");
    ensure!(
        !asked.is_empty()
            && asked.iter().all(|r| !r.credentials && r.status == 200)
            && asked.iter().any(|r| r.granted.contains(&pub_pull)),
        "the cold pull's token requests are not anonymous grants of {pub_pull}: {asked:?}"
    );
    ensure!(
        c1.passthrough > c0.passthrough,
        "no passthrough connection during the cold pull: the token host was not reached \
         through eddy's passthrough ({} -> {}); eddy log:\n{}",
        c0.passthrough,
        c1.passthrough,
        setup.eddy().log_tail(30)
    );
    ensure!(
        c1.registry_tls > c0.registry_tls,
        "no registry_tls connection during the cold pull"
    );
    ensure!(
        c1.served.blob_bytes >= layer_bytes(&pub_image)
            && c1.served.bytes() as f64 <= pub_image.total_bytes() as f64 * 1.02,
        "cold pull: the registry sent {:?} for a {}-byte image",
        c1.served,
        pub_image.total_bytes()
    );
    assert_store(setup, &pub_image.blobs())?;
    drop(ctd);

    // 2. Warm anonymous pull from a fresh containerd: a new token, no blob bytes upstream.
    let ctd = Containerd::start()?;
    let run = setup
        .client
        .pull(&ctd, NS, &pub_ref, &[], PULL_TIMEOUT)?
        .check("anonymous warm ctr images pull of pub/app through eddy")?;
    let c2 = Counters::read(setup, tokens)?;
    let asked = bearer_step(
        "2. anonymous warm pull of pub/app:v1 (fresh containerd)",
        run.elapsed,
        setup,
        tokens,
        &c1,
        &c2,
    );
    ctd.ensure_content(NS, &pub_image.blobs())?;
    ensure!(
        !asked.is_empty() && asked.iter().all(|r| !r.credentials && r.status == 200),
        "the warm pull made no anonymous token request: {asked:?}"
    );
    ensure!(
        c2.passthrough > c1.passthrough && c2.registry_tls > c1.registry_tls,
        "warm pull: passthrough {} -> {}, registry_tls {} -> {}",
        c1.passthrough,
        c2.passthrough,
        c1.registry_tls,
        c2.registry_tls
    );
    ensure!(
        c2.served.blob_bytes == c1.served.blob_bytes && c2.served.blob_gets == c1.served.blob_gets,
        "the warm pull fetched blobs upstream: {:?} -> {:?}",
        c1.served,
        c2.served
    );
    ensure!(
        c2.eddy_upstream == c1.eddy_upstream,
        "eddy read {} bytes upstream during the warm pull",
        c2.eddy_upstream - c1.eddy_upstream
    );
    ensure!(
        c2.eddy_store - c1.eddy_store >= layer_bytes(&pub_image),
        "eddy served only {} bytes from its store for {} layer bytes",
        c2.eddy_store - c1.eddy_store,
        layer_bytes(&pub_image)
    );
    drop(ctd);

    // 3. The private image with credentials: cold, then warm from a fresh containerd.
    let ctd = Containerd::start()?;
    let run = setup
        .client
        .pull(&ctd, NS, &priv_ref, &["--user", &creds], PULL_TIMEOUT)?
        .check("ctr images pull --user of priv/app through eddy (cold)")?;
    let c3 = Counters::read(setup, tokens)?;
    let asked = bearer_step(
        "3a. cold pull of priv/app:v1 with --user user:secret",
        run.elapsed,
        setup,
        tokens,
        &c2,
        &c3,
    );
    ctd.ensure_content(NS, &priv_image.blobs())?;
    let priv_pull = format!("repository:{PRIVATE}:pull");
    ensure!(
        asked
            .iter()
            .any(|r| r.user.as_deref() == Some(USER) && r.granted.contains(&priv_pull)),
        "no authenticated token request granted {priv_pull}: {asked:?}"
    );
    ensure!(
        c3.passthrough > c2.passthrough,
        "the private cold pull's token request was not passed through"
    );
    ensure!(
        c3.served.blob_bytes - c2.served.blob_bytes >= layer_bytes(&priv_image),
        "the private cold pull did not come from upstream: {:?} -> {:?}",
        c2.served,
        c3.served
    );
    assert_store(setup, &priv_image.blobs())?;
    drop(ctd);

    let ctd = Containerd::start()?;
    let run = setup
        .client
        .pull(&ctd, NS, &priv_ref, &["--user", &creds], PULL_TIMEOUT)?
        .check("ctr images pull --user of priv/app through eddy (warm)")?;
    let c4 = Counters::read(setup, tokens)?;
    bearer_step(
        "3b. warm pull of priv/app:v1 with --user user:secret (fresh containerd)",
        run.elapsed,
        setup,
        tokens,
        &c3,
        &c4,
    );
    ctd.ensure_content(NS, &priv_image.blobs())?;
    ensure!(
        c4.served.blob_bytes == c3.served.blob_bytes && c4.served.blob_gets == c3.served.blob_gets,
        "the private warm pull fetched blobs upstream: {:?} -> {:?}",
        c3.served,
        c4.served
    );
    ensure!(
        c4.eddy_store - c3.eddy_store >= layer_bytes(&priv_image),
        "eddy served only {} bytes from its store for {} private layer bytes",
        c4.eddy_store - c3.eddy_store,
        layer_bytes(&priv_image)
    );
    drop(ctd);

    // 4a. An anonymous pull of the cached private image fails.
    let ctd = Containerd::start()?;
    let denied = setup
        .client
        .pull(&ctd, NS, &priv_ref, &[], Duration::from_secs(60))?;
    let c5 = Counters::read(setup, tokens)?;
    let asked = bearer_step(
        "4a. anonymous pull of the cached priv/app:v1 (fresh containerd)",
        denied.elapsed,
        setup,
        tokens,
        &c4,
        &c5,
    );
    println!(
        "  ctr: ok={} {}",
        denied.ok(),
        denied.stderr().trim().lines().last().unwrap_or("")
    );
    ensure!(
        !denied.ok(),
        "an anonymous pull of the private image succeeded through eddy; eddy log:\n{}",
        setup.eddy().log_tail(30)
    );
    ensure!(
        asked
            .iter()
            .all(|r| !r.credentials && !r.granted.contains(&priv_pull)),
        "the anonymous pull got a token for {priv_pull}: {asked:?}"
    );
    let have = ctd.content_digests(NS)?;
    for layer in priv_image.layers() {
        ensure!(
            !have.contains(&layer.digest),
            "the anonymous pull got private layer {}",
            layer.digest
        );
    }
    ensure!(
        c5.eddy_store == c4.eddy_store,
        "eddy served {} store bytes to the anonymous pull of the private image",
        c5.eddy_store - c4.eddy_store
    );
    drop(ctd);

    // 4b. By hand, through eddy: anonymous tokens (one for pub/app, one asked for priv/app
    //     and granted nothing) get upstream's 401 and no content for cached private blobs.
    let token_url = |scope: &str| {
        format!("https://{AUTH_HOST}/token?service={TOKEN_SERVICE}&scope=repository:{scope}:pull")
    };
    let fetch_token = |scope: &str, extra: &[&str], name: &str| -> Result<String> {
        let res = setup.curl_url(&token_url(scope), extra, name)?;
        ensure!(
            res.status == 200,
            "token request for {scope}: HTTP {}\n{}",
            res.status,
            String::from_utf8_lossy(&res.body)
        );
        let v: serde_json::Value = serde_json::from_slice(&res.body)?;
        v["token"]
            .as_str()
            .map(String::from)
            .context("no token in the token server's answer")
    };
    let pass_before = setup.eddy().metric(&connections_series("passthrough"))?;
    let anon_pub = fetch_token(PUBLIC, &[], "token-anon-pub")?;
    let anon_priv = fetch_token(PRIVATE, &[], "token-anon-priv")?;
    let pass_after = setup.eddy().metric(&connections_series("passthrough"))?;
    ensure!(
        pass_after >= pass_before + 2.0,
        "curl's token requests were not passed through: {pass_before} -> {pass_after}"
    );
    let layer = priv_image.largest_layer();
    let layer_data = priv_image.read_blob(&layer)?;
    let sample = &layer_data[1024..1040];
    let blob_path = format!("/v2/{PRIVATE}/blobs/{}", layer.digest);
    let manifest_path = format!("/v2/{PRIVATE}/manifests/{}", priv_image.top.digest);
    let pub_auth = format!("Authorization: Bearer {anon_pub}");
    let priv_auth = format!("Authorization: Bearer {anon_priv}");
    let attempts: [(&str, &str, Vec<&str>); 5] = [
        (
            "pub/app token, private blob GET",
            &blob_path,
            vec!["-H", &pub_auth],
        ),
        (
            "pub/app token, private blob HEAD",
            &blob_path,
            vec!["-I", "-H", &pub_auth],
        ),
        (
            "pub/app token, private manifest by digest",
            &manifest_path,
            vec!["-H", &pub_auth],
        ),
        (
            "anonymous priv/app token (no access), private blob GET",
            &blob_path,
            vec!["-H", &priv_auth],
        ),
        ("no Authorization, private blob GET", &blob_path, vec![]),
    ];
    let c6 = Counters::read(setup, tokens)?;
    let store_before = c6.eddy_store;
    let served_before = c6.served;
    let started = Instant::now();
    for (i, (what, path, extra)) in attempts.iter().enumerate() {
        let res = setup.curl(path, extra, &format!("bearer-denied-{i}"))?;
        let challenge = header(&res.headers, "WWW-Authenticate").unwrap_or_default();
        println!(
            "4b. {what}: HTTP {} with {} body bytes in {:.2?}; WWW-Authenticate: {}",
            res.status,
            res.body.len(),
            res.elapsed,
            challenge
        );
        ensure!(
            res.status == 401,
            "{what}: expected 401, got {}\n{}\neddy log:\n{}",
            res.status,
            res.headers,
            setup.eddy().log_tail(20)
        );
        ensure!(
            res.body.len() < 4096 && !res.body.windows(16).any(|w| w == sample),
            "{what}: the 401 carried content ({} bytes)",
            res.body.len()
        );
        // Upstream's own challenge, naming the token host (and, for a token without
        // access, the error).
        let with_token = extra.iter().any(|a| a.starts_with("Authorization:"));
        ensure!(
            challenge.starts_with(&format!("Bearer realm=\"https://{AUTH_HOST}/token\""))
                && challenge.contains(&format!("scope=\"repository:{PRIVATE}:pull\""))
                && (!with_token || challenge.contains("error=\"insufficient_scope\"")),
            "{what}: not upstream's challenge: WWW-Authenticate: {challenge:?}"
        );
    }
    let c7 = Counters::read(setup, tokens)?;
    bearer_step(
        "4b. the five requests above, together",
        started.elapsed(),
        setup,
        tokens,
        &c6,
        &c7,
    );
    let upstream_denials = setup.upstream.requests()[c6.registry_requests..c7.registry_requests]
        .iter()
        .filter(|r| r.status == 401)
        .count();
    ensure!(
        upstream_denials >= 1,
        "eddy refused the requests without asking upstream (no 401 in the registry's log)"
    );
    let store_after = c7.eddy_store;
    println!("4b. eddy_bytes_total{{source=\"store\"}}: {store_before} -> {store_after}");
    ensure!(
        store_after == store_before,
        "eddy served {} bytes from its store to clients without access",
        store_after - store_before
    );

    // The control: a token for user:secret reads the same blob, from eddy's store.
    let user_priv = fetch_token(PRIVATE, &["-u", &creds], "token-user-priv")?;
    let user_auth = format!("Authorization: Bearer {user_priv}");
    let ok = setup.curl(&blob_path, &["-H", &user_auth], "bearer-allowed")?;
    let store_ok = setup.eddy().metric(STORE_BYTES)? as u64;
    let served_after = setup.served()?;
    println!(
        "control, user:secret token for priv/app, blob GET: HTTP {} {:.1} MiB in {:.2?}; \
         store bytes +{}; registry blob bytes +{}",
        ok.status,
        mib(ok.body.len() as u64),
        ok.elapsed,
        store_ok - store_after,
        served_after.blob_bytes - served_before.blob_bytes
    );
    ensure!(
        ok.status == 200 && sha256_hex(&ok.body) == layer.hex(),
        "a valid token for {PRIVATE} did not get the blob: HTTP {}\n{}",
        ok.status,
        ok.headers
    );
    ensure!(
        store_ok - store_after >= layer.size && served_after.blob_bytes == served_before.blob_bytes,
        "the authorised blob GET was not served from eddy's store"
    );
    Ok(())
}

/// eddy's persisted public/private verdict on `authority/repository`, if it has one yet.
fn repo_verdict(setup: &Setup, repo_key: &str) -> Option<bool> {
    let path = setup
        .eddy_config
        .data_dir
        .join("catalog/repos")
        .join(format!("{}.json", sha256_hex(repo_key.as_bytes())));
    let v: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    v["public"].as_bool()
}

/// Requests for content (blobs, manifests by digest) in a slice of the registry's log.
fn content_requests(requests: &[eddy_tests::registry::LoggedRequest]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.uri.contains("/blobs/") || r.uri.contains("/manifests/sha256:"))
        .map(|r| format!("{} {} {}", r.method, r.uri, r.status))
        .collect()
}

/// 12. Public content of a token registry is public (the Docker Hub case): every client,
///     anonymous ones included, pulls with a bearer token, yet eddy serves the content of a
///     repository that anonymous clients may read to anyone, with no per-blob check upstream,
///     after a restart, and through an outage of both the registry and its token host. A
///     private repository keeps the per-client check, and is never served in the outage.
#[test]
// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn public_content_of_a_token_registry_is_served_like_public_content() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    const PUBLIC: &str = "hub/app";
    const PRIVATE: &str = "team/app";
    let mut world = TokenWorld::start(PUBLIC, PRIVATE)?;
    let pub_image = world
        .setup
        .image(PUBLIC, "v1", &ImageSpec::single(&[6 * MIB, 2 * MIB]))?;
    let priv_image = world
        .setup
        .image(PRIVATE, "v1", &ImageSpec::single(&[5 * MIB, MIB]))?;
    let (pub_ref, priv_ref) = (reference(PUBLIC, "v1"), reference(PRIVATE, "v1"));
    let creds = format!("{USER}:{SECRET}");
    let with_user = ["--user", creds.as_str()];

    // A pull from a fresh containerd; returns the registry requests it caused.
    let pull = |setup: &Setup, r: &str, extra: &[&str], what: &str| -> Result<Vec<String>> {
        let before = setup.upstream.requests().len();
        let ctd = Containerd::start()?;
        let run = setup
            .client
            .pull(&ctd, NS, r, extra, PULL_TIMEOUT)?
            .check(what)?;
        let requests = setup.upstream.requests()[before..].to_vec();
        let content = content_requests(&requests);
        println!(
            "{what}: {:.2?}; {} registry requests, for content: {content:?}",
            run.elapsed,
            requests.len()
        );
        Ok(content)
    };

    pull(
        &world.setup,
        &pub_ref,
        &[],
        "anonymous cold pull of hub/app",
    )?;
    pull(
        &world.setup,
        &priv_ref,
        &with_user,
        "cold pull of team/app with credentials",
    )?;
    // eddy asks the token host itself, anonymously, in the background: wait for it.
    let keys = [
        format!("{REGISTRY_HOST}/{PUBLIC}"),
        format!("{REGISTRY_HOST}/{PRIVATE}"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let verdicts = loop {
        let v = keys.clone().map(|k| repo_verdict(&world.setup, &k));
        if v.iter().all(Option::is_some) || Instant::now() > deadline {
            break v;
        }
        thread::sleep(Duration::from_millis(100));
    };
    println!(
        "verdicts: {PUBLIC}: {:?}, {PRIVATE}: {:?}",
        verdicts[0], verdicts[1]
    );
    ensure!(
        verdicts == [Some(true), Some(false)],
        "expected {PUBLIC} public and {PRIVATE} private, got {verdicts:?}; eddy log:\n{}",
        world.setup.eddy().log_tail(30)
    );
    let eddy_asked: Vec<_> = world
        .tokens
        .requests()
        .into_iter()
        .filter(|r| r.scopes.iter().any(|s| s.contains(PRIVATE)) && !r.credentials)
        .collect();
    ensure!(
        !eddy_asked.is_empty(),
        "nobody asked the token host anonymously about {PRIVATE}: the private verdict is not upstream's"
    );

    // Warm, the public image needs nothing upstream but the tag's revalidation; the private
    // one is still checked per client (HEADs with the client's token).
    let content = pull(
        &world.setup,
        &pub_ref,
        &[],
        "anonymous warm pull of hub/app",
    )?;
    ensure!(
        content.is_empty(),
        "the warm pull of public content asked upstream about content: {content:?}"
    );
    let content = pull(&world.setup, &priv_ref, &with_user, "warm pull of team/app")?;
    ensure!(
        !content.is_empty() && content.iter().all(|r| r.starts_with("HEAD ")),
        "the warm pull of private content was not checked per client with HEADs: {content:?}"
    );

    // The verdict survives a restart.
    world.setup.restart_eddy()?;
    let content = pull(
        &world.setup,
        &pub_ref,
        &[],
        "anonymous warm pull after a restart",
    )?;
    ensure!(
        content.is_empty(),
        "after a restart, the warm pull of public content asked upstream: {content:?}"
    );

    // Outage of the registry and its token host.
    world.setup.upstream.stop_registry()?;
    world.tokens.stop()?;
    let eddy = world.setup.eddy();
    let passthrough = eddy.metric(&connections_series("passthrough"))?;
    let ctd = Containerd::start()?;
    let run = world
        .setup
        .client
        .pull(&ctd, NS, &pub_ref, &[], PULL_TIMEOUT)?
        .check("anonymous pull by tag of public content, registry and token host down")?;
    ctd.ensure_content(NS, &pub_image.blobs())?;
    let passthrough_after = eddy.metric(&connections_series("passthrough"))?;
    let stale = eddy.metric(STALE_MANIFESTS)?;
    println!(
        "outage, public: {:.2?}; passthrough connections {passthrough} -> {passthrough_after}; \
         stale manifests served {stale}",
        run.elapsed
    );
    ensure!(
        stale >= 1.0,
        "eddy did not serve the tag from its last record"
    );
    ensure!(
        passthrough_after == passthrough,
        "the client dialled the (unreachable) token host: eddy answered with a challenge"
    );
    drop(ctd);

    let store = eddy.metric(STORE_BYTES)?;
    let ctd = Containerd::start()?;
    let denied =
        world
            .setup
            .client
            .pull(&ctd, NS, &priv_ref, &with_user, Duration::from_secs(60))?;
    println!(
        "outage, private: ok={} {}",
        denied.ok(),
        denied.stderr().trim().lines().last().unwrap_or("")
    );
    ensure!(
        !denied.ok(),
        "private content was served while its credentials could not be checked"
    );
    let have = ctd.content_digests(NS)?;
    ensure!(
        priv_image
            .layers()
            .iter()
            .all(|l| !have.contains(&l.digest)),
        "a private layer reached the client during the outage"
    );
    ensure!(
        eddy.metric(STORE_BYTES)? == store,
        "eddy served store bytes to the private pull during the outage"
    );
    Ok(())
}

/// A Docker config.json granting `user:password` on registry.test.
fn docker_config(user_password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(user_password);
    format!(r#"{{"auths": {{"https://{REGISTRY_HOST}/": {{"auth": "{auth}"}}}}}}"#)
}

/// 13. Node-level upstream credentials (`--upstream-auth-file`, a Docker config.json as in a
///     dockerconfigjson Secret): an anonymous client pulls a private image through eddy,
///     which fetches with the node's credentials (a token from the token host with them).
///     The file is re-read when it changes: with wrong credentials in it, the same anonymous
///     pull fails again and no private layer reaches the client.
#[test]
fn node_credentials_from_a_docker_config_json() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    const PUBLIC: &str = "open/app";
    const PRIVATE: &str = "closed/app";
    let auth_dir = tempfile::Builder::new().prefix("eddy-auth-").tempdir()?;
    let auth_file = auth_dir.path().join("config.json");
    fs::write(&auth_file, docker_config(&format!("{USER}:{SECRET}")))?;
    let world = TokenWorld::with_eddy_args(
        PUBLIC,
        PRIVATE,
        vec!["--upstream-auth-file".into(), auth_file.clone().into()],
    )?;
    let setup = &world.setup;
    let image = setup.image(PRIVATE, "v1", &ImageSpec::single(&[4 * MIB, MIB]))?;
    let reference = reference(PRIVATE, "v1");

    let before = world.tokens.requests().len();
    let ctd = Containerd::start()?;
    let run = setup
        .client
        .pull(&ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("anonymous pull of a private image with node credentials in eddy")?;
    ctd.ensure_content(NS, &image.blobs())?;
    let asked = world.tokens.requests()[before..].to_vec();
    println!(
        "anonymous pull of {PRIVATE} with node credentials: {:.2?}; token requests: {:?}",
        run.elapsed,
        asked
            .iter()
            .map(|r| format!("{} user={:?} granted={:?}", r.path, r.user, r.granted))
            .collect::<Vec<_>>()
    );
    ensure!(
        asked.iter().any(|r| r.user.as_deref() == Some(USER)
            && r.granted.contains(&format!("repository:{PRIVATE}:pull"))),
        "eddy did not get a token with the node's credentials: {asked:?}"
    );
    assert_store(setup, &image.blobs())?;
    drop(ctd);

    // A Secret update with wrong credentials: re-read, and no longer good for anything.
    fs::write(&auth_file, docker_config(&format!("{USER}:wrong")))?;
    thread::sleep(Duration::from_millis(1500));
    let ctd = Containerd::start()?;
    let denied = setup
        .client
        .pull(&ctd, NS, &reference, &[], Duration::from_secs(60))?;
    println!(
        "after the update: ok={} {}",
        denied.ok(),
        denied.stderr().trim().lines().last().unwrap_or("")
    );
    ensure!(
        !denied.ok(),
        "the private image was still served with revoked node credentials; eddy log:\n{}",
        setup.eddy().log_tail(20)
    );
    let have = ctd.content_digests(NS)?;
    ensure!(
        image.layers().iter().all(|l| !have.contains(&l.digest)),
        "a private layer reached the anonymous client after the credentials were revoked"
    );
    ensure!(
        setup
            .eddy()
            .log_tail(200)
            .contains("reloaded upstream credentials"),
        "eddy did not log the reload"
    );
    Ok(())
}

/// 13b. Node credentials for an htpasswd-only origin (Basic auth, no token server). Without
///      `--upstream-auth-file`, an anonymous `ctr images pull` through eddy is refused: ctr
///      fails on the origin's 401, the origin answered 401 and served no manifest or blob,
///      and no layer reaches containerd. Restarted with a Docker config.json holding the
///      origin's credentials, eddy serves the same anonymous pull (the origin sends the
///      layers, so eddy asked with those credentials), and containerd records the image
///      under the origin's digest.
#[test]
fn basic_auth_origin_serves_anonymous_pulls_only_with_the_upstream_auth_file() -> Result<()> {
    let (user, password) = ("dora", "htpasswd-only-pw");
    let Some(mut setup) = setup(UpstreamOptions {
        basic_auth: Some((user.into(), password.into())),
        ..Default::default()
    }) else {
        return Ok(());
    };
    let repo = "basic/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[4 * MIB, MIB]))?;
    let reference = reference(repo, "v1");

    // No --upstream-auth-file: eddy has nothing to add to the anonymous request.
    let before = setup.served()?;
    let refused_before = setup
        .upstream
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .count();
    let ctd = Containerd::start()?;
    let denied = setup
        .client
        .pull(&ctd, NS, &reference, &[], Duration::from_secs(60))?;
    let output = format!("{}\n{}", denied.stdout(), denied.stderr());
    let after = setup.served()?;
    let refused = setup
        .upstream
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .count()
        - refused_before;
    println!(
        "anonymous pull without --upstream-auth-file: ok={} in {:.2?}: {}; the origin \
         answered {refused} requests 401",
        denied.ok(),
        denied.elapsed,
        output.trim().lines().last().unwrap_or("")
    );
    ensure!(
        !denied.ok(),
        "an anonymous pull from a Basic-auth origin succeeded without node credentials"
    );
    ensure!(
        output.contains("401") || output.to_ascii_lowercase().contains("unauthorized"),
        "ctr failed, but not on the origin's 401:\n{output}"
    );
    ensure!(
        refused >= 1,
        "the origin refused nothing: the refusal did not come from it; eddy log:\n{}",
        setup.eddy().log_tail(20)
    );
    ensure!(
        after.manifest_gets == before.manifest_gets && after.blob_gets == before.blob_gets,
        "the origin served content to the anonymous pull: {before:?} -> {after:?}"
    );
    let have = ctd.content_digests(NS)?;
    ensure!(
        image.layers().iter().all(|l| !have.contains(&l.digest)),
        "a layer reached the anonymous client without node credentials"
    );
    drop(ctd);

    // The origin's credentials as a dockerconfigjson Secret would hold them.
    let auth_file = setup.work.path().join("config.json");
    fs::write(&auth_file, docker_config(&format!("{user}:{password}")))?;
    setup
        .eddy_config
        .extra_args
        .extend(["--upstream-auth-file".into(), auth_file.into()]);
    setup.restart_eddy()?;
    let before = setup.served()?;
    let ctd = Containerd::start()?;
    let run = setup
        .client
        .pull(&ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("anonymous pull with --upstream-auth-file")
        .map_err(|e| e.context(format!("eddy log:\n{}", setup.eddy().log_tail(30))))?;
    ctd.ensure_content(NS, &image.blobs())?;
    let digest = ctd.image_digest(NS, &reference)?;
    let after = setup.served()?;
    println!(
        "anonymous pull with --upstream-auth-file: {reference} ({digest}) in {:.2?}; the \
         origin served {} manifest and {} blob GETs",
        run.elapsed,
        after.manifest_gets - before.manifest_gets,
        after.blob_gets - before.blob_gets
    );
    ensure!(
        digest == image.top.digest,
        "containerd recorded {reference} as {digest}, the origin has {}",
        image.top.digest
    );
    // The origin answers only requests carrying its credentials: these came from eddy.
    ensure!(
        after.blob_gets - before.blob_gets >= image.layers().len() as u64,
        "the origin did not serve the layers: {before:?} -> {after:?}"
    );
    assert_store(&setup, &image.blobs())?;
    Ok(())
}

/// 16. One owner per data dir: a second `eddy run` on the running eddy's `--data-dir` exits
///     at once with one line naming the first one's pid, and attaches nothing; `eddy ca
///     export` and `eddy status` keep working beside the running agent.
#[test]
fn a_second_eddy_on_the_same_data_dir_is_refused() -> Result<()> {
    let Some(setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    let bin = eddy_bin();
    let data_dir = &setup.eddy_config.data_dir;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/eddy-test-second-{}",
        eddy_tests::unique_suffix()
    ));
    let port = eddy_tests::eddy::free_port;
    let mut second = std::process::Command::new(&bin);
    second
        .args(["run", "--cgroup"])
        .arg(&setup.eddy_config.cgroup)
        .args(["--listen", &format!("127.0.0.1:{}", port()?)])
        .args(["--admin", &format!("127.0.0.1:{}", port()?)])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--bpf-pin-dir")
        .arg(&pin_dir)
        .args(["--registry", REGISTRY_HOST]);
    let out = eddy_tests::process::run_bounded(&mut second, Duration::from_secs(20))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("second eddy: {}: {}", out.status, stderr.trim());
    let _ = fs::remove_dir_all(&pin_dir);
    ensure!(
        !out.status.success(),
        "a second eddy on the same data dir started"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    ensure!(
        lines.len() == 1
            && lines[0].contains("in use by another eddy")
            && lines[0].contains(&format!("pid {}", setup.eddy().pid())),
        "expected one line naming pid {}, got:\n{stderr}",
        setup.eddy().pid()
    );
    ensure!(
        !pin_dir.exists(),
        "the refused eddy left pins at {}",
        pin_dir.display()
    );
    let attached = eddy_tests::cgroup::attached_programs(&setup.eddy_config.cgroup)?;
    ensure!(
        attached.len() == 3,
        "expected only the first eddy's 3 programs on the cgroup, found {attached:?}"
    );

    ca_export(&bin, data_dir, &setup.eddy_config.registries)
        .context("eddy ca export beside the running agent")?;
    setup.eddy().metric(INFLIGHT_FETCHES)?;
    let status = eddy_tests::eddy::status_command(&bin, &setup.eddy().pin_dir)?;
    ensure!(
        status.status.success(),
        "eddy status beside the running agent failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(())
}

/// The store's committed blobs: digest hex → size.
fn store_files(data_dir: &Path) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut files = std::collections::BTreeMap::new();
    let dir = eddy_tests::registry_eddy::store_blob_dir(data_dir);
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        files.insert(
            entry.file_name().to_string_lossy().into_owned(),
            entry.metadata()?.len(),
        );
    }
    Ok(files)
}

/// Setup with extra `eddy run` flags.
fn setup_with_flags(flags: &[(&str, &str)]) -> Option<Setup> {
    let world = WorldSpec::new()
        .eddy_args(flags.iter().flat_map(|(f, v)| [*f, *v]))
        .start_if_privileged()?;
    Some(Setup { world })
}

/// Poll (bounded) until the store holds at most `max` bytes; returns what it holds.
fn wait_store_at_most(data_dir: &Path, max: u64, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let bytes: u64 = store_files(data_dir)?.values().sum();
        if bytes <= max || Instant::now() >= deadline {
            return Ok(bytes);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// 17. `--cache-max-size` below the image's size: the pull succeeds (content being served is
///     never evicted), the store then holds at most the limit (LRU down to 80% of it), and a
///     later pull from a fresh containerd refetches what was evicted instead of failing.
#[test]
fn a_store_smaller_than_the_image_still_serves_it() -> Result<()> {
    let Some(setup) = setup_with_flags(&[("--cache-max-size", "12MiB")]) else {
        return Ok(());
    };
    let limit = 12 * MIB;
    let repo = "bounded/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[8 * MIB, 8 * MIB, 4 * MIB]))?;
    let reference = reference(repo, "v1");
    let data_dir = setup.eddy_config.data_dir.clone();

    let first = Containerd::start()?;
    let run = setup
        .client
        .fetch(&first, NS, &reference, &[], PULL_TIMEOUT)?
        .check("pull through eddy with a 12 MiB store")?;
    first.ensure_content(NS, &image.blobs())?;
    let held = wait_store_at_most(&data_dir, limit, Duration::from_secs(15))?;
    let evicted = setup
        .eddy()
        .metric(r#"eddy_store_evictions_total{reason="size"}"#)?;
    let gauge = setup.eddy().metric("eddy_store_bytes")? as u64;
    println!(
        "pull of the {:.1} MiB image with a 12 MiB store: {:.2?}; store then holds {:.1} MiB \
         (gauge {:.1} MiB), {evicted} size evictions",
        mib(image.total_bytes()),
        run.elapsed,
        mib(held),
        mib(gauge)
    );
    ensure!(
        held <= limit && gauge <= limit,
        "the store holds {held} bytes (gauge {gauge}) over its {limit}-byte limit; eddy log:\n{}",
        setup.eddy().log_tail(30)
    );
    ensure!(evicted >= 1.0, "no size eviction counted");
    verify_store(&data_dir)?;

    let before = setup.served()?;
    let second = Containerd::start()?;
    setup
        .client
        .fetch(&second, NS, &reference, &[], PULL_TIMEOUT)?
        .check("second pull after evictions")?;
    second.ensure_content(NS, &image.blobs())?;
    let after = setup.served()?;
    println!(
        "second pull: registry sent {:.1} MiB more ({} blob GETs) for what was evicted",
        mib(after.bytes() - before.bytes()),
        after.blob_gets - before.blob_gets
    );
    ensure!(
        after.blob_gets > before.blob_gets,
        "evicted blobs were not refetched"
    );
    let held = wait_store_at_most(&data_dir, limit, Duration::from_secs(15))?;
    ensure!(
        held <= limit,
        "after the second pull the store holds {held} bytes"
    );
    Ok(())
}

/// 18. `--cache-ttl 3s`: unused content expires from the store; the next pull refetches it
///     and succeeds.
#[test]
fn content_expires_after_its_ttl_and_is_refetched() -> Result<()> {
    let Some(setup) = setup_with_flags(&[("--cache-ttl", "3s")]) else {
        return Ok(());
    };
    let repo = "ttl/app";
    let image = setup.image(repo, "v1", &ImageSpec::single(&[2 * MIB, MIB]))?;
    let reference = reference(repo, "v1");
    let data_dir = setup.eddy_config.data_dir.clone();

    let first = Containerd::start()?;
    setup
        .client
        .fetch(&first, NS, &reference, &[], PULL_TIMEOUT)?
        .check("first pull")?;
    let filled = Instant::now();
    assert_store(&setup, &image.blobs())?;
    let left = wait_store_at_most(&data_dir, 0, Duration::from_secs(20))?;
    let expired = setup
        .eddy()
        .metric(r#"eddy_store_evictions_total{reason="ttl"}"#)?;
    println!(
        "store emptied {:.2?} after the pull ({left} bytes left, {expired} TTL evictions)",
        filled.elapsed()
    );
    ensure!(
        left == 0 && expired >= image.blobs().len() as f64,
        "content did not expire: {left} bytes left, {expired} TTL evictions; eddy log:\n{}",
        setup.eddy().log_tail(30)
    );
    ensure!(
        filled.elapsed() >= Duration::from_secs(2),
        "content expired before its 3 s TTL ({:.2?})",
        filled.elapsed()
    );

    let before = setup.served()?;
    let second = Containerd::start()?;
    setup
        .client
        .fetch(&second, NS, &reference, &[], PULL_TIMEOUT)?
        .check("pull after expiry")?;
    second.ensure_content(NS, &image.blobs())?;
    let after = setup.served()?;
    let layers: u64 = image.layers().iter().map(|b| b.size).sum();
    println!(
        "pull after expiry: registry sent {:.1} MiB ({} blob GETs)",
        mib(after.blob_bytes - before.blob_bytes),
        after.blob_gets - before.blob_gets
    );
    ensure!(
        after.blob_bytes - before.blob_bytes >= layers,
        "the expired layers were not refetched from upstream"
    );
    Ok(())
}

/// `eddy gc ARGS... --json`, parsed.
fn eddy_gc(args: &[&std::ffi::OsStr]) -> Result<serde_json::Value> {
    let mut cmd = std::process::Command::new(eddy_bin());
    cmd.arg("gc").args(args).arg("--json");
    let out = eddy_tests::process::run_bounded(&mut cmd, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "eddy gc failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// For the gc tests: a pull of `repo`:v1, three 2 MiB layers, that leaves the store
/// holding every blob.
fn pull_three_blobs_into_the_store(setup: &mut Setup, repo: &str) -> Result<()> {
    let image = setup.image(repo, "v1", &ImageSpec::single(&[2 * MIB, 2 * MIB, 2 * MIB]))?;
    let ctd = Containerd::start()?;
    setup
        .client
        .fetch(&ctd, NS, &reference(repo, "v1"), &[], PULL_TIMEOUT)?
        .check("pull")?;
    assert_store(setup, &image.blobs())
}

/// 19. `eddy gc`: through the running agent's admin endpoint (its report matches `GET
///     /store`), then directly on the data dir once the agent is gone: `--dry-run` changes
///     nothing, and the real run removes exactly what the dry run reported, freeing the bytes
///     it reported.
#[test]
fn eddy_gc_dry_run_changes_nothing_and_gc_frees_what_it_reported() -> Result<()> {
    let Some(mut setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    pull_three_blobs_into_the_store(&mut setup, "gc/app")?;
    let data_dir = setup.eddy_config.data_dir.clone();

    // Through the agent (default policy: nothing to remove).
    let admin = setup.eddy().admin.to_string();
    let dir_arg = data_dir.as_os_str();
    let report = eddy_gc(&[
        "--admin".as_ref(),
        admin.as_ref(),
        "--data-dir".as_ref(),
        dir_arg,
        "--dry-run".as_ref(),
    ])?;
    let (code, store) = eddy_tests::eddy::http_get(setup.eddy().admin, "/store")?;
    println!(
        "agent gc --dry-run: {report}\nGET /store: {code} {}",
        store.trim()
    );
    let store: serde_json::Value = serde_json::from_str(&store)?;
    let on_disk: u64 = store_files(&data_dir)?.values().sum();
    ensure!(code == 200 && store["bytes"] == on_disk && report["store_bytes"] == on_disk);
    ensure!(
        report["dry_run"] == true && report["removed"].as_array().is_some_and(|r| r.is_empty())
    );

    // Directly on the data dir, with a 3 MiB limit.
    setup.eddy.as_mut().expect("eddy").kill9()?;
    let limit = [
        "--cache-max-size".as_ref(),
        "3MiB".as_ref(),
        "--data-dir".as_ref(),
        dir_arg,
    ];
    let before = store_files(&data_dir)?;
    let dry = eddy_gc(&[&limit[..], &["--dry-run".as_ref()]].concat())?;
    ensure!(
        store_files(&data_dir)? == before,
        "eddy gc --dry-run changed the store"
    );
    let would: Vec<String> = dry["removed"]
        .as_array()
        .context("removed")?
        .iter()
        .map(|r| {
            r["digest"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    ensure!(
        !would.is_empty(),
        "a 3 MiB limit on a {} MiB store removes nothing: {dry}",
        on_disk / MIB
    );
    let done = eddy_gc(&limit)?;
    let after = store_files(&data_dir)?;
    let gone: Vec<String> = before
        .keys()
        .filter(|k| !after.contains_key(*k))
        .cloned()
        .collect();
    let freed: u64 = gone.iter().map(|k| before[k]).sum();
    println!(
        "direct gc: dry run would remove {} entries ({} bytes); gc removed {} ({} bytes reported, {freed} bytes gone)",
        would.len(),
        dry["bytes_freed"],
        gone.len(),
        done["bytes_freed"]
    );
    let mut would_sorted = would.clone();
    would_sorted.sort();
    ensure!(
        gone == would_sorted,
        "gc removed {gone:?}, the dry run reported {would:?}"
    );
    ensure!(
        done["bytes_freed"] == freed && dry["bytes_freed"] == freed,
        "bytes freed: dry run {}, gc {}, actually {freed}",
        dry["bytes_freed"],
        done["bytes_freed"]
    );
    ensure!(after.values().sum::<u64>() <= 3 * MIB);
    verify_store(&data_dir)?;
    Ok(())
}

/// `GET /store` of a running agent.
fn store_status(eddy: &RegistryEddy) -> Result<serde_json::Value> {
    let (code, body) = eddy_tests::eddy::http_get(eddy.admin, "/store")?;
    ensure!(code == 200, "GET /store: {code} {body}");
    Ok(serde_json::from_str(&body)?)
}

/// A gc report's removals: digest hex → bytes.
fn removals(report: &serde_json::Value) -> Result<std::collections::BTreeMap<String, u64>> {
    report["removed"]
        .as_array()
        .with_context(|| format!("no removals in {report}"))?
        .iter()
        .map(|r| {
            Ok((
                r["digest"]
                    .as_str()
                    .context("digest")?
                    .trim_start_matches("sha256:")
                    .to_string(),
                r["bytes"].as_u64().context("bytes")?,
            ))
        })
        .collect()
}

/// 19b. `eddy gc` through a running agent that has something to remove: restarted on its
///      filled store with `--cache-max-size 3MiB` (its own pass waits for a commit or its
///      60 s timer), `eddy gc --dry-run --admin` changes neither the store's files nor `GET
///      /store`; `eddy gc --admin` then removes exactly the entries the dry run named, with
///      the same bytes, and the files, `GET /store` and the eviction counter agree.
#[test]
// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn eddy_gc_through_the_running_agent_removes_what_its_dry_run_reported() -> Result<()> {
    let Some(mut setup) = setup(UpstreamOptions::default()) else {
        return Ok(());
    };
    pull_three_blobs_into_the_store(&mut setup, "gc-live/app")?;
    let data_dir = setup.eddy_config.data_dir.clone();

    let limit = 3 * MIB;
    setup
        .eddy_config
        .extra_args
        .extend(["--cache-max-size".into(), "3MiB".into()]);
    setup.restart_eddy()?;
    let restarted = Instant::now();
    let eddy = setup.eddy();
    let admin = eddy.admin.to_string();
    let size_evictions = r#"eddy_store_evictions_total{reason="size"}"#;
    let gc = |dry_run: bool| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--admin".as_ref(),
            admin.as_ref(),
            "--data-dir".as_ref(),
            data_dir.as_os_str(),
        ];
        if dry_run {
            args.push("--dry-run".as_ref());
        }
        eddy_gc(&args)
    };

    let before = store_files(&data_dir)?;
    let before_bytes: u64 = before.values().sum();
    let status = store_status(eddy)?;
    println!("restarted with a 3 MiB limit: GET /store {status}");
    ensure!(
        status["bytes"] == before_bytes
            && status["entries"] == before.len()
            && status["limit_bytes"] == limit
            && before_bytes > limit,
        "GET /store {status} is not the {} files ({before_bytes} bytes) on disk, over a \
         {limit}-byte limit",
        before.len()
    );
    ensure!(
        eddy.metric(size_evictions)? == 0.0,
        "the agent evicted on its own before any gc; eddy log:\n{}",
        eddy.log_tail(20)
    );

    let dry = gc(true)?;
    println!("eddy gc --dry-run --admin: {dry}");
    let would = removals(&dry)?;
    let status_dry = store_status(eddy)?;
    ensure!(
        dry["dry_run"] == true && !would.is_empty(),
        "dry run: {dry}"
    );
    ensure!(
        dry["removed"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["reason"] == "size")),
        "dry run names removals other than for size: {dry}"
    );
    ensure!(
        store_files(&data_dir)? == before,
        "eddy gc --dry-run changed the store's files"
    );
    ensure!(
        status_dry["bytes"] == before_bytes && status_dry["entries"] == before.len(),
        "eddy gc --dry-run changed GET /store: {status} -> {status_dry}"
    );
    ensure!(dry["store_bytes"] == before_bytes && eddy.metric(size_evictions)? == 0.0);
    let would_bytes: u64 = would.values().sum();
    ensure!(
        dry["bytes_freed"] == would_bytes,
        "dry run: bytes_freed {} is not the sum of its removals ({would_bytes})",
        dry["bytes_freed"]
    );
    // The agent's own pass runs on a commit (none here) or 60 s after the start.
    ensure!(
        restarted.elapsed() < Duration::from_secs(45),
        "too slow ({:.2?}): the agent's own pass may have run before the gc",
        restarted.elapsed()
    );

    let done = gc(false)?;
    let removed = removals(&done)?;
    let after = store_files(&data_dir)?;
    let status_after = store_status(eddy)?;
    let gone: std::collections::BTreeMap<String, u64> = before
        .iter()
        .filter(|(k, _)| !after.contains_key(*k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let after_bytes: u64 = after.values().sum();
    let evicted = eddy.metric(size_evictions)?;
    println!(
        "eddy gc --admin: {done}\nremoved {} entries ({} bytes reported); {} files gone \
         ({} bytes), store {before_bytes} -> {after_bytes} bytes on disk, GET /store {} \
         bytes; {evicted} size evictions counted",
        removed.len(),
        done["bytes_freed"],
        gone.len(),
        gone.values().sum::<u64>(),
        status_after["bytes"]
    );
    ensure!(
        done["dry_run"] == false && removed == would,
        "gc removed {removed:?}, its dry run reported {would:?}"
    );
    ensure!(
        gone == would,
        "the files gone {gone:?} are not what the dry run reported {would:?}"
    );
    ensure!(
        done["bytes_freed"] == would_bytes && dry["bytes_freed"] == would_bytes,
        "bytes freed: dry run {}, gc {}, removals {would_bytes}",
        dry["bytes_freed"],
        done["bytes_freed"]
    );
    ensure!(
        after_bytes == before_bytes - would_bytes
            && status_after["bytes"] == after_bytes
            && done["store_bytes"] == after_bytes
            && status_after["entries"] == after.len()
            && done["store_entries"] == after.len(),
        "the store did not shrink by {would_bytes} bytes: {before_bytes} -> {after_bytes} on \
         disk, GET /store {status_after}, report {done}"
    );
    ensure!(
        after_bytes <= limit && evicted == would.len() as f64,
        "{after_bytes} bytes left over the {limit}-byte limit, {evicted} size evictions counted"
    );
    ensure!(
        removals(&gc(true)?)?.is_empty(),
        "a dry run after the gc still finds something to remove"
    );
    verify_store(&data_dir)?;
    Ok(())
}
