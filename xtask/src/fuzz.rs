//! `cargo xtask fuzz [--secs N] [--target NAME]...`: run every cargo-fuzz target in fuzz/
//! for N seconds each, from the committed seeds (fuzz/seeds/<target>) plus what earlier runs
//! found (<target dir>/fuzz/corpus/<target>), and print executions, coverage and crashes.
//!
//! Needs the nightly toolchain (sanitizer flags) and cargo-fuzz; installs cargo-fuzz at a
//! pinned version when it is missing. Crashing inputs land in fuzz/artifacts/<target>/;
//! every one becomes a unit test beside the parser before it is fixed.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::util::{self, target_dir, workspace_root};

/// The cargo-fuzz release that builds with the nightly on this project's machines.
pub const CARGO_FUZZ_VERSION: &str = "0.13.1";

#[derive(clap::Args)]
pub struct Options {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Run only these targets (default: every target in fuzz/Cargo.toml).
    #[arg(long = "target")]
    pub targets: Vec<String>,
}

/// One target's run, from libFuzzer's final stats.
struct Outcome {
    target: String,
    secs: f64,
    execs: u64,
    /// Coverage counters hit (libFuzzer's `cov:`) at the end.
    coverage: u64,
    corpus: usize,
    crashed: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    let fuzz_dir = workspace_root().join("fuzz");
    let targets = if opts.targets.is_empty() {
        all_targets(&fuzz_dir)?
    } else {
        opts.targets.clone()
    };
    ensure_cargo_fuzz()?;
    // agent/build.rs embeds the eBPF object, so the fuzz build needs it too.
    crate::build_ebpf::run(&Default::default())?;

    let work = target_dir().join("fuzz");
    let mut outcomes = Vec::new();
    for target in &targets {
        let corpus = work.join("corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        eprintln!("xtask: fuzzing {target} for {} s", opts.secs);
        let mut cmd = nightly_cargo();
        cmd.current_dir(&fuzz_dir)
            .args(["fuzz", "run", target.as_str()])
            .arg(&corpus)
            .args(seeds.is_dir().then_some(&seeds))
            .arg("--")
            .arg(format!("-max_total_time={}", opts.secs))
            .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"])
            .env("CARGO_TARGET_DIR", work.join("target"))
            .env("EDDY_EBPF_OBJECT", util::ebpf_object())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        let out = cmd
            .output()
            .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let log_path = work.join(format!("{target}.log"));
        fs::write(&log_path, log.as_bytes())?;
        if !out.status.success() && !log.contains("stat::number_of_executed_units") {
            // No stats at all: the build or the start failed, not the target.
            eprintln!("{}", tail(&log, 40));
            bail!(
                "cargo fuzz run {target} failed before fuzzing (log: {})",
                log_path.display()
            );
        }
        let outcome = Outcome {
            target: target.clone(),
            secs: fuzzing_secs(&log),
            execs: stat(&log, "stat::number_of_executed_units").unwrap_or(0),
            coverage: last_coverage(&log),
            corpus: fs::read_dir(&corpus)?.count(),
            crashed: !out.status.success(),
        };
        if outcome.crashed {
            eprintln!("{}", tail(&log, 40));
        }
        outcomes.push(outcome);
    }

    let report = render(&outcomes, opts.secs);
    println!("{report}");
    fs::write(work.join("latest.md"), &report)?;
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "crashes in {}: inputs in {}",
            crashed.join(", "),
            fuzz_dir.join("artifacts").display()
        );
    }
    Ok(())
}

/// `rustup run nightly cargo`, free of the stable toolchain's variables that the outer cargo
/// set for this xtask.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO");
    cmd
}

fn ensure_cargo_fuzz() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    if !matches!(&nightly, Ok(o) if o.status.success()) {
        bail!("fuzzing needs the nightly toolchain (rustup toolchain list shows none)");
    }
    let have = nightly_cargo().args(["fuzz", "--version"]).output();
    if matches!(&have, Ok(o) if o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    util::run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// The `[[bin]]` names in fuzz/Cargo.toml.
fn all_targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let manifest = fs::read_to_string(fuzz_dir.join("Cargo.toml"))?;
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(value) = line.strip_prefix("name = ").filter(|_| in_bin) {
            names.push(value.trim_matches('"').to_string());
        }
    }
    if names.is_empty() {
        bail!(
            "no [[bin]] targets in {}",
            fuzz_dir.join("Cargo.toml").display()
        );
    }
    Ok(names)
}

/// A libFuzzer `stat::NAME: VALUE` line.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.strip_prefix(name)?
            .trim_start_matches(':')
            .trim()
            .parse()
            .ok()
    })
}

/// libFuzzer's "Done N runs in S second(s)": time spent fuzzing, without the build.
fn fuzzing_secs(log: &str) -> f64 {
    log.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("Done ")?.split(" runs in ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

/// The `cov: N` of libFuzzer's last status line.
fn last_coverage(log: &str) -> u64 {
    log.lines()
        .rev()
        .find_map(|l| {
            let rest = l.split(" cov: ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn render(outcomes: &[Outcome], secs: u64) -> String {
    let mut out = format!(
        "### eddy fuzz run\n\n{secs} s per target (libFuzzer, ASan, debug assertions).\n\n\
         | target | seconds | executions | exec/s | coverage | corpus | crashes |\n\
         |---|---:|---:|---:|---:|---:|---:|\n"
    );
    for o in outcomes {
        out += &format!(
            "| {} | {:.0} | {} | {:.0} | {} | {} | {} |\n",
            o.target,
            o.secs,
            o.execs,
            o.execs as f64 / o.secs.max(1.0),
            o.coverage,
            o.corpus,
            if o.crashed {
                "1 (see fuzz/artifacts)"
            } else {
                "0"
            }
        );
    }
    out
}
