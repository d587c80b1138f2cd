//! The eBPF hooks' decision logs (aya-log): with `eddy run --bpf-log` (or a log filter
//! showing `eddy::bpf` at debug) each connect in the hooked cgroup shows up in eddy's log
//! under `eddy::bpf` (redirect, or skip and why); without either, none does.
//!
//! Each skip reason the tests can provoke has its own test: port not intercepted, not TCP,
//! eddy's own socket (loop mark), another network namespace, stale heartbeat. One cannot:
//! "record failed (map full)" (from connect4/6 and from sock_ops). Both maps it guards are
//! LRU hash maps of 65,536 entries (`ORIG_DST_CAPACITY`), and an insert into a full LRU map
//! evicts the least recently used entry instead of failing; it fails only when the kernel
//! cannot take a free node from the LRU lists under heavy concurrent updates, which no test
//! can make happen on purpose. interception.rs has no way to fill them either.
//!
//! Run as root: `EDDY_BIN=target/release/eddy cargo test -p eddy-tests --release --test
//! decision_log -- --test-threads=1` (or `cargo xtask test`).
use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use eddy_tests::{
    require_privileges, wire::EchoReport, Ctx, Eddy, EddyConfig, ProcessGuard, World,
    INTERCEPTED_PORT, OTHER_PORT,
};

const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_WAIT: Duration = Duration::from_secs(5);

fn setup() -> Option<Ctx> {
    require_privileges().then(|| Ctx::new(env!("CARGO_BIN_EXE_eddy-probe")))
}

/// eddy with its decision logs on (`--bpf-log`), hooking the world's cgroup; `tweak`
/// adjusts the rest of its configuration.
fn start_logging(ctx: &Ctx, world: &World, tweak: impl FnOnce(&mut EddyConfig)) -> Result<Eddy> {
    let mut config = EddyConfig::new(world.cgroup.path());
    config.extra_args.push("--bpf-log".into());
    tweak(&mut config);
    ctx.start_eddy(&config)
}

/// What a skip line for a connect to `port` says, after "skip pid N: ".
fn skip_needles(port: u16, reason: &str) -> [String; 2] {
    ["eddy::bpf".to_string(), format!("port {port}, {reason}")]
}

/// How many lines of eddy's log have every one of `needles`.
fn count_lines(eddy: &Eddy, needles: &[String]) -> usize {
    eddy.stderr()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n.as_str())))
        .count()
}

/// Wait (bounded) for a line with every one of `needles`; print it, or fail with the log.
fn expect_line(eddy: &Eddy, needles: &[String], what: &str) -> Result<String> {
    let line = wait_for_line(eddy, needles, LOG_WAIT).with_context(|| {
        format!(
            "no {what} decision line (wanted {needles:?}) with --bpf-log:\n{}",
            eddy.stderr()
        )
    })?;
    println!("{what}: {line}");
    Ok(line)
}

/// One redirected connect and one to a port eddy does not intercept, both from the hooked
/// cgroup; both must work.
fn two_connects(ctx: &Ctx, world: &World, eddy: &Eddy) -> Result<()> {
    let cgroup = Some(world.cgroup.path());
    let redirected =
        ctx.probe
            .echo(world.netns.v4(INTERCEPTED_PORT), 1024, ECHO_TIMEOUT, cgroup)?;
    ensure!(
        redirected.ok && redirected.peer == Some(eddy.listen),
        "the connect to :{INTERCEPTED_PORT} was not redirected: {redirected:?}"
    );
    let other = world.netns.v4(OTHER_PORT);
    let direct = ctx.probe.echo(other, 1024, ECHO_TIMEOUT, cgroup)?;
    ensure!(
        direct.ok && direct.peer == Some(other),
        "the connect to :{OTHER_PORT} did not go direct: {direct:?}"
    );
    Ok(())
}

/// Poll eddy's log (bounded) until it has a line with every one of `needles`.
fn wait_for_line(eddy: &Eddy, needles: &[String], timeout: Duration) -> Option<String> {
    let started = Instant::now();
    for _ in 0..200 {
        let log = eddy.stderr();
        if let Some(line) = log
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n.as_str())))
        {
            return Some(line.to_string());
        }
        if started.elapsed() > timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn ns_ip(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => format!("::ffff:{}", v4.ip()),
        SocketAddr::V6(v6) => v6.ip().to_string(),
    }
}

#[test]
fn bpf_log_shows_each_decision_and_is_off_by_default() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;

    // Off by default: the same connects leave no kernel-side line.
    let eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    two_connects(&ctx, &world, &eddy)?;
    std::thread::sleep(Duration::from_millis(500));
    let log = eddy.stderr();
    ensure!(
        !log.contains("eddy::bpf") && !log.contains("redirect pid"),
        "decision logs without --bpf-log:\n{log}"
    );
    eddy.stop_quietly();

    let eddy = start_logging(&ctx, &world, |_| {})?;
    two_connects(&ctx, &world, &eddy)?;
    let redirect = [
        "eddy::bpf".to_string(),
        "redirect pid".to_string(),
        format!(
            "{} port {INTERCEPTED_PORT} to eddy port {}",
            ns_ip(world.netns.v4(INTERCEPTED_PORT)),
            eddy.listen.port()
        ),
    ];
    let skip = [
        "eddy::bpf".to_string(),
        format!("port {OTHER_PORT} not intercepted"),
    ];
    expect_line(&eddy, &redirect, "redirect")?;
    expect_line(&eddy, &skip, "port not intercepted")?;
    eddy.stop_quietly();

    // A log filter that shows eddy::bpf at debug turns them on too, without the flag.
    let mut config = EddyConfig::new(world.cgroup.path());
    config.wrapper = ["env", "EDDY_LOG=info,eddy::bpf=debug"]
        .map(String::from)
        .to_vec();
    let eddy = ctx.start_eddy(&config)?;
    two_connects(&ctx, &world, &eddy)?;
    let redirect = ["eddy::bpf".to_string(), "redirect pid".to_string()];
    ensure!(
        wait_for_line(&eddy, &redirect, LOG_WAIT).is_some(),
        "no redirect decision line with EDDY_LOG=info,eddy::bpf=debug:\n{}",
        eddy.stderr()
    );
    eddy.stop_quietly();
    Ok(())
}

/// A UDP connect from the hooked cgroup (bash's /dev/udp: socket() and connect(), nothing
/// sent) runs the connect4 hook too, which leaves it alone.
#[test]
fn bpf_log_shows_not_tcp_skip() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let eddy = start_logging(&ctx, &world, |_| {})?;
    let mut udp = Command::new("bash");
    udp.args([
        "-c",
        &format!(r#"echo $$ > "$0" && exec 3<>/dev/udp/127.0.0.1/{INTERCEPTED_PORT}"#),
    ])
    .arg(world.cgroup.path().join("cgroup.procs"))
    .stdin(Stdio::null());
    let mut udp = ProcessGuard::spawn("bash (UDP connect)", &mut udp)?;
    let pid = udp.pid();
    let status = udp
        .wait_timeout(ECHO_TIMEOUT)?
        .context("bash's UDP connect did not finish")?;
    ensure!(status.success(), "bash's UDP connect failed: {status}");
    let line = [
        "eddy::bpf".to_string(),
        format!("skip pid {pid}: not TCP (protocol 17)"),
    ];
    expect_line(&eddy, &line, "not TCP")?;
    eddy.stop_quietly();
    Ok(())
}

/// eddy runs inside the hooked cgroup: its upstream connect for a proxied connection
/// carries its socket mark and is skipped, and the line names eddy's pid and that mark.
#[test]
fn bpf_log_shows_loop_mark_skip() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    // Not the default (0xedd1): the line must show the configured mark.
    const MARK: u32 = 0xe4d1;
    let eddy = start_logging(&ctx, &world, |config| {
        config.run_in_cgroup = Some(world.cgroup.path().to_path_buf());
        config
            .extra_args
            .extend(["--socket-mark".into(), MARK.to_string().into()]);
    })?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let report = ctx
        .probe
        .echo(dst, 1024, ECHO_TIMEOUT, Some(world.cgroup.path()))?;
    ensure!(
        report.ok && report.sha256_match && report.peer == Some(eddy.listen),
        "the connect to {dst} was not proxied by eddy: {report:?}"
    );
    let own = [
        "eddy::bpf".to_string(),
        format!(
            "skip pid {}: port {INTERCEPTED_PORT}, eddy's own socket (loop mark {MARK:x})",
            eddy.pid()
        ),
    ];
    expect_line(&eddy, &own, "loop mark")?;
    eddy.stop_quietly();
    Ok(())
}

/// A connect from the hooked cgroup but from another network namespace (the upstream's,
/// which the test created) goes direct, and the line says why.
#[test]
fn bpf_log_shows_other_netns_skip() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let eddy = start_logging(&ctx, &world, |_| {})?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let report = world.echo_from_upstream_netns(&ctx.probe, dst, 1024, ECHO_TIMEOUT)?;
    ensure!(
        report.ok && report.peer == Some(dst),
        "the connect from the other netns did not go direct: {report:?}"
    );
    let skip = skip_needles(INTERCEPTED_PORT, "other network namespace");
    expect_line(&eddy, &skip, "other netns")?;
    eddy.stop_quietly();
    Ok(())
}

/// Poll (bounded in count and time) until a connect from `cgroup` goes direct to `target`.
fn first_direct_echo(
    ctx: &Ctx,
    target: SocketAddr,
    cgroup: &Path,
    deadline: Duration,
) -> Result<Option<EchoReport>> {
    let started = Instant::now();
    for _ in 0..100 {
        if started.elapsed() > deadline {
            break;
        }
        // Attempts still redirected hang on the stopped proxy: keep them short.
        let report = ctx
            .probe
            .echo(target, 1024, Duration::from_millis(200), Some(cgroup))?;
        if report.ok && report.peer == Some(target) {
            return Ok(Some(report));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}

/// A stopped eddy stops refreshing its heartbeat, and connects go direct. Its log reader is
/// stopped too: the kernel side's records wait in aya-log's ring buffer (128 KiB; these
/// records are a few dozen bytes each, and the test makes at most ~100 connects), whose
/// epoll readiness eddy sees once it runs again. So after SIGCONT the stale-heartbeat lines
/// arrive, every one the kernel counted.
#[test]
fn bpf_log_shows_stale_heartbeat_skip() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let mut eddy = start_logging(&ctx, &world, |config| {
        config.heartbeat_timeout_ms = Some(1500);
    })?;
    let dst = world.netns.v4(INTERCEPTED_PORT);
    let stale = skip_needles(INTERCEPTED_PORT, "stale heartbeat (eddy not alive)");
    ensure!(
        count_lines(&eddy, &stale) == 0,
        "a stale-heartbeat line before the stop:\n{}",
        eddy.stderr()
    );

    let stopped_at = Instant::now();
    eddy.signal(libc::SIGSTOP)?;
    let direct = first_direct_echo(&ctx, dst, world.cgroup.path(), Duration::from_secs(3));
    eddy.signal(libc::SIGCONT)?;
    let direct = direct?.context("no connect went direct within 3 s of SIGSTOP")?;
    println!(
        "direct {} ms after SIGSTOP (heartbeat timeout 1500 ms): {direct:?}",
        stopped_at.elapsed().as_millis()
    );

    expect_line(&eddy, &stale, "stale heartbeat")?;
    let counted = eddy.wait_metric_at_least(
        &eddy_tests::eddy::bpf_event_series("stale_heartbeat"),
        1.0,
        LOG_WAIT,
    )? as usize;
    let started = Instant::now();
    let mut logged = count_lines(&eddy, &stale);
    while logged < counted && started.elapsed() < LOG_WAIT {
        std::thread::sleep(Duration::from_millis(50));
        logged = count_lines(&eddy, &stale);
    }
    ensure!(
        logged == counted,
        "{logged} stale-heartbeat lines for {counted} counted skips:\n{}",
        eddy.stderr()
    );
    eddy.stop_quietly();
    Ok(())
}
