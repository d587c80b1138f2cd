//! `cargo xtask build-ebpf`: build agent-ebpf for bpfel-unknown-none.
//!
//! rustup cannot fetch rust-src on these machines, so `-Z build-std=core` is out. Debian's
//! rustc-web ships a prebuilt `core` for the BPF targets instead; bpf-linker 0.13 links the
//! object against LLVM 22. See ../shared/facts/toolchain.md.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{self, run as run_cmd};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const BPF_CORE_DIR: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: the compiler with BPF `core`, and LLVM 22 for building bpf-linker.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
];

#[derive(clap::Args, Default)]
pub struct Options {
    /// Only check the prerequisites; do not install missing ones.
    #[arg(long)]
    pub no_install: bool,
}

/// Build the object and copy it to `target/eddy-ebpf.o`. Returns its path.
pub fn run(opts: &Options) -> Result<PathBuf> {
    ensure_debian_rustc(opts)?;
    let linker_dir = ensure_bpf_linker(opts)?;

    let root = util::workspace_root();
    let target = util::target_dir().join("ebpf");
    let path = format!(
        "{}:{}",
        linker_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    eprintln!("xtask: building the eBPF object (agent-ebpf)");
    run_cmd(
        util::cargo()
            .current_dir(root.join("agent-ebpf"))
            .args(["build", "--release", "--locked", "--target-dir"])
            .arg(&target)
            .env("RUSTC", DEBIAN_RUSTC)
            // aya-ebpf uses #![feature(asm_experimental_arch)] on a stable compiler.
            .env("RUSTC_BOOTSTRAP", "1")
            .env("PATH", path)
            // The BPF target has its own flags in agent-ebpf/.cargo/config.toml.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET"),
    )?;

    let built = target.join("bpfel-unknown-none/release/eddy-ebpf");
    let object = util::ebpf_object();
    std::fs::copy(&built, &object)
        .with_context(|| format!("copy {} to {}", built.display(), object.display()))?;
    eprintln!("xtask: eBPF object at {}", object.display());
    Ok(object)
}

fn ensure_debian_rustc(opts: &Options) -> Result<()> {
    let have_rustc = Path::new(DEBIAN_RUSTC).exists();
    let have_core = Path::new(BPF_CORE_DIR).is_dir();
    let have_llvm = Path::new(LLVM_PREFIX).join("bin/llvm-config").exists();
    if have_rustc && have_core && have_llvm {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !have_rustc {
        missing.push(format!("{DEBIAN_RUSTC} (Debian rustc-web)"));
    }
    if !have_core {
        missing.push(format!(
            "{BPF_CORE_DIR} (prebuilt core for BPF: libstd-rust-web-dev-bpf)"
        ));
    }
    if !have_llvm {
        missing.push(format!("{LLVM_PREFIX} (llvm-22-dev, for bpf-linker)"));
    }
    let install = format!("apt-get install -y {}", APT_PACKAGES.join(" "));
    if opts.no_install || !util::is_root() {
        bail!(
            "missing eBPF build prerequisites: {}\n  install them with: {install}",
            missing.join(", ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(", "));
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(APT_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| {
        format!("install with: {install} (run apt-get update first if it cannot find them)")
    })
}

/// Find bpf-linker 0.13 (PATH or ~/.cargo/bin), installing it against LLVM 22 if missing.
/// Returns the directory that holds it.
fn ensure_bpf_linker(opts: &Options) -> Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    candidates.push(cargo_home.join("bin"));
    for dir in &candidates {
        let linker = dir.join("bpf-linker");
        if let Ok(out) = Command::new(&linker).arg("--version").output() {
            let version = String::from_utf8_lossy(&out.stdout);
            if version.contains(BPF_LINKER_VERSION) {
                return Ok(dir.clone());
            }
            eprintln!(
                "xtask: ignoring {} ({}), need {BPF_LINKER_VERSION}",
                linker.display(),
                version.trim()
            );
        }
    }
    let install = format!(
        "LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo install --locked \
         bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
    );
    if opts.no_install {
        bail!("bpf-linker {BPF_LINKER_VERSION} not found\n  install it with: {install}");
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about 80 s on 2 cores)");
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run_cmd(
        util::cargo()
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(&cargo_home)
            .env("PATH", path)
            // Without these it finds /usr/bin/llvm-config (LLVM 14) and fails to link -lLLVM.
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )
    .with_context(|| format!("install bpf-linker with: {install}"))?;
    Ok(cargo_home.join("bin"))
}
