//! `cargo xtask soak [--minutes N] [--clients C]`: mixed cold and warm pulls from several
//! containerd clients through eddy against docker-registry for N minutes (not in CI).
//! `eddy-soak` from the eddy-tests crate does the work with the privileged tests' harness;
//! the report (pulls done and failed, p50/p99 pull time, eddy's RSS and open fds at start,
//! middle and end) is printed and written to target/soak/latest.md.
use anyhow::{bail, Result};

use crate::util::{self, cargo, target_dir, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Minutes of pulling (fractions allowed).
    #[arg(long, default_value_t = 15.0)]
    pub minutes: f64,
    /// Concurrent clients, one containerd each.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
}

pub fn run(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask soak needs root (it attaches BPF programs and creates a netns)");
    }
    util::ensure_programs(crate::test::PRIVILEGED_TEST_PROGRAMS)?;
    let eddy = crate::build::release()?;
    util::run(cargo().current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "eddy-tests",
        "--bins",
    ]))?;
    let out = target_dir().join("soak").join("latest.md");
    util::run(
        std::process::Command::new(target_dir().join("release").join("eddy-soak"))
            .args(["--minutes", &opts.minutes.to_string()])
            .args(["--clients", &opts.clients.to_string()])
            .arg("--out")
            .arg(&out)
            .env("EDDY_BIN", &eddy),
    )?;
    eprintln!("xtask: soak report written to {}", out.display());
    Ok(())
}
