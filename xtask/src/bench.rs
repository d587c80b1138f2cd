//! `cargo xtask bench`: what eddy costs.
//!
//! 1. connect() latency (median/p90) inside the hooked cgroup vs outside it, for an
//!    intercepted and a non-intercepted destination.
//! 2. Passthrough throughput through eddy vs direct, over a veth into a netns.
//! 3. eddy as a registry cache, with the upstream registry behind a 200 Mbit/s link: cold
//!    and warm pulls vs direct and vs distribution's pull-through cache, one warm 512 MiB
//!    blob over TLS beside `openssl speed`, upstream bytes and eddy's peak RSS for 8
//!    concurrent cold pulls.
//!
//! 4. P2P on a local cluster of nodes in one swarm: peer-to-peer throughput, the second
//!    wave against direct, the simultaneous cold wave, RSS per node (`eddy-p2p-bench`).
//!
//! The measuring is done by `eddy-bench` (1, 2) and `eddy-registry-bench` (3) from the
//! eddy-tests crate, which share the privileged tests' harness (cgroup, netns, registry,
//! containerd, eddy and probe guards that clean up on drop). The markdown tables are
//! printed and written to target/bench/latest.md.
use anyhow::{bail, Result};

use crate::util::{self, cargo, target_dir, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// connect() samples per path.
    #[arg(long, default_value_t = 2000)]
    pub count: u64,
    /// Pause between connect() samples, in µs (back-to-back connects overflow eddy's
    /// accept queue and measure capacity instead of latency).
    #[arg(long, default_value_t = 200)]
    pub pause_us: u64,
    /// MiB per download.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Downloads per path, and repetitions of each registry measurement (the median is
    /// reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Link rate to the upstream registry for the registry figures (tc tbf syntax).
    #[arg(long, default_value = "200mbit")]
    pub rate: String,
    /// Skip the interception figures (connect latency, passthrough throughput).
    #[arg(long)]
    pub skip_interception: bool,
    /// Skip the registry-cache figures.
    #[arg(long)]
    pub skip_registry: bool,
    /// Skip the multi-node P2P figures.
    #[arg(long)]
    pub skip_p2p: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            count: 2000,
            pause_us: 200,
            mib: 256,
            runs: 3,
            rate: "200mbit".into(),
            skip_interception: false,
            skip_registry: false,
            skip_p2p: false,
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask bench needs root (it attaches BPF programs and creates a netns)");
    }
    util::ensure_programs(crate::test::PRIVILEGED_TEST_PROGRAMS)?;
    let eddy = crate::build::release()?;
    eprintln!("xtask: building eddy-bench, eddy-registry-bench, eddy-p2p-bench and eddy-probe");
    util::run(cargo().current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "eddy-tests",
        "--bins",
    ]))?;
    let release = target_dir().join("release");
    let out = target_dir().join("bench").join("latest.md");
    if !opts.skip_interception {
        util::run(
            std::process::Command::new(release.join("eddy-bench"))
                .args(["--count", &opts.count.to_string()])
                .args(["--pause-us", &opts.pause_us.to_string()])
                .args(["--mib", &opts.mib.to_string()])
                .args(["--runs", &opts.runs.to_string()])
                .arg("--out")
                .arg(&out)
                .env("EDDY_BIN", &eddy)
                .env("EDDY_PROBE_BIN", release.join("eddy-probe")),
        )?;
    }
    if !opts.skip_registry {
        let mut cmd = std::process::Command::new(release.join("eddy-registry-bench"));
        cmd.args(["--runs", &opts.runs.to_string()])
            .args(["--rate", &opts.rate])
            .arg("--out")
            .arg(&out)
            .env("EDDY_BIN", &eddy);
        if !opts.skip_interception {
            cmd.arg("--append");
        }
        util::run(&mut cmd)?;
    }
    if !opts.skip_p2p {
        if opts.skip_interception && opts.skip_registry {
            let _ = std::fs::remove_file(&out);
        }
        util::run(
            std::process::Command::new(release.join("eddy-p2p-bench"))
                .args(["--rate", &opts.rate])
                .arg("--out")
                .arg(&out)
                .env("EDDY_BIN", &eddy),
        )?;
    }
    eprintln!("xtask: results written to {}", out.display());
    Ok(())
}
