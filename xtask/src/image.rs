//! `cargo xtask image`: eddy's OCI image, built without a base image or a registry.
//!
//! The image is `FROM scratch` plus exactly what the release `eddy` needs at run time: the
//! binary (debug info stripped), the shared libraries `ldd` names (from the build host's
//! Debian packages libc6 and libgcc-s1) and the CA roots (ca-certificates' bundle, for
//! upstream registries). umoci (Debian) assembles the OCI layout; the result is also written
//! as an OCI archive that `ctr images import` (or `skopeo copy oci-archive:...`) reads.
//! The Dockerfile builds the same image where Docker exists.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::util::{self, target_dir, workspace_root};

pub const IMAGE_PROGRAMS: &[(&str, &str)] = &[
    ("umoci", "umoci"),
    ("ldd", "libc-bin"),
    ("objcopy", "binutils"),
    ("tar", "tar"),
];
/// The image's name in the chart's values (`image.repository`).
pub const REPOSITORY: &str = "ghcr.io/eddy-project/eddy";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(clap::Args, Default)]
pub struct Options {}

/// What `build` produced.
pub struct Built {
    /// `eddy-<version>.oci.tar`: an OCI image layout as a tar archive.
    pub archive: PathBuf,
    /// The tag, eddy's version.
    pub tag: String,
}

pub fn run(_opts: &Options) -> Result<()> {
    let built = build()?;
    eprintln!(
        "xtask: image {REPOSITORY}:{} in {}\n  import: ctr images import --base-name {REPOSITORY} {}\n  push:   skopeo copy oci-archive:{}:{} docker://REGISTRY/eddy:{}",
        built.tag,
        built.archive.display(),
        built.archive.display(),
        built.archive.display(),
        built.tag,
        built.tag
    );
    Ok(())
}

pub fn build() -> Result<Built> {
    let eddy = crate::build::release()?;
    build_from(&eddy)
}

/// The image around an already built release binary.
pub fn build_from(eddy: &Path) -> Result<Built> {
    util::ensure_programs(IMAGE_PROGRAMS)?;
    let tag = version()?;
    let out = target_dir().join("image");
    let layout = out.join(format!("eddy-{tag}"));
    let bundle = out.join("bundle");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;

    eprintln!("xtask: image: assembling the root file system");
    let image = format!("{}:{tag}", layout.display());
    util::run(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    )?;
    util::run(Command::new("umoci").args(["new", "--image", &image]))?;
    util::run(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
    )?;
    let rootfs = bundle.join("rootfs");
    let bin = rootfs.join("usr/local/bin/eddy");
    fs::create_dir_all(bin.parent().unwrap())?;
    util::run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(eddy)
            .arg(&bin),
    )?;
    for lib in shared_libraries(eddy)? {
        copy_into(&rootfs, &lib)?;
    }
    copy_into(&rootfs, Path::new(CA_BUNDLE))
        .context("the CA roots (Debian: apt-get install ca-certificates)")?;
    // Where the chart mounts the host's paths, and the default data dir.
    for dir in [
        "var/lib/eddy",
        "sys/fs/bpf",
        "sys/fs/cgroup",
        "tmp",
        "etc/eddy",
    ] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    util::run(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
    )?;

    let revision = git_revision();
    let mut config = Command::new("umoci");
    config.args([
        "config",
        "--image",
        &image,
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--config.entrypoint",
        "/usr/local/bin/eddy",
        "--config.cmd",
        "run",
        "--config.env",
        "PATH=/usr/local/bin",
        "--config.env",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        "--config.workingdir",
        "/",
    ]);
    for (key, value) in [
        ("org.opencontainers.image.title", "eddy".to_string()),
        (
            "org.opencontainers.image.description",
            "Transparent, fail-open container registry cache for every node".into(),
        ),
        ("org.opencontainers.image.version", tag.clone()),
        ("org.opencontainers.image.revision", revision),
        ("org.opencontainers.image.licenses", license()?),
        (
            "org.opencontainers.image.source",
            "https://github.com/eddy-project/eddy".into(),
        ),
    ] {
        config.args(["--config.label", &format!("{key}={value}")]);
        config.args(["--manifest.annotation", &format!("{key}={value}")]);
    }
    util::run(&mut config)?;
    util::run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    let _ = fs::remove_dir_all(&bundle);

    let archive = out.join(format!("eddy-{tag}.oci.tar"));
    util::run(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout)
            .arg("."),
    )?;
    Ok(Built { archive, tag })
}

/// The libraries the dynamic linker loads for `bin`, with the linker itself.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(bin).output()?;
    ensure!(
        output.status.success(),
        "ldd {}: {}",
        bin.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut libs = Vec::new();
    for line in String::from_utf8(output.stdout)?.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("ldd {}: {line}", bin.display());
        }
    }
    ensure!(
        !libs.is_empty(),
        "ldd found no libraries for {}",
        bin.display()
    );
    Ok(libs)
}

/// Copy a host file to the same path under `root`, following symlinks (Debian's /lib64 and
/// /lib are links into /usr), and keep the path the dynamic linker looks up.
fn copy_into(root: &Path, file: &Path) -> Result<()> {
    let dest = root.join(file.strip_prefix("/").unwrap_or(file));
    fs::create_dir_all(dest.parent().unwrap())?;
    fs::copy(file, &dest).with_context(|| format!("copying {}", file.display()))?;
    Ok(())
}

fn version() -> Result<String> {
    let manifest = fs::read_to_string(workspace_root().join("agent/Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_string)
        .context("no version in agent/Cargo.toml")
}

fn license() -> Result<String> {
    let manifest = fs::read_to_string(workspace_root().join("Cargo.toml"))?;
    Ok(manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("license = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or("NOASSERTION")
        .to_string())
}

fn git_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
