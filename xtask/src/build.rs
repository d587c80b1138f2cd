//! `cargo xtask build`: the eBPF object, then the release `eddy` binary with it embedded.
//!
//! Its own module so that util.rs (below everything) does not import build_ebpf.rs, which
//! imports util.rs.
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::{build_ebpf, util};

/// Build the eBPF object, then the release agent with it embedded. Returns the binary.
pub fn release() -> Result<PathBuf> {
    build_ebpf::run(&build_ebpf::Options::default())?;
    // containerd-client generates its gRPC bindings with protoc at build time.
    util::ensure_programs(&[("protoc", "protobuf-compiler")])?;
    eprintln!("xtask: building the release eddy binary");
    util::run(util::cargo().current_dir(util::workspace_root()).args([
        "build",
        "--release",
        "-p",
        "agent",
    ]))?;
    let bin = util::eddy_bin();
    if !bin.exists() {
        bail!("expected {} after the build", bin.display());
    }
    Ok(bin)
}
