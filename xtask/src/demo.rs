//! `cargo xtask demo`: a real registry, real containerd, eddy in between.
//!
//! Builds the release eddy and the `eddy-demo` binary (eddy-tests crate, which shares the
//! privileged tests' harness), then runs the demo: a docker-registry behind a 200 Mbit/s
//! link in a network namespace, containerd in a fresh cgroup with eddy attached to it, a
//! cold pull, a warm pull from an empty content store, a `ctr run` of the image, and a
//! summary of where every byte came from. Everything it creates is removed at the end,
//! on failure too.
use anyhow::{bail, Result};

use crate::util;

/// What the demo drives beyond what the privileged tests do: the image's busybox rootfs.
const DEMO_PROGRAMS: &[(&str, &str)] = &[("tar", "tar"), ("busybox", "busybox-static")];

#[derive(clap::Args, Default)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!(
            "cargo xtask demo needs root: it creates a cgroup and a network namespace and \
             attaches BPF programs. Run it as root (e.g. `sudo -E cargo xtask demo`)."
        );
    }
    util::ensure_programs(crate::test::PRIVILEGED_TEST_PROGRAMS)?;
    util::ensure_programs(DEMO_PROGRAMS)?;
    let eddy = crate::build::release()?;
    let demo = util::build_test_bin("eddy-demo")?;
    eprintln!(
        "xtask: running {} with EDDY_BIN={}",
        demo.display(),
        eddy.display()
    );
    util::run(std::process::Command::new(demo).env("EDDY_BIN", &eddy))
}
