//! Privileged end-to-end tests of eddy's interception: real cgroups, real BPF programs, an
//! upstream host in a network namespace, and the real eddy binary (`EDDY_BIN`).
//!
//! Run with `cargo xtask test`, or
//! `EDDY_BIN=target/release/eddy cargo test -p eddy-tests --release -- --test-threads=1`.
//! Each test builds and removes its own cgroup, netns and eddy.
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use eddy_tests::{
    eddy::{bpf_event_series, status_command, PASSTHROUGH_SERIES},
    require_privileges,
    wire::EchoReport,
    Ctx, Eddy, EddyConfig, World, INTERCEPTED_PORT, OTHER_PORT,
};

const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
const METRIC_WAIT: Duration = Duration::from_secs(5);

fn setup() -> Option<Ctx> {
    require_privileges().then(|| Ctx::new(env!("CARGO_BIN_EXE_eddy-probe")))
}

/// An echo that must succeed, with its checksum intact.
fn echo_ok(ctx: &Ctx, target: SocketAddr, bytes: u64, cgroup: Option<&Path>) -> Result<EchoReport> {
    let report = ctx.probe.echo(target, bytes, ECHO_TIMEOUT, cgroup)?;
    ensure!(
        report.ok && report.sha256_match,
        "echo to {target} (cgroup {cgroup:?}) failed: {report:?}"
    );
    ensure!(
        report.server_local == Some(target_as_seen_by_server(target)),
        "echo to {target} reached the wrong server address: {report:?}"
    );
    Ok(report)
}

/// A v4-mapped destination arrives at the server as plain IPv4.
fn target_as_seen_by_server(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => target,
        },
        v4 => v4,
    }
}

fn wait_event(eddy: &Eddy, event: &str, min: u64) -> Result<u64> {
    Ok(eddy.wait_metric_at_least(&bpf_event_series(event), min as f64, METRIC_WAIT)? as u64)
}

/// Poll (bounded in count and time) until a connect from `cgroup` goes direct to `target`
/// and completes an echo. Returns the time from `since` to that success.
fn first_direct_echo(
    ctx: &Ctx,
    target: SocketAddr,
    cgroup: &Path,
    since: Instant,
    deadline: Duration,
    attempt_timeout: Duration,
) -> Result<Duration> {
    let mut last = None;
    for _attempt in 0..100 {
        if since.elapsed() > deadline {
            break;
        }
        let report = ctx
            .probe
            .echo(target, 1024, attempt_timeout, Some(cgroup))?;
        if report.ok && report.peer == Some(target) {
            return Ok(since.elapsed());
        }
        last = Some(report);
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("no direct connection to {target} within {deadline:?}; last attempt: {last:?}")
}

/// a) Only sockets created inside the hooked cgroup (or below it) to an intercepted port
/// are redirected.
#[test]
fn redirects_only_inside_hooked_cgroup() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    let dst = world.netns.v4(INTERCEPTED_PORT);

    let outside = echo_ok(&ctx, dst, 4096, None)?;
    assert_eq!(outside.peer, Some(dst), "outside the cgroup must go direct");

    let inside = echo_ok(&ctx, dst, 4096, Some(world.cgroup.path()))?;
    assert_eq!(
        inside.peer,
        Some(eddy.listen),
        "inside the cgroup must be redirected"
    );

    let child = world.cgroup.child("child")?;
    let below = echo_ok(&ctx, dst, 4096, Some(&child))?;
    assert_eq!(
        below.peer,
        Some(eddy.listen),
        "a child cgroup must be redirected"
    );

    let other = world.netns.v4(OTHER_PORT);
    let not_intercepted = echo_ok(&ctx, other, 4096, Some(world.cgroup.path()))?;
    assert_eq!(
        not_intercepted.peer,
        Some(other),
        "port {OTHER_PORT} is not intercepted"
    );

    let redirected = wait_event(&eddy, "redirected", 2)?;
    assert_eq!(
        redirected, 2,
        "exactly the two in-cgroup connects to :443 are redirected"
    );
    let passthrough = eddy.wait_metric_at_least(PASSTHROUGH_SERIES, 2.0, METRIC_WAIT)? as u64;
    assert_eq!(passthrough, 2, "{PASSTHROUGH_SERIES}");
    Ok(())
}

/// A socket in the hooked cgroup but in another network namespace goes direct: eddy's
/// loopback listener is not reachable from there.
#[test]
fn other_netns_goes_direct() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    // The upstream's own namespace is "another netns" from eddy's point of view.
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let report = world.echo_from_upstream_netns(&ctx.probe, dst, 4096, ECHO_TIMEOUT)?;
    assert!(report.ok, "echo from the other netns failed: {report:?}");
    assert_eq!(
        report.peer,
        Some(dst),
        "a foreign-netns socket must go direct"
    );
    let skipped = wait_event(&eddy, "skipped_netns", 1)?;
    assert!(skipped >= 1, "skipped_netns = {skipped}");
    assert_eq!(eddy.bpf_event("redirected")?, 0);
    Ok(())
}

/// b) The proxy recovers the original destination for IPv4, IPv6 and v4-mapped
/// destinations: the bytes reach the right server and come back intact.
#[test]
fn recovers_original_destination_v4_v6_mapped() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    let cgroup = Some(world.cgroup.path());

    let cases = [
        ("IPv4", world.netns.v4(INTERCEPTED_PORT), eddy.listen),
        ("IPv6", world.netns.v6(INTERCEPTED_PORT), eddy.listen_v6()),
        (
            "v4-mapped",
            world.netns.v4_mapped(INTERCEPTED_PORT),
            eddy.listen_v4_mapped(),
        ),
    ];
    for (i, (family, dst, proxy)) in cases.into_iter().enumerate() {
        let report = echo_ok(&ctx, dst, 256 * 1024, cgroup)
            .with_context(|| format!("{family} destination {dst}"))?;
        println!(
            "{family}: {dst} via {:?}, server saw {:?} from {:?}, connect {} µs",
            report.peer, report.server_local, report.server_peer, report.connect_us
        );
        assert_eq!(
            report.peer,
            Some(proxy),
            "{family}: not redirected to the proxy"
        );
        let redirected = wait_event(&eddy, "redirected", i as u64 + 1)?;
        assert_eq!(redirected, i as u64 + 1, "{family}: redirected counter");
    }
    let published = wait_event(&eddy, "orig_dst_published", 3)?;
    assert!(published >= 3, "orig_dst_published = {published}");
    Ok(())
}

/// c) eddy's own upstream connections are never redirected back to itself, even when
/// eddy runs inside the hooked cgroup.
#[test]
fn own_connections_are_not_looped() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut config = EddyConfig::new(world.cgroup.path());
    config.run_in_cgroup = Some(world.cgroup.path().to_path_buf());
    let eddy = ctx.start_eddy(&config)?;
    let procs = std::fs::read_to_string(world.cgroup.path().join("cgroup.procs"))?;
    assert!(
        procs.lines().any(|l| l.trim() == eddy.pid().to_string()),
        "eddy (pid {}) should be inside the hooked cgroup; cgroup.procs: {procs:?}",
        eddy.pid()
    );

    let dst = world.netns.v4(INTERCEPTED_PORT);
    let report = echo_ok(&ctx, dst, 64 * 1024, Some(world.cgroup.path()))?;
    assert_eq!(report.peer, Some(eddy.listen));

    let skipped = wait_event(&eddy, "skipped_loop", 1)?;
    assert!(
        skipped >= 1,
        "skipped_loop = {skipped}: eddy's upstream socket was not recognised"
    );
    assert_eq!(
        eddy.bpf_event("redirected")?,
        1,
        "only the client's connect is redirected"
    );
    Ok(())
}

/// d) After SIGKILL the unpinned link is gone with the process: the next connect from
/// the cgroup goes direct and succeeds.
#[test]
fn sigkill_fails_open() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let before = echo_ok(&ctx, dst, 1024, Some(world.cgroup.path()))?;
    assert_eq!(before.peer, Some(eddy.listen));

    let killed_at = Instant::now();
    eddy.kill_and_wait()?;
    let waited = killed_at.elapsed();
    let took = first_direct_echo(
        &ctx,
        dst,
        world.cgroup.path(),
        killed_at,
        Duration::from_secs(5),
        Duration::from_millis(500),
    )?;
    println!(
        "SIGKILL: reaped after {} ms; first direct connect succeeded {} ms after the kill",
        waited.as_millis(),
        took.as_millis()
    );
    assert!(
        world.cgroup.attached_programs()?.is_empty(),
        "programs still attached after SIGKILL: {:?}",
        world.cgroup.attached_programs()?
    );
    // The maps stay pinned (nobody unpinned them); status must say eddy is gone.
    let status = eddy.status()?;
    assert!(
        !status.running,
        "status after SIGKILL says running: {status:?}"
    );
    assert!(
        status.attached.is_empty(),
        "status after SIGKILL lists programs: {status:?}"
    );
    Ok(())
}

/// e) A stopped (hung) eddy is bypassed once its heartbeat goes stale.
#[test]
fn sigstop_fails_open_on_stale_heartbeat() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut config = EddyConfig::new(world.cgroup.path());
    config.heartbeat_timeout_ms = Some(1500);
    let mut eddy = ctx.start_eddy(&config)?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let before = echo_ok(&ctx, dst, 1024, Some(world.cgroup.path()))?;
    assert_eq!(before.peer, Some(eddy.listen));

    let stopped_at = Instant::now();
    eddy.signal(libc::SIGSTOP)?;
    // Attempts that still get redirected hang on the stopped proxy: keep them short.
    let result = first_direct_echo(
        &ctx,
        dst,
        world.cgroup.path(),
        stopped_at,
        Duration::from_secs(3),
        Duration::from_millis(200),
    );
    eddy.signal(libc::SIGCONT)?;
    let took = result?;
    println!(
        "SIGSTOP: first direct connect {} ms after the stop (heartbeat timeout 1500 ms)",
        took.as_millis()
    );

    // Running again: the heartbeat resumes, redirects resume.
    let stale = wait_event(&eddy, "stale_heartbeat", 1)?;
    assert!(stale >= 1, "stale_heartbeat = {stale}");
    let resumed_at = Instant::now();
    let mut resumed = None;
    for _ in 0..50 {
        let report = ctx
            .probe
            .echo(dst, 1024, ECHO_TIMEOUT, Some(world.cgroup.path()))?;
        if report.ok && report.peer == Some(eddy.listen) {
            resumed = Some(resumed_at.elapsed());
            break;
        }
        if resumed_at.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let resumed = resumed.context("redirects did not resume within 5 s of SIGCONT")?;
    println!("SIGCONT: redirected again after {} ms", resumed.as_millis());
    Ok(())
}

/// f) SIGTERM: stop redirecting, detach, drain, unpin, exit 0.
#[test]
fn sigterm_leaves_nothing_attached() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    assert_eq!(
        world.cgroup.attached_programs()?.len(),
        3,
        "expected connect4, connect6 and sock_ops attached: {:?}",
        world.cgroup.attached_programs()?
    );
    let report = echo_ok(&ctx, dst, 1024, Some(world.cgroup.path()))?;
    assert_eq!(report.peer, Some(eddy.listen));

    let started = Instant::now();
    eddy.signal(libc::SIGTERM)?;
    let status = eddy.wait_exit(Duration::from_secs(20))?;
    println!(
        "SIGTERM: exited {status} after {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    let attached = world.cgroup.attached_programs()?;
    assert!(
        attached.is_empty(),
        "still attached after SIGTERM: {attached:?}"
    );
    assert!(
        !eddy.pin_dir.exists(),
        "{} still exists",
        eddy.pin_dir.display()
    );

    let after = echo_ok(&ctx, dst, 1024, Some(world.cgroup.path()))?;
    assert_eq!(
        after.peer,
        Some(dst),
        "after SIGTERM connects must go direct"
    );
    Ok(())
}

/// f) SIGTERM with a connection in flight: readiness drops to 503, new connects go direct,
/// the in-flight connection is drained (still served), then eddy exits 0.
#[test]
fn sigterm_drains_in_flight_connection() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let delay = Duration::from_millis(1500);
    let in_flight = ctx
        .probe
        .echo_background(dst, 64 * 1024, delay, Some(world.cgroup.path()))?;
    let active = eddy.wait_metric_at_least("eddy_active_connections", 1.0, METRIC_WAIT)?;
    assert!(active >= 1.0, "the in-flight connection never reached eddy");

    let started = Instant::now();
    eddy.signal(libc::SIGTERM)?;
    // Readiness must drop promptly once draining starts.
    let mut readyz = Err(anyhow::anyhow!("not polled"));
    for _ in 0..40 {
        readyz = eddy.admin_get("/readyz");
        if !matches!(readyz, Ok((200, _))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let new_conn = echo_ok(&ctx, dst, 1024, Some(world.cgroup.path()))?;
    assert_eq!(
        new_conn.peer,
        Some(dst),
        "new connects while draining must go direct"
    );

    let report = in_flight.finish(delay + Duration::from_secs(10))?;
    assert!(
        report.ok,
        "the in-flight connection was cut by the drain: {report:?}"
    );
    assert_eq!(
        report.peer,
        Some(eddy.listen),
        "the in-flight connection went through eddy"
    );
    let status = eddy.wait_exit(Duration::from_secs(20))?;
    println!(
        "SIGTERM with a connection in flight: exited {status} after {} ms (client sent {} ms \
         after connecting); /readyz while draining: {:?}",
        started.elapsed().as_millis(),
        delay.as_millis(),
        readyz
            .as_ref()
            .map(|(code, _)| code)
            .map_err(|e| e.to_string())
    );
    assert_eq!(status.code(), Some(0), "exit status after the drain");
    assert!(
        matches!(readyz, Ok((503, _))),
        "/readyz while draining should answer 503, got {:?}",
        readyz.map_err(|e| format!("{e:#}"))
    );
    Ok(())
}

/// g) 1,000 concurrent connections through the passthrough lose no byte.
#[test]
fn thousand_concurrent_connections_lose_no_byte() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    const CONNS: u64 = 1000;

    let report = ctx.probe.many(
        dst,
        CONNS,
        64 * 1024,
        Duration::from_secs(120),
        Some(world.cgroup.path()),
    )?;
    println!(
        "{CONNS} x 64 KiB: ok {} failed {} mismatched {} in {} ms; peers {:?}; errors {:?}",
        report.ok, report.failed, report.mismatched, report.elapsed_ms, report.peers, report.errors
    );
    assert_eq!(report.ok, CONNS, "{report:?}");
    assert_eq!(
        report.peers.get(&eddy.listen.to_string()).copied(),
        Some(CONNS),
        "every connection should have been redirected: {:?}",
        report.peers
    );
    let redirected = wait_event(&eddy, "redirected", CONNS)?;
    assert_eq!(redirected, CONNS, "redirected counter");
    let passthrough = eddy.wait_metric_at_least(PASSTHROUGH_SERIES, CONNS as f64, METRIC_WAIT)?;
    assert_eq!(passthrough as u64, CONNS, "{PASSTHROUGH_SERIES}");
    Ok(())
}

/// What a failed start must look like: non-zero exit, exactly one error line that says
/// what is wrong, nothing pinned.
fn assert_clean_failure(eddy: &mut Eddy, mentions: &str) -> Result<String> {
    let status = eddy.wait_exit(Duration::from_secs(15))?;
    let stderr = eddy.stderr();
    println!("exit {status}; stderr:\n{stderr}");
    assert!(!status.success(), "eddy should fail: {status}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.to_lowercase().contains("error"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line expected; stderr:\n{stderr}"
    );
    assert!(
        errors[0].contains(mentions),
        "the error line should mention {mentions:?}: {}",
        errors[0]
    );
    assert!(
        !eddy.pin_dir.exists(),
        "{} exists after a failed start",
        eddy.pin_dir.display()
    );
    Ok(errors[0].to_string())
}

/// h) Not privileged: eddy runs as `nobody` (no CAP_BPF, no CAP_NET_ADMIN) and must fail
///    with one clear line, before binding, attaching or writing anything.
#[test]
fn bad_setup_not_privileged() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut config = EddyConfig::new(world.cgroup.path());
    config.wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]
    .map(String::from)
    .to_vec();
    let mut eddy = Eddy::spawn(&ctx.eddy_bin, &config)?;
    assert_clean_failure(&mut eddy, "needs root")?;
    let attached = world.cgroup.attached_programs()?;
    assert!(
        attached.is_empty(),
        "attached after a failed start: {attached:?}"
    );
    Ok(())
}

/// h) A cgroup path that does not exist.
#[test]
fn bad_setup_missing_cgroup() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let mount = eddy_tests::cgroup::cgroup2_mount().context("cgroup2 mount")?;
    let missing = mount.join(format!("eddy-test-missing-{}", eddy_tests::unique_suffix()));
    let mut eddy = Eddy::spawn(&ctx.eddy_bin, &EddyConfig::new(&missing))?;
    assert_clean_failure(&mut eddy, &missing.display().to_string())?;
    Ok(())
}

/// h) An `--upstream-auth-file` that is not a Docker config.json: one line naming the file
///    and what is wrong, before anything is attached.
#[test]
fn bad_setup_upstream_auth_file() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("config.json");
    std::fs::write(
        &file,
        r#"{"auths": {"registry.test": {"auth": "not base64!"}}}"#,
    )?;
    let mut config = EddyConfig::new(world.cgroup.path());
    config.extra_args = vec!["--upstream-auth-file".into(), file.clone().into()];
    let mut eddy = Eddy::spawn(&ctx.eddy_bin, &config)?;
    let line = assert_clean_failure(&mut eddy, &file.display().to_string())?;
    assert!(line.contains("not base64"), "{line}");
    let attached = world.cgroup.attached_programs()?;
    assert!(
        attached.is_empty(),
        "attached after a failed start: {attached:?}"
    );
    Ok(())
}

/// h) The proxy listen port is already taken: fail before attaching anything.
#[test]
fn bad_setup_listen_port_in_use() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut config = EddyConfig::new(world.cgroup.path());
    config.listen = Some(taken.local_addr()?);
    let mut eddy = Eddy::spawn(&ctx.eddy_bin, &config)?;
    assert_clean_failure(&mut eddy, &taken.local_addr()?.to_string())?;
    let attached = world.cgroup.attached_programs()?;
    assert!(
        attached.is_empty(),
        "attached after a failed start: {attached:?}"
    );
    // And the cgroup still works, directly.
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let report = echo_ok(&ctx, dst, 1024, Some(world.cgroup.path()))?;
    assert_eq!(report.peer, Some(dst));
    Ok(())
}

/// h) `--cgroup auto` with no containerd: eddy runs in a fresh pid namespace (with its own
/// /proc) so that a containerd elsewhere on the machine cannot be found either.
#[test]
fn bad_setup_auto_without_containerd() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let mut config = EddyConfig::new(Path::new("auto"));
    config.wrapper = ["unshare", "--pid", "--fork", "--mount-proc"]
        .map(String::from)
        .to_vec();
    let mut eddy = Eddy::spawn(&ctx.eddy_bin, &config)?;
    assert_clean_failure(&mut eddy, "containerd")?;
    Ok(())
}

/// i) `eddy status --json` while running.
#[test]
fn status_json_while_running() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut config = EddyConfig::new(world.cgroup.path());
    config.intercept_ports = vec![INTERCEPTED_PORT, 8443];
    let eddy = ctx.start_eddy(&config)?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    echo_ok(&ctx, dst, 1024, Some(world.cgroup.path()))?;
    wait_event(&eddy, "redirected", 1)?;

    let status = eddy.status()?;
    println!("{status:#?}");
    assert!(status.running, "running");
    assert_eq!(status.pid, eddy.pid(), "pid");
    assert_eq!(status.pin_dir, eddy.pin_dir, "pin_dir");
    assert_eq!(
        status.cgroup.path.as_deref(),
        Some(world.cgroup.path()),
        "cgroup path"
    );
    let mut types: Vec<&str> = status
        .attached
        .iter()
        .map(|a| a.attach_type.as_str())
        .collect();
    types.sort();
    assert_eq!(
        types,
        ["connect4", "connect6", "sock_ops"],
        "{:?}",
        status.attached
    );
    assert!(status
        .attached
        .iter()
        .all(|a| a.prog_id > 0 && !a.name.is_empty()));
    assert_eq!(status.listen, eddy.listen.to_string(), "listen");
    let mut ports = status.intercept_ports.clone();
    ports.sort();
    assert_eq!(ports, [INTERCEPTED_PORT, 8443], "intercept_ports");
    let age = status
        .heartbeat_age_ms
        .context("heartbeat_age_ms is null while running")?;
    assert!(age < 1500, "heartbeat age {age} ms is not fresh");
    for counter in [
        "redirected",
        "skipped_loop",
        "stale_heartbeat",
        "skipped_netns",
        "record_failed",
        "orig_dst_published",
    ] {
        assert!(
            status.counters.contains_key(counter),
            "counter {counter} missing"
        );
    }
    assert!(status.counters["redirected"] >= 1, "{:?}", status.counters);
    Ok(())
}

/// i) `eddy status` with nothing pinned: non-zero exit and a message that says so.
#[test]
fn status_without_pins_fails_clearly() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let pin_dir = format!("/sys/fs/bpf/eddy-test-none-{}", eddy_tests::unique_suffix());
    let out = status_command(&ctx.eddy_bin, Path::new(&pin_dir))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("exit {}; stderr: {stderr}", out.status);
    assert!(
        !out.status.success(),
        "status should fail with nothing pinned"
    );
    assert!(
        stderr.contains(&pin_dir),
        "the message should name the pin dir: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    Ok(())
}

/// The harness's own cleanup: after a world is dropped, its cgroup and netns are gone.
#[test]
fn harness_cleans_up() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let cgroup = world.cgroup.path().to_path_buf();
    let netns = world.netns.name().to_string();
    let server_pid = world.server.pid();
    drop(world);
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "netns {netns} left behind"
    );
    assert!(
        !Path::new(&format!("/proc/{server_pid}")).exists(),
        "server {server_pid} left running"
    );
    Ok(())
}
