//! `cargo xtask bench`: what eddy costs.
//!
//! 1. connect() latency (median/p90) inside the hooked cgroup vs outside it, for an
//!    intercepted and a non-intercepted destination.
//! 2. Passthrough throughput through eddy vs direct, over a veth into a netns.
//!
//! The measuring is done by `eddy-bench` from the eddy-tests crate, which shares the
//! privileged tests' harness (cgroup, netns, eddy and probe guards that clean up on drop).
//! The markdown table is printed and written to target/bench/latest.md.
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
    /// Downloads per path (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            count: 2000,
            pause_us: 200,
            mib: 256,
            runs: 3,
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask bench needs root (it attaches BPF programs and creates a netns)");
    }
    util::ensure_programs(crate::test::PRIVILEGED_TEST_PROGRAMS)?;
    let eddy = util::build_release()?;
    eprintln!("xtask: building eddy-bench and eddy-probe");
    util::run(cargo().current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "eddy-tests",
        "--bins",
    ]))?;
    let release = target_dir().join("release");
    let out = target_dir().join("bench").join("latest.md");
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
    eprintln!("xtask: results written to {}", out.display());
    Ok(())
}
