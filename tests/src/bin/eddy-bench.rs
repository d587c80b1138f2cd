//! eddy-bench: the measurements behind `cargo xtask bench` (run as root, EDDY_BIN set).
//!
//! 1. connect() latency inside the hooked cgroup to an intercepted destination (redirected
//!    to eddy's listener) vs outside the cgroup straight to eddy's listener: the same
//!    endpoint, so the difference is what the hook costs. Also a non-intercepted port,
//!    inside vs outside (the cost of the hook deciding "not mine").
//! 2. Passthrough throughput: download from a server in a netns over a veth, through eddy
//!    vs direct.
//! 3. connect() latency again with `eddy run --bpf-log` (the eBPF hooks log each decision):
//!    what the decision logs cost when on. The figures in 1 are with them off (the default).
//!
//! Prints a markdown table and writes it to `--out`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use eddy_tests::{
    eddy::eddy_bin, require_privileges, wire::LatencyReport, Eddy, EddyConfig, Probe, World,
    INTERCEPTED_PORT, OTHER_PORT,
};

/// Measure eddy's hook cost and passthrough throughput
#[derive(Parser)]
#[command(name = "eddy-bench")]
struct Args {
    /// connect() samples per path.
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// Pause between connect() samples. Back-to-back connects (one every ~20 µs) outrun
    /// eddy's accept loop and overflow its accept queue, which measures capacity, not the
    /// hook's latency.
    #[arg(long, default_value_t = 200)]
    pause_us: u64,
    /// MiB per download.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Downloads per path; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where to write the markdown report.
    #[arg(long)]
    out: Option<PathBuf>,
}

// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.count > 0 && args.count <= 100_000,
        "--count must be in 1..=100000"
    );
    ensure!(
        args.mib > 0 && args.mib <= 4096,
        "--mib must be in 1..=4096"
    );
    ensure!(args.runs > 0 && args.runs <= 20, "--runs must be in 1..=20");
    ensure!(
        args.pause_us <= 100_000,
        "--pause-us must be at most 100000"
    );
    let pause = Duration::from_micros(args.pause_us);
    if !require_privileges() {
        bail!("benchmarks skipped: not privileged (see the SKIPPED line above)");
    }
    let probe = Probe::new(probe_bin()?);
    let world = World::new(&probe)?;
    let eddy = Eddy::start(&eddy_bin(), &EddyConfig::new(world.cgroup.path()))?;
    let cgroup = Some(world.cgroup.path());
    let intercepted = world.netns.v4(INTERCEPTED_PORT);
    let other = world.netns.v4(OTHER_PORT);

    // Warm up (ARP/ND, page cache, eddy's first connection) and prove the setup redirects.
    let warm = probe.echo(intercepted, 1024, Duration::from_secs(5), cgroup)?;
    ensure!(
        warm.ok && warm.peer == Some(eddy.listen),
        "warm-up connection was not redirected through eddy: {warm:?}"
    );

    eprintln!(
        "measuring connect() latency, {} samples per path",
        args.count
    );
    let hooked = latency(&probe, intercepted, args.count, pause, cgroup)?;
    ensure!(
        hooked.peer == Some(eddy.listen),
        "hooked connects were not redirected: {hooked:?}"
    );
    let unhooked = latency(&probe, eddy.listen, args.count, pause, None)?;
    let other_in = latency(&probe, other, args.count, pause, cgroup)?;
    let other_out = latency(&probe, other, args.count, pause, None)?;

    eprintln!(
        "measuring throughput, {} x {} MiB per path",
        args.runs, args.mib
    );
    let bytes = args.mib << 20;
    let mut via_eddy = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..args.runs {
        // Alternate the two paths so drift (thermal, other load) hits both alike.
        via_eddy.push(download(
            &probe,
            intercepted,
            bytes,
            cgroup,
            Some(eddy.listen),
        )?);
        direct.push(download(
            &probe,
            intercepted,
            bytes,
            None,
            Some(intercepted),
        )?);
    }
    let (via_eddy, direct) = (median(&mut via_eddy), median(&mut direct));
    let listen_off = eddy.listen;
    eddy.stop_quietly();

    eprintln!("measuring connect() latency with --bpf-log");
    let mut logging = EddyConfig::new(world.cgroup.path());
    logging.extra_args.push("--bpf-log".into());
    let eddy = Eddy::start(&eddy_bin(), &logging)?;
    let warm = probe.echo(intercepted, 1024, Duration::from_secs(5), cgroup)?;
    ensure!(
        warm.ok && warm.peer == Some(eddy.listen),
        "warm-up connection (--bpf-log) was not redirected through eddy: {warm:?}"
    );
    let hooked_log = latency(&probe, intercepted, args.count, pause, cgroup)?;
    ensure!(
        hooked_log.peer == Some(eddy.listen),
        "hooked connects (--bpf-log) were not redirected: {hooked_log:?}"
    );
    let unhooked_log = latency(&probe, eddy.listen, args.count, pause, None)?;
    let other_in_log = latency(&probe, other, args.count, pause, cgroup)?;
    let other_out_log = latency(&probe, other, args.count, pause, None)?;
    // Each redirect must really have been logged, or the figure measures nothing. The
    // reader drains the ring buffer asynchronously: give it a moment (bounded).
    let redirect_lines = |eddy: &Eddy| {
        eddy.stderr()
            .lines()
            .filter(|l| l.contains("eddy::bpf") && l.contains("redirect pid"))
            .count() as u64
    };
    let mut logged = redirect_lines(&eddy);
    for _ in 0..50 {
        if logged >= hooked_log.ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        logged = redirect_lines(&eddy);
    }
    ensure!(
        logged >= hooked_log.ok,
        "--bpf-log: {logged} redirect lines for {} redirected connects",
        hooked_log.ok
    );

    let mut md = String::new();
    md.push_str(&format!(
        "## eddy bench\n\nkernel {}, {} connect() samples per path ({} µs apart), {} x {} MiB \
         downloads per path (median), upstream {} in a netns behind a veth.\n\n",
        kernel_release(),
        args.count,
        args.pause_us,
        args.runs,
        args.mib,
        intercepted.ip()
    ));
    md.push_str("### connect() latency\n\n");
    md.push_str("| path | median µs | p90 µs | failed |\n|---|---:|---:|---:|\n");
    let row = |md: &mut String, name: String, r: &LatencyReport| {
        md.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            r.median_us, r.p90_us, r.failed
        ));
    };
    row(
        &mut md,
        format!("in hooked cgroup → {intercepted} (redirected to {listen_off})"),
        &hooked,
    );
    row(
        &mut md,
        format!("outside → {listen_off} directly (no hook)"),
        &unhooked,
    );
    md.push_str(&format!(
        "| **hook + redirect cost** | **{:+}** | **{:+}** | |\n",
        hooked.median_us as i64 - unhooked.median_us as i64,
        hooked.p90_us as i64 - unhooked.p90_us as i64
    ));
    row(
        &mut md,
        format!("in hooked cgroup → {other} (not intercepted)"),
        &other_in,
    );
    row(&mut md, format!("outside → {other}"), &other_out);
    md.push_str(&format!(
        "| **hook cost, not intercepted** | **{:+}** | **{:+}** | |\n",
        other_in.median_us as i64 - other_out.median_us as i64,
        other_in.p90_us as i64 - other_out.p90_us as i64
    ));
    md.push_str(&format!(
        "\n#### with the eBPF decision logs on (`--bpf-log`, {logged} redirect lines logged)\n\n"
    ));
    md.push_str("| path | median µs | p90 µs | failed |\n|---|---:|---:|---:|\n");
    row(
        &mut md,
        format!("in hooked cgroup → {intercepted} (redirected, logged)"),
        &hooked_log,
    );
    row(
        &mut md,
        format!("outside → {} directly (no hook)", eddy.listen),
        &unhooked_log,
    );
    md.push_str(&format!(
        "| **hook + redirect cost, logs on** | **{:+}** | **{:+}** | |\n",
        hooked_log.median_us as i64 - unhooked_log.median_us as i64,
        hooked_log.p90_us as i64 - unhooked_log.p90_us as i64
    ));
    row(
        &mut md,
        format!("in hooked cgroup → {other} (not intercepted, logged)"),
        &other_in_log,
    );
    row(&mut md, format!("outside → {other}"), &other_out_log);
    md.push_str(&format!(
        "| **hook cost, not intercepted, logs on** | **{:+}** | **{:+}** | |\n",
        other_in_log.median_us as i64 - other_out_log.median_us as i64,
        other_in_log.p90_us as i64 - other_out_log.p90_us as i64
    ));
    for (name, r) in [
        ("hooked", &hooked),
        ("unhooked", &unhooked),
        ("other in", &other_in),
        ("other out", &other_out),
        ("hooked, logs on", &hooked_log),
        ("unhooked, logs on", &unhooked_log),
        ("other in, logs on", &other_in_log),
        ("other out, logs on", &other_out_log),
    ] {
        if r.failed > 0 {
            md.push_str(&format!(
                "\n{name}: {} connects failed: {:?}\n",
                r.failed, r.errors
            ));
        }
    }
    md.push_str("\n### passthrough throughput\n\n");
    md.push_str("| path | MiB/s |\n|---|---:|\n");
    md.push_str(&format!("| direct (outside the cgroup) | {direct:.1} |\n"));
    md.push_str(&format!(
        "| through eddy (in hooked cgroup) | {via_eddy:.1} |\n"
    ));
    md.push_str(&format!(
        "| **ratio eddy / direct** | **{:.2}** |\n",
        via_eddy / direct.max(f64::MIN_POSITIVE)
    ));

    println!("{md}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// The probe next to this binary (both are built into the same target directory).
fn probe_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("EDDY_PROBE_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("eddy-probe");
    ensure!(
        bin.exists(),
        "{} not found (build with cargo build -p eddy-tests --bins)",
        bin.display()
    );
    Ok(bin)
}

fn latency(
    probe: &Probe,
    target: SocketAddr,
    count: u64,
    pause: Duration,
    cgroup: Option<&std::path::Path>,
) -> Result<LatencyReport> {
    let report = probe.connect_latency(target, count, pause, cgroup)?;
    ensure!(
        report.ok > 0,
        "no connect to {target} succeeded: {:?}",
        report.errors
    );
    Ok(report)
}

/// One download; checks it took the expected path. Returns MiB/s.
fn download(
    probe: &Probe,
    target: SocketAddr,
    bytes: u64,
    cgroup: Option<&std::path::Path>,
    expected_peer: Option<SocketAddr>,
) -> Result<f64> {
    let report = probe.download(target, bytes, Duration::from_secs(120), cgroup)?;
    ensure!(report.ok, "download from {target} failed: {report:?}");
    ensure!(
        report.peer == expected_peer,
        "download from {target} went via {:?}, expected {expected_peer:?}",
        report.peer
    );
    Ok(report.mib_per_s)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}
