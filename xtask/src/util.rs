//! Shared helpers: locating the workspace and target directory, running commands.
// unsafe: one geteuid call, without a libc dependency. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of xtask/). Cargo names xtask's directory at run time;
/// the compile-time path is only a fallback, because cargo does not rebuild xtask when the
/// checkout moves and a target dir shared by two checkouts would send this one to the other.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory for the workspace (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Where `build-ebpf` leaves the eBPF object, and where agent/build.rs looks for it.
pub fn ebpf_object() -> PathBuf {
    target_dir().join("eddy-ebpf.o")
}

/// The release `eddy` binary.
pub fn eddy_bin() -> PathBuf {
    target_dir().join("release").join("eddy")
}

/// The `cargo` that runs this xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Run a command to completion; fail with its description if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // Declared here: avoids a libc dependency for one call.
    extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

/// Install the Debian packages whose programs are missing (as root), or fail with the
/// exact command to run.
pub fn ensure_programs(programs: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = programs
        .iter()
        .filter(|(prog, _)| !on_path(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        bail!("missing programs; install them with: {install}");
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if apt(&["install", "-y", "--no-install-recommends"]
        .iter()
        .chain(missing.iter())
        .copied()
        .collect::<Vec<_>>())
    .is_err()
    {
        // A fresh machine has no package lists yet.
        apt(&["update"])?;
        apt(&["install", "-y", "--no-install-recommends"]
            .iter()
            .chain(missing.iter())
            .copied()
            .collect::<Vec<_>>())
        .with_context(|| format!("install with: {install}"))?;
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

/// Builds one of the eddy-tests crate's helper binaries (release) and returns its path.
pub fn build_test_bin(name: &str) -> Result<PathBuf> {
    eprintln!("xtask: building {name}");
    run(cargo().current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "eddy-tests",
        "--bin",
        name,
    ]))?;
    Ok(target_dir().join("release").join(name))
}
