//! Abuse of eddy's registry endpoint by clients in the hooked cgroup, against the real
//! docker-registry upstream: idle and slow clients, oversized requests, out-of-range
//! ranges, path traversal, and a flood of digests that do not exist. Each asserts that
//! others are still served, that eddy's memory and state stay bounded, and that eddy
//! answers as the registry would.
//!
//! Run as root: `EDDY_BIN=target/release/eddy cargo test -p eddy-tests --release --test
//! abuse -- --test-threads=1 --nocapture` (or `cargo xtask test`).
use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use eddy_tests::{
    oci::ImageSpec,
    process::{open_fds, rss_kib},
    registry::REGISTRY_PORT,
    registry_eddy::files_under,
    world::{RegistryWorld, WorldSpec},
    Probe,
};
use sha2::{Digest as _, Sha256};

/// A ClientHello from openssl s_client with SNI registry.test (a configured registry).
/// The path comes from cargo at run time: a shared target dir may hold a binary built from
/// another checkout.
fn registry_client_hello() -> std::path::PathBuf {
    let manifest_dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    std::path::Path::new(&manifest_dir).join("../fuzz/seeds/peek_route/openssl-tls12")
}

fn world() -> Option<RegistryWorld> {
    WorldSpec::new().start_if_privileged()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[test]
fn idle_and_slow_clients_do_not_starve_others() -> Result<()> {
    let Some(world) = world() else { return Ok(()) };
    let image = world.image("abuse/idle", "v1", &ImageSpec::single(&[4 << 20]))?;
    let layer = image.largest_layer();
    let probe = Probe::new(env!("CARGO_BIN_EXE_eddy-probe"));
    let target = world.netns.v4(REGISTRY_PORT);
    let cgroup = Some(world.cgroup.path());
    let pid = world.eddy().pid();
    let (rss_before, fds_before) = (rss_kib(pid)?, open_fds(pid)?);

    let hold = Duration::from_secs(12);
    // 5,000 clients that connect and say nothing; 200 that send a ClientHello for the
    // registry and never finish the handshake; 100 slowloris clients trickling a request
    // head one byte every 200 ms.
    let idle = probe.hold_background(target, 5000, hold, None, Duration::ZERO, cgroup)?;
    let hello = registry_client_hello();
    let stalled = probe.hold_background(target, 200, hold, Some(&hello), Duration::ZERO, cgroup)?;
    let slow_head = world.work.path().join("slow-head");
    fs::write(
        &slow_head,
        format!(
            "GET /v2/abuse/idle/blobs/{} HTTP/1.1\r\nHost: registry.test\r\nX-Pad: {}\r\n",
            layer.digest,
            "a".repeat(200)
        ),
    )?;
    let slow = probe.hold_background(
        target,
        100,
        hold,
        Some(&slow_head),
        Duration::from_millis(200),
        cgroup,
    )?;

    // Past the peek deadline (3 s): the idle clients are being passed through by now.
    std::thread::sleep(Duration::from_secs(5));
    let (rss_loaded, fds_loaded) = (rss_kib(pid)?, open_fds(pid)?);
    let started = Instant::now();
    let res = world.curl(&format!("/v2/abuse/idle/blobs/{}", layer.digest), &[])?;
    let served_in = started.elapsed();
    ensure!(
        res.ok && res.status == Some(200) && sha256(&res.body) == layer.digest,
        "a client among the idle ones was not served: {res:?}"
    );
    let active = world.eddy().metric("eddy_active_connections")?;

    let idle = idle.finish(Duration::from_secs(60))?;
    let stalled = stalled.finish(Duration::from_secs(60))?;
    let slow = slow.finish(Duration::from_secs(60))?;
    println!(
        "eddy with {active} connections open: RSS {} -> {} KiB, fds {fds_before} -> {fds_loaded}; \
         a 4 MiB blob served in {served_in:.2?}\nidle: {idle:?}\nstalled TLS: {stalled:?}\n\
         slowloris: {slow:?}",
        rss_before, rss_loaded
    );
    ensure!(
        idle.failed_connect == 0 && stalled.failed_connect == 0 && slow.failed_connect == 0,
        "connections failed to open: {idle:?} {stalled:?} {slow:?}"
    );
    ensure!(
        active >= 5000.0,
        "expected eddy to hold the 5,000 idle connections, it had {active} open"
    );
    // Bounded: under 24 KiB per held connection, everything included (a 16 KiB peek
    // buffer each would be most of that already).
    let grown = rss_loaded.saturating_sub(rss_before);
    ensure!(
        grown < 24 * 5300,
        "eddy's RSS grew by {grown} KiB for 5,300 idle or slow clients"
    );
    // Once the clients are gone, so are eddy's connections (nothing leaks).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = world.eddy().metric("eddy_active_connections")?;
        if open <= 1.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{open} connections still open 20 s after every client closed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let fds_after = open_fds(pid)?;
    ensure!(
        fds_after <= fds_before + 10,
        "eddy holds {fds_after} fds after the clients left, {fds_before} before"
    );
    Ok(())
}

#[test]
fn oversized_request_lines_and_headers_are_refused() -> Result<()> {
    let Some(world) = world() else { return Ok(()) };
    let image = world.image("abuse/big", "v1", &ImageSpec::single(&[64 << 10]))?;
    let manifest = format!("/v2/abuse/big/manifests/{}", image.top.digest);
    let accept = format!("Accept: {}", image.top.media_type);

    // A 100 KiB request line.
    let long_path = format!("/v2/abuse/{}/manifests/latest", "a".repeat(100 << 10));
    let res = world.curl(&long_path, &[])?;
    ensure!(
        !res.ok || matches!(res.status, Some(400 | 404 | 414 | 431)),
        "a 100 KiB request line got {res:?}"
    );
    // A 1 MiB header, and 500 headers, from files (an argument is at most 128 KiB).
    let big_header = world.work.path().join("big-header");
    fs::write(&big_header, format!("X-Big: {}\n", "b".repeat(1 << 20)))?;
    let many_headers = world.work.path().join("many-headers");
    fs::write(
        &many_headers,
        (0..500).map(|i| format!("X-H{i}: v\n")).collect::<String>(),
    )?;
    for (what, file) in [
        ("a 1 MiB header", &big_header),
        ("500 headers", &many_headers),
    ] {
        let arg = format!("@{}", file.display());
        let res = world.curl(&manifest, &["-H", &accept, "-H", &arg])?;
        ensure!(
            !res.ok || matches!(res.status, Some(400 | 431)),
            "{what} got {:?} {:?}",
            res.status,
            res.stderr
        );
        println!("{what}: curl ok={} status={:?}", res.ok, res.status);
    }
    // eddy is alive and serves the next client.
    let res = world.curl(&manifest, &["-H", &accept])?;
    ensure!(
        res.status == Some(200) && sha256(&res.body) == image.top.digest,
        "after the oversized requests: {res:?}"
    );
    Ok(())
}

#[test]
fn range_beyond_the_blob_is_416_cold_and_warm() -> Result<()> {
    let Some(world) = world() else { return Ok(()) };
    let image = world.image("abuse/range", "v1", &ImageSpec::single(&[256 << 10]))?;
    let layer = image.largest_layer();
    let path = format!("/v2/abuse/range/blobs/{}", layer.digest);
    let beyond = format!("Range: bytes={}-", layer.size + 10);
    let direct = world.curl_direct(&path, &["-H", &beyond])?;
    for pass in ["cold", "warm"] {
        let res = world.curl(&path, &["-H", &beyond])?;
        ensure!(
            res.status == Some(416) && res.status == direct.status,
            "{pass}: a range past the end got {:?} (upstream answers {:?})\n{}",
            res.status,
            direct.status,
            res.headers
        );
        // Make it warm: a whole GET, verified.
        let full = world.curl(&path, &[])?;
        ensure!(full.status == Some(200) && sha256(&full.body) == layer.digest);
    }
    let warm = world.curl(&path, &["-H", &beyond])?;
    let content_range = eddy_tests::containerd::header(&warm.headers, "content-range");
    ensure!(
        content_range.as_deref() == Some(&format!("bytes */{}", layer.size)),
        "416 without the blob's size: {content_range:?}"
    );
    Ok(())
}

#[test]
fn path_traversal_in_the_repository_name_goes_nowhere() -> Result<()> {
    let Some(world) = world() else { return Ok(()) };
    let image = world.image("abuse/public", "v1", &ImageSpec::single(&[64 << 10]))?;
    let layer = image.largest_layer();
    let paths = [
        format!("/v2/abuse/../../../../etc/blobs/{}", layer.digest),
        format!("/v2/abuse/secret/../public/blobs/{}", layer.digest),
        format!("/v2/abuse/%2e%2e/public/manifests/{}", image.top.digest),
        "/v2/../../../../etc/passwd".to_string(),
    ];
    for path in &paths {
        let via = world.curl(path, &["--path-as-is"])?;
        let direct = world.curl_direct(path, &["--path-as-is"])?;
        ensure!(
            via.status == direct.status,
            "{path}: eddy answered {:?}, upstream {:?}",
            via.status,
            direct.status
        );
        ensure!(
            !String::from_utf8_lossy(&via.body).contains("root:"),
            "{path} returned a host file"
        );
    }
    // Nothing was cached or recorded under a traversal name.
    let catalog = world.data_dir().join("catalog");
    for entry in files_under(&catalog) {
        let text = fs::read_to_string(&entry).unwrap_or_default();
        ensure!(!text.contains(".."), "{} records {text}", entry.display());
    }
    Ok(())
}

#[test]
fn a_flood_of_missing_digests_leaves_no_state() -> Result<()> {
    let Some(world) = world() else { return Ok(()) };
    world.image("abuse/flood", "v1", &ImageSpec::single(&[4 << 10]))?;
    let pid = world.eddy().pid();
    // Warm up the connection pools and the handler once.
    world.curl("/v2/abuse/flood/manifests/v1", &[])?;
    let (rss_before, fds_before) = (rss_kib(pid)?, open_fds(pid)?);
    // 3,000 distinct digests nobody has, on keep-alive connections (one curl, many URLs).
    let count = 3000;
    let config = world.work.path().join("flood.curlrc");
    let mut text = String::new();
    for i in 0..count {
        let digest = sha256(format!("missing-{i}-{}", std::process::id()).as_bytes());
        text += &format!(
            "url = \"https://registry.test/v2/abuse/flood/blobs/{digest}\"\noutput = \"/dev/null\"\n"
        );
    }
    fs::write(&config, text)?;
    let started = Instant::now();
    let run = world.client.run(
        &[
            "curl".into(),
            "-sS".into(),
            "--http1.1".into(),
            "--cacert".into(),
            world.client.ca_bundle.clone().into(),
            "-w".into(),
            "%{http_code}\n".into(),
            "-K".into(),
            config.clone().into(),
        ],
        Duration::from_secs(300),
    )?;
    let codes = run.stdout();
    let not_found = codes.lines().filter(|c| *c == "404").count();
    ensure!(
        not_found == count,
        "{not_found} of {count} missing digests answered 404; others: {:?}",
        codes
            .lines()
            .filter(|c| *c != "404")
            .take(5)
            .collect::<Vec<_>>()
    );
    let elapsed = started.elapsed();
    let eddy = world.eddy();
    let inflight = eddy.metric(eddy_tests::registry_eddy::INFLIGHT_FETCHES)?;
    let (rss_after, fds_after) = (rss_kib(pid)?, open_fds(pid)?);
    let files = files_under(world.data_dir()).len();
    println!(
        "{count} missing digests in {elapsed:.2?}: RSS {rss_before} -> {rss_after} KiB, fds \
         {fds_before} -> {fds_after}, {files} files in the data dir, {inflight} fetches in flight"
    );
    ensure!(inflight == 0.0, "{inflight} fetches still in flight");
    ensure!(
        rss_after.saturating_sub(rss_before) < 32 << 10,
        "RSS grew by {} KiB",
        rss_after - rss_before
    );
    ensure!(
        fds_after <= fds_before + 10,
        "fds {fds_before} -> {fds_after}"
    );
    // Only the CA and the one manifest fetched: nothing per missing digest.
    let per_digest: Vec<_> = files_under(world.data_dir())
        .into_iter()
        .filter(|p| !p.starts_with(world.data_dir().join("ca")))
        .collect();
    ensure!(
        per_digest.len() < 20,
        "{} files in the data dir after the flood: {:?}",
        per_digest.len(),
        &per_digest[..per_digest.len().min(5)]
    );
    Ok(())
}
