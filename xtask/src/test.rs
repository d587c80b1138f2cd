//! `cargo xtask test`: clippy (warnings fail), unit tests, then the privileged end-to-end tests.
//!
//! The privileged tests (tests/tests/*.rs in the eddy-tests crate) need root, cgroup v2 and
//! BPF, and drive the release `eddy` binary through `EDDY_BIN`. They run one at a time:
//! each attaches BPF programs and builds network namespaces, and timing-sensitive checks
//! (heartbeat, fail-open) should not compete with each other for the two CPUs.
use anyhow::{bail, Result};

use crate::util::{self, cargo, workspace_root};

/// What the privileged tests drive besides eddy (program, Debian package).
pub const PRIVILEGED_TEST_PROGRAMS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("unshare", "util-linux"),
    ("setpriv", "util-linux"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("openssl", "openssl"),
    ("mount", "mount"),
    ("nsenter", "util-linux"),
    // `cargo xtask image`, whose image the deploy tests run with ctr.
    ("umoci", "umoci"),
    ("objcopy", "binutils"),
    // containerd_source.rs packs OCI layouts for `ctr images import`.
    ("tar", "tar"),
];

#[derive(clap::Args, Default)]
pub struct Options {
    /// Run only the unit tests; the privileged end-to-end tests are NOT run.
    #[arg(long)]
    pub unit_only: bool,
    /// Run only the privileged end-to-end tests.
    #[arg(long, conflicts_with = "unit_only")]
    pub privileged_only: bool,
    /// Extra arguments for the privileged test run (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    // Milliseconds, no root: a new import circle fails before anything is built.
    crate::circles::run(&Default::default())?;
    let allow_skip = std::env::var("EDDY_ALLOW_SKIP").as_deref() == Ok("1");
    if !opts.unit_only && !util::is_root() && !allow_skip {
        bail!(
            "the privileged tests need root (cgroups, BPF, network namespaces).\n  \
             Run `cargo xtask test` as root, or `cargo xtask test --unit-only` for the unit \
             tests alone, or set EDDY_ALLOW_SKIP=1 to let them report SKIPPED."
        );
    }
    // Minutes, before anything slower: a new clippy warning fails the run.
    if !opts.privileged_only {
        clippy()?;
    }

    if !opts.unit_only {
        util::ensure_programs(PRIVILEGED_TEST_PROGRAMS)?;
    }
    // The agent embeds the eBPF object at compile time, so even its unit tests need it.
    let eddy = if opts.unit_only {
        crate::build_ebpf::run(&Default::default())?;
        None
    } else {
        Some(crate::build::release()?)
    };

    if !opts.privileged_only {
        // Seconds, and no root needed: the chart is checked with real helm and schemas.
        crate::chart_test::run(&Default::default())?;
        eprintln!("xtask: unit tests");
        // --release shares the dependency builds with the release binary.
        util::run(cargo().current_dir(workspace_root()).args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "eddy-tests",
        ]))?;
    }

    // The image the DaemonSet runs, tested with ctr by the privileged tests.
    let image = match &eddy {
        Some(eddy) => Some(crate::image::build_from(eddy)?),
        None => None,
    };
    let Some(eddy) = eddy else {
        eprintln!();
        eprintln!("xtask: ==========================================================");
        eprintln!("xtask: --unit-only: the privileged end-to-end tests were NOT run.");
        eprintln!("xtask: ==========================================================");
        return Ok(());
    };

    eprintln!(
        "xtask: privileged end-to-end tests with EDDY_BIN={}",
        eddy.display()
    );
    util::run(
        cargo()
            .current_dir(workspace_root())
            .args([
                "test",
                "-p",
                "eddy-tests",
                "--release",
                "--",
                "--test-threads=1",
            ])
            .args(&opts.test_args)
            .env("EDDY_BIN", &eddy)
            .env("EDDY_IMAGE", &image.expect("built with eddy").archive),
    )?;

    // The simulated cluster, scaled down (`cargo xtask sim` runs it at 50 nodes): no pull
    // may fail in a cold wave, a rollout, a scale-down or churn.
    eprintln!("xtask: simulated cluster of 8 nodes (eddy-sim --check)");
    let sim = util::build_test_bin("eddy-sim")?;
    util::run(
        std::process::Command::new(sim)
            .args([
                "--nodes",
                "8",
                "--departing",
                "3",
                "--idle-secs",
                "10",
                "--check",
            ])
            .arg("--out")
            .arg(crate::util::target_dir().join("sim-ci"))
            .env("EDDY_BIN", &eddy),
    )?;
    Ok(())
}

/// `cargo clippy --workspace --all-targets -- -D warnings`: the lints are configured in the
/// workspace's Cargo.toml (and clippy.toml), and any warning fails the run. Fails, rather than
/// skips, when clippy is missing: CI gets it from rustup's stable toolchain (component
/// `clippy`) or, with Debian's cargo-web, from the `rust-web-clippy` package (.ci/run).
fn clippy() -> Result<()> {
    let available = cargo()
        .args(["clippy", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        bail!(
            "`cargo clippy` is not available, and `cargo xtask test` runs it.\n  \
             With rustup: `rustup component add clippy`; with Debian's cargo-web: \
             `apt-get install rust-web-clippy`."
        );
    }
    // The agent's build script embeds the eBPF object, and containerd-client's generates
    // its gRPC bindings with protoc: clippy runs build scripts too.
    crate::build_ebpf::run(&Default::default())?;
    util::ensure_programs(&[("protoc", "protobuf-compiler")])?;
    eprintln!("xtask: clippy (warnings are errors)");
    util::run(cargo().current_dir(workspace_root()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}
