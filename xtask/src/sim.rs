//! `cargo xtask sim`: a simulated cluster of N eddy nodes on this machine (`eddy-sim` in the
//! eddy-tests crate): simultaneous cold waves, a rollout, churn, scale-down and the idle
//! cost, each against a direct pull through the same shaped link. A benchmark, not a test:
//! its figures go to target/sim/sim.{json,md} and into docs/scale.md by hand.
use anyhow::{bail, Result};

use crate::util::{self, target_dir};

#[derive(clap::Args)]
pub struct Options {
    /// Nodes in the cluster (3..=240).
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    /// Scenarios, comma-separated: wave, rollout, churn, scale-down, idle (default: all).
    #[arg(long)]
    pub scenario: Option<String>,
    /// Simultaneous cold waves (a new image each); the worst upstream ratio is reported.
    #[arg(long, default_value_t = 1)]
    pub waves: usize,
    /// Link rate to the upstream registry (tc tbf syntax).
    #[arg(long, default_value = "200mbit")]
    pub rate: String,
    /// Exit non-zero when a target is missed (failed pulls, upstream above its bound).
    #[arg(long)]
    pub check: bool,
    /// More arguments for eddy-sim (after `--`): --layers-mib, --departing, --idle-secs, ...
    #[arg(last = true)]
    pub sim_args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    if !(3..=240).contains(&opts.nodes) {
        bail!(
            "--nodes {}: a simulated cluster has 3 to 240 nodes",
            opts.nodes
        );
    }
    if !util::is_root() {
        bail!(
            "cargo xtask sim needs root (it attaches BPF programs and creates network namespaces)"
        );
    }
    util::ensure_programs(crate::test::PRIVILEGED_TEST_PROGRAMS)?;
    let eddy = crate::build::release()?;
    let sim = util::build_test_bin("eddy-sim")?;
    let out = target_dir().join("sim");
    let mut cmd = std::process::Command::new(sim);
    cmd.args(["--nodes", &opts.nodes.to_string()])
        .args(["--waves", &opts.waves.to_string()])
        .args(["--rate", &opts.rate])
        .arg("--out")
        .arg(&out)
        .args(&opts.sim_args)
        .env("EDDY_BIN", &eddy);
    if let Some(s) = &opts.scenario {
        cmd.args(["--scenario", s]);
    }
    if opts.check {
        cmd.arg("--check");
    }
    util::run(&mut cmd)
}
