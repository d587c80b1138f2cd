//! `cargo xtask <command>`: eddy's build, test, demo and benchmark orchestration.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod build;
mod build_ebpf;
mod chart_test;
mod circles;
mod demo;
mod fuzz;
mod image;
mod sim;
mod soak;
mod test;
mod util;

#[derive(Parser)]
#[command(name = "xtask", about = "eddy's build, test, demo and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installs or checks its prerequisites first).
    BuildEbpf(build_ebpf::Options),
    /// Build the eBPF object and the release `eddy` binary with it embedded.
    Build,
    /// Run every test: unit tests, then the privileged end-to-end tests (root, cgroup v2, BPF).
    Test(test::Options),
    /// The main job: a real registry, real containerd, eddy in between; cold then warm pull.
    Demo(demo::Options),
    /// Fuzz eddy's parsers (cargo-fuzz, nightly): every target for --secs each.
    Fuzz(fuzz::Options),
    /// Mixed cold and warm pulls for --minutes through eddy; RSS, fds and pull times (not in CI).
    Soak(soak::Options),
    /// Build eddy's OCI image (FROM scratch: the binary, its libraries, CA roots) with umoci.
    Image(image::Options),
    /// Check the Helm chart with the real helm, kubectl and Kubernetes schemas (no cluster).
    ChartTest(chart_test::Options),
    /// Fail if modules of agent, xtask or the tests' library import each other in a circle.
    Circles(circles::Options),
    /// Measure eddy against direct upstream (and a distribution pull-through cache).
    Bench(bench::Options),
    /// A simulated cluster of N nodes: cold waves, rollout, churn, scale-down, idle cost.
    Sim(sim::Options),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(opts) => build_ebpf::run(&opts).map(drop),
        Command::Build => build::release().map(drop),
        Command::Test(opts) => test::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
        Command::Soak(opts) => soak::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::ChartTest(opts) => chart_test::run(&opts),
        Command::Circles(opts) => circles::run(&opts),
        Command::Image(opts) => image::run(&opts),
        Command::Sim(opts) => sim::run(&opts),
    }
}
