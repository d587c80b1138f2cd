//! The eBPF hooks' decision logs (aya-log): with `eddy run --bpf-log` (or a log filter
//! showing `eddy::bpf` at debug) each connect in the hooked cgroup shows up in eddy's log
//! under `eddy::bpf` (redirect, or skip and why); without either, none does.
//!
//! Run as root: `EDDY_BIN=target/release/eddy cargo test -p eddy-tests --release --test
//! decision_log -- --test-threads=1` (or `cargo xtask test`).
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use eddy_tests::{require_privileges, Ctx, Eddy, EddyConfig, World, INTERCEPTED_PORT, OTHER_PORT};

fn setup() -> Option<Ctx> {
    require_privileges().then(|| Ctx::new(env!("CARGO_BIN_EXE_eddy-probe")))
}

/// One redirected connect and one to a port eddy does not intercept, both from the hooked
/// cgroup; both must work.
fn two_connects(ctx: &Ctx, world: &World, eddy: &Eddy) -> Result<()> {
    let cgroup = Some(world.cgroup.path());
    let redirected = ctx.probe.echo(
        world.netns.v4(INTERCEPTED_PORT),
        1024,
        Duration::from_secs(5),
        cgroup,
    )?;
    ensure!(
        redirected.ok && redirected.peer == Some(eddy.listen),
        "the connect to :{INTERCEPTED_PORT} was not redirected: {redirected:?}"
    );
    let other = world.netns.v4(OTHER_PORT);
    let direct = ctx
        .probe
        .echo(other, 1024, Duration::from_secs(5), cgroup)?;
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

    let mut config = EddyConfig::new(world.cgroup.path());
    config.extra_args.push("--bpf-log".into());
    let eddy = ctx.start_eddy(&config)?;
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
    let timeout = Duration::from_secs(5);
    let (Some(redirect), Some(skip)) = (
        wait_for_line(&eddy, &redirect, timeout),
        wait_for_line(&eddy, &skip, timeout),
    ) else {
        anyhow::bail!(
            "no redirect and skip decision lines with --bpf-log:\n{}",
            eddy.stderr()
        );
    };
    println!("{redirect}\n{skip}");
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
        wait_for_line(&eddy, &redirect, timeout).is_some(),
        "no redirect decision line with EDDY_LOG=info,eddy::bpf=debug:\n{}",
        eddy.stderr()
    );
    eddy.stop_quietly();
    Ok(())
}
