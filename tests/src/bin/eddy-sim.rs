//! eddy-sim: a simulated cluster of N nodes on one machine (`cargo xtask sim`), run as root
//! with EDDY_BIN set. Each node is a network namespace on one bridge with its own hooked
//! cgroup, containerd, eddy and client (`ctr content fetch` in that cgroup), as in the P2P
//! tests (`eddy_tests::cluster`). Nodes find each other as the chart's pods do: one host
//! name that resolves to every node (a headless Service). The upstream docker-registry sits
//! in its own namespace behind a tbf-shaped link.
//!
//! Why a containerd per node, and ctr: `ctr content fetch` does the registry fetch in the
//! ctr process (in the node's hooked cgroup) exactly as a pull does, and writes the content
//! into that node's containerd, which eddy then reads as a source, as on a real node. One
//! shared containerd would share content between the nodes behind eddy's back (its default
//! content sharing policy makes a blob another namespace holds appear without a fetch).
//! An idle containerd costs ~30 MiB and no CPU, so 50 of them fit this machine.
//!
//! Scenarios (`--scenario`, repeatable; all by default), each against a direct pull of an
//! image of the same shape through the same link, measured in the same run:
//! - wave: every node pulls a new image at the same moment (`--waves` times);
//! - rollout: nodes start their pull one after another, `--rollout-gap-ms` apart;
//! - churn: a wave during which a third of the nodes (bootstrap nodes and the node fetching
//!   from upstream among them) are SIGKILLed;
//! - scale-down: `--departing` nodes leave for good; the rest pull an image only the departed
//!   nodes had, and one the survivors have;
//! - idle: the swarm idle for `--idle-secs`: CPU, RSS and DHT requests per node.
//!
//! The figures are printed and written as JSON and Markdown to `--out`. Everything the run
//! made is removed at the end, also on SIGINT/SIGTERM (the waits poll a flag the handler
//! sets, then the guards drop).
// unsafe: a SIGINT handler, and sysconf(_SC_CLK_TCK). Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use eddy_tests::{
    cluster::{Bootstrap, Cluster, ClusterSpec, NAMESPACE},
    containerd::Client,
    netns::NeighbourLimits,
    oci::{Image, ImageSpec},
    process::ProcessGuard,
    process::{cpu_seconds, rss_kib},
    registry::{shape_link, REGISTRY_HOST},
    require_privileges, MIB,
};
use serde::Serialize;

/// No pull in a scenario may take longer than this (a bound, not a figure).
const PULL_BOUND: Duration = Duration::from_secs(300);
/// Most nodes the simulated LAN has addresses for.
const MAX_NODES: usize = 240;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    Wave,
    Rollout,
    Churn,
    ScaleDown,
    Idle,
}

/// A simulated cluster of eddy nodes: cold waves, rollouts, churn, scale-down, idle cost
#[derive(Parser)]
#[command(name = "eddy-sim")]
struct Args {
    /// Nodes in the cluster (3..=240).
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Scenarios to run, in this order (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// tbf rate of the link to the upstream (tc syntax).
    #[arg(long, default_value = "200mbit")]
    rate: String,
    /// Layer sizes of each pulled image, in MiB (3 layers, 30 MiB by default).
    #[arg(long, value_delimiter = ',', default_value = "16,8,6")]
    layers_mib: Vec<u64>,
    /// Simultaneous cold waves to run (each with a new image); the worst is reported too.
    #[arg(long, default_value_t = 1)]
    waves: usize,
    /// Rollout: time between one node's pull start and the next's, in ms.
    #[arg(long, default_value_t = 200)]
    rollout_gap_ms: u64,
    /// Scale-down: nodes that leave for good (at most half the cluster).
    #[arg(long, default_value_t = 20)]
    departing: usize,
    /// Idle: seconds the swarm is left idle while its cost is measured.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Nodes started at once.
    #[arg(long, default_value_t = 1)]
    parallel_starts: usize,
    /// Where sim.json and sim.md (and each node's eddy log) go.
    #[arg(long, default_value = "target/sim")]
    out: PathBuf,
    /// Fail (exit 1) when a pull failed (a killed node's own excepted): eddy's one promise
    /// that holds at any load. The other targets are reported, not enforced: they are
    /// measurements of a machine shared by every node.
    #[arg(long)]
    check: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// Sleep up to `d`, waking early when interrupted.
fn sleep(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        check_interrupted()?;
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// One node's pull in a scenario.
#[derive(Debug, Clone, Serialize)]
struct Pull {
    node: usize,
    /// Seconds after the scenario's start that the pull started.
    started_s: f64,
    /// How long it took (until it failed, when it did).
    secs: f64,
    ok: bool,
    /// The node's eddy was killed during the pull (its failure is excepted).
    killed: bool,
    /// The end of ctr's output when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Upstream {
    /// Blob bytes the registry sent during the scenario.
    blob_bytes: u64,
    /// Those over the image's blob bytes.
    ratio: f64,
    /// The blob fetched most often from upstream, and how often (1 is the single flight).
    worst_blob_fetches: u64,
    /// Full-size GETs per digest.
    fetches: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
struct Spread {
    /// Bytes each node sent to peers, over the image size, sorted high to low.
    per_node: Vec<f64>,
    max: f64,
    /// Nodes that sent anything to peers.
    seeders: usize,
}

#[derive(Debug, Default, Serialize)]
struct PullSummary {
    pulls: Vec<Pull>,
    failed: usize,
    /// Failures of nodes whose eddy was killed (excepted).
    failed_killed: usize,
    p50_s: f64,
    p99_s: f64,
    max_s: f64,
    /// The pull that ended last, from the scenario's start.
    wave_s: f64,
}

#[derive(Debug, Default, Serialize)]
struct WaveReport {
    image_bytes: u64,
    direct_s: f64,
    pulls: PullSummary,
    upstream: Upstream,
    spread: Spread,
    /// eddy's error answers to clients during the wave (eddy_error_responses_total), summed.
    eddy_error_responses: f64,
    /// CPU time the whole machine spent during the wave (every node's eddy, client and
    /// containerd, and the upstream), in core-seconds, and eddy's part of it.
    machine_cpu_s: f64,
    eddy_cpu_s: f64,
    /// The machine's floor for this wave: its CPU time spread over every core (a wave that
    /// took about this long was bound by the CPU, not by eddy waiting).
    cpu_floor_s: f64,
    /// Machine CPU per GiB delivered to the clients.
    cpu_s_per_gib: f64,
}

#[derive(Debug, Default, Serialize)]
struct ChurnReport {
    wave: WaveReport,
    killed: Vec<usize>,
    /// Seconds into the wave when the nodes were killed.
    killed_at_s: f64,
    /// The node that was fetching from upstream when the kill came.
    upstream_fetcher: Option<usize>,
    /// Survivors' pull times: the longest after the kill.
    survivors_max_after_kill_s: f64,
    /// The same wave without churn (the last cold wave), for comparison.
    reference_wave_max_s: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
struct ScaleDownReport {
    departed: Vec<usize>,
    /// The image only the departed nodes had.
    departed_image: WaveReport,
    /// The image the survivors had.
    survivors_image: WaveReport,
    /// Survivors' failed peer fetches during both waves, by reason.
    peer_failures: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Serialize)]
struct IdleReport {
    secs: f64,
    /// Mean share of one core per eddy over the idle time, percent.
    cpu_percent_mean: f64,
    cpu_percent_max: f64,
    rss_mib_mean: f64,
    rss_mib_max: f64,
    /// DHT requests each node received per minute (the swarm's control traffic).
    dht_requests_per_node_per_min: f64,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    date: String,
    machine: String,
    nodes: usize,
    rate: String,
    layers_mib: Vec<u64>,
    startup_s: f64,
    waves: Vec<WaveReport>,
    rollout: Option<WaveReport>,
    churn: Option<ChurnReport>,
    scale_down: Option<ScaleDownReport>,
    idle: Option<IdleReport>,
    /// Targets missed (empty: all met).
    missed: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        (3..=MAX_NODES).contains(&args.nodes),
        "--nodes {}: a simulated cluster has 3 to {MAX_NODES} nodes (the LAN's /24 has room for {MAX_NODES}, and churn kills a third)",
        args.nodes
    );
    ensure!(
        !args.layers_mib.is_empty() && args.layers_mib.iter().all(|m| *m > 0),
        "--layers-mib: give one or more layer sizes above 0"
    );
    ensure!(args.waves >= 1, "--waves: at least 1");
    let scenarios = if args.scenario.is_empty() {
        vec![
            Scenario::Idle,
            Scenario::Wave,
            Scenario::Rollout,
            // Scale-down before churn: it needs twice as many live nodes as leave.
            Scenario::ScaleDown,
            Scenario::Churn,
        ]
    } else {
        args.scenario.clone()
    };
    if scenarios.contains(&Scenario::ScaleDown) {
        ensure!(
            args.departing >= 1 && args.departing * 2 <= args.nodes,
            "--departing {}: between 1 and half of --nodes ({})",
            args.departing,
            args.nodes
        );
    }
    ensure!(
        require_privileges(),
        "eddy-sim needs root, cgroup v2 (a cgroup2 mount), BPF (bpffs at /sys/fs/bpf) and network namespaces"
    );
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let result = run(&args, &scenarios);
    if interrupted() {
        eprintln!("eddy-sim: interrupted; everything it made has been removed");
    }
    result
}

fn run(args: &Args, scenarios: &[Scenario]) -> Result<()> {
    let layers: Vec<u64> = args.layers_mib.iter().map(|m| m * MIB).collect();
    let spec = ImageSpec::single(&layers);
    let started = Instant::now();
    eprintln!("eddy-sim: starting {} nodes", args.nodes);
    let _neighbours = NeighbourLimits::raise_for(args.nodes + 1)?;
    let cluster = Cluster::build_until(
        &ClusterSpec {
            bootstrap: Bootstrap::HostName,
            parallel_starts: args.parallel_starts,
            connect_timeout: Duration::from_secs(60 + args.nodes as u64),
            ..ClusterSpec::new(args.nodes)
        },
        &interrupted,
    )?;
    let startup_s = started.elapsed().as_secs_f64();
    eprintln!(
        "eddy-sim: {} nodes up and connected in {startup_s:.1} s",
        args.nodes
    );
    shape_link(&cluster.netns, Some(&args.rate))?;
    let mut sim = Sim {
        cluster,
        spec,
        images: 0,
        out: args.out.clone(),
    };
    let mut report = Report {
        date: today(),
        machine: machine(),
        nodes: args.nodes,
        rate: args.rate.clone(),
        layers_mib: args.layers_mib.clone(),
        startup_s,
        ..Report::default()
    };
    let outcome = (|| -> Result<()> {
        for scenario in scenarios {
            check_interrupted()?;
            eprintln!("eddy-sim: scenario {scenario:?}");
            match scenario {
                Scenario::Wave => {
                    for i in 0..args.waves {
                        let wave = sim.wave(Duration::ZERO)?;
                        eprintln!("eddy-sim: wave {}: {}", i + 1, wave.line());
                        report.waves.push(wave);
                    }
                }
                Scenario::Rollout => {
                    let wave = sim.wave(Duration::from_millis(args.rollout_gap_ms))?;
                    eprintln!("eddy-sim: rollout: {}", wave.line());
                    report.rollout = Some(wave);
                }
                Scenario::Churn => {
                    let mut churn = sim.churn()?;
                    churn.reference_wave_max_s = report.waves.last().map(|w| w.pulls.max_s);
                    eprintln!(
                        "eddy-sim: churn: killed {:?} at {:.2} s; {}",
                        churn.killed,
                        churn.killed_at_s,
                        churn.wave.line()
                    );
                    report.churn = Some(churn);
                }
                Scenario::ScaleDown => {
                    let down = sim.scale_down(args.departing)?;
                    eprintln!(
                        "eddy-sim: scale-down: departed image {}; survivors' image {}",
                        down.departed_image.line(),
                        down.survivors_image.line()
                    );
                    report.scale_down = Some(down);
                }
                Scenario::Idle => {
                    let idle = sim.idle(Duration::from_secs(args.idle_secs))?;
                    eprintln!(
                        "eddy-sim: idle: CPU {:.2}% of a core (max {:.2}%), RSS {:.1} MiB (max {:.1}), {:.1} DHT requests per node per minute",
                        idle.cpu_percent_mean,
                        idle.cpu_percent_max,
                        idle.rss_mib_mean,
                        idle.rss_mib_max,
                        idle.dht_requests_per_node_per_min
                    );
                    report.idle = Some(idle);
                }
            }
        }
        Ok(())
    })();
    sim.save_logs();
    outcome?;
    report.missed = missed(&report);
    let json = serde_json::to_string_pretty(&report)?;
    fs::write(args.out.join("sim.json"), json)?;
    let md = markdown(&report);
    fs::write(args.out.join("sim.md"), &md)?;
    print!("{md}");
    eprintln!(
        "eddy-sim: written {} and {}",
        args.out.join("sim.json").display(),
        args.out.join("sim.md").display()
    );
    sim.stop_quietly();
    let failed: Vec<&String> = report
        .missed
        .iter()
        .filter(|m| m.contains("failed"))
        .collect();
    if args.check && !failed.is_empty() {
        bail!("pulls failed: {failed:?}");
    }
    Ok(())
}

struct Sim {
    cluster: Cluster,
    spec: ImageSpec,
    images: usize,
    out: PathBuf,
}

impl Sim {
    /// A new image of the scenario's shape, pushed upstream, and its reference.
    fn push_image(&mut self, what: &str) -> Result<(Image, String)> {
        self.images += 1;
        let repo = format!("sim/{what}-{}", self.images);
        let image = self.cluster.image(&repo, "v1", &self.spec)?;
        Ok((image, format!("{REGISTRY_HOST}/{repo}:v1")))
    }

    fn live(&self) -> Vec<usize> {
        (0..self.cluster.nodes.len())
            .filter(|i| self.cluster.nodes[*i].eddy.is_some())
            .collect()
    }

    /// One pull of an image of the same shape straight from the upstream through the same
    /// link, by a live node's client outside the hooked cgroup (the figure eddy is held to).
    fn direct(&mut self) -> Result<f64> {
        let (_, reference) = self.push_image("direct")?;
        let node = &self.cluster.nodes[self.live()[0]];
        let client = Client {
            cgroup: None,
            ca_bundle: self.cluster.pki.ca_cert.clone(),
            ..node.client.clone()
        };
        let run = client.fetch(&node.containerd, "direct", &reference, &[], PULL_BOUND)?;
        Ok(run.check("the direct pull")?.elapsed.as_secs_f64())
    }

    /// Every live node pulls a new image, `gap` apart (zero: all at once).
    fn wave(&mut self, gap: Duration) -> Result<WaveReport> {
        let direct_s = self.direct()?;
        let (image, reference) = self.push_image("wave")?;
        let nodes = self.live();
        self.measure(&image, &reference, &nodes, gap, direct_s, |_, _| Ok(()))
    }

    /// Pull `reference` on `nodes`, `gap` apart; `tick` is called every poll with the
    /// elapsed time and the pulls' state (for churn).
    fn measure(
        &mut self,
        image: &Image,
        reference: &str,
        nodes: &[usize],
        gap: Duration,
        direct_s: f64,
        mut tick: impl FnMut(&mut Sim, Duration) -> Result<()>,
    ) -> Result<WaveReport> {
        let log_before = self.cluster.upstream.requests().len();
        let sent_before = self.per_node("eddy_p2p_sent_bytes_total");
        let errors_before: f64 = self.per_node("eddy_error_responses_total").iter().sum();
        let eddy_pids: Vec<u32> = self
            .cluster
            .nodes
            .iter()
            .filter_map(|n| n.eddy.as_ref().map(|e| e.pid()))
            .collect();
        let eddy_cpu_before: f64 = eddy_pids.iter().map(|p| cpu_seconds(*p)).sum();
        let machine_before = machine_busy_seconds()?;
        let pulls = self.pull(nodes, reference, gap, &mut tick)?;
        let machine_cpu_s = machine_busy_seconds()? - machine_before;
        // A killed eddy's time is gone with it: eddy's share is a lower bound under churn.
        let eddy_cpu_s =
            (eddy_pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - eddy_cpu_before).max(0.0);
        let sent_after = self.per_node("eddy_p2p_sent_bytes_total");
        let errors_after: f64 = self.per_node("eddy_error_responses_total").iter().sum();
        let image_bytes = image_blob_bytes(image);
        let upstream = self.upstream_since(log_before, image_bytes);
        let mut per_node: Vec<f64> = sent_after
            .iter()
            .zip(&sent_before)
            .map(|(a, b)| (a - b).max(0.0) / image_bytes as f64)
            .collect();
        per_node.sort_by(|a, b| b.total_cmp(a));
        let spread = Spread {
            max: per_node.first().copied().unwrap_or(0.0),
            seeders: per_node.iter().filter(|s| **s > 0.0).count(),
            per_node,
        };
        let delivered_gib =
            pulls.iter().filter(|p| p.ok).count() as f64 * image_bytes as f64 / (1u64 << 30) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Ok(WaveReport {
            image_bytes,
            direct_s,
            machine_cpu_s,
            eddy_cpu_s,
            cpu_floor_s: machine_cpu_s / cores,
            cpu_s_per_gib: if delivered_gib > 0.0 {
                machine_cpu_s / delivered_gib
            } else {
                0.0
            },
            pulls: summarize(pulls),
            upstream,
            spread,
            eddy_error_responses: (errors_after - errors_before).max(0.0),
        })
    }

    /// `ctr content fetch` on each of `nodes`, started `gap` apart; waits for all (bounded).
    fn pull(
        &mut self,
        nodes: &[usize],
        reference: &str,
        gap: Duration,
        tick: &mut impl FnMut(&mut Sim, Duration) -> Result<()>,
    ) -> Result<Vec<Pull>> {
        struct Running {
            node: usize,
            guard: ProcessGuard,
            log: PathBuf,
            started: Instant,
        }
        let t0 = Instant::now();
        let mut waiting: std::collections::VecDeque<usize> = nodes.iter().copied().collect();
        let mut running: Vec<Running> = Vec::new();
        let mut done: Vec<Pull> = Vec::new();
        let mut next_start = t0;
        let mut n = 0;
        while !waiting.is_empty() || !running.is_empty() {
            check_interrupted()?;
            while let Some(&node) = waiting.front() {
                if Instant::now() < next_start {
                    break;
                }
                waiting.pop_front();
                n += 1;
                let log = self
                    .cluster
                    .work
                    .path()
                    .join(format!("pull-{}-{n}-{node}.log", self.images));
                let c = &self.cluster.nodes[node];
                let argv = c
                    .containerd
                    .ctr_args(NAMESPACE, &["content", "fetch", reference]);
                let guard = c.client.spawn(&argv, &log)?;
                running.push(Running {
                    node,
                    guard,
                    log,
                    started: Instant::now(),
                });
                next_start += gap;
            }
            let mut i = 0;
            while i < running.len() {
                let r = &mut running[i];
                let status = r.guard.try_wait()?;
                let overdue = r.started.elapsed() > PULL_BOUND;
                if status.is_none() && !overdue {
                    i += 1;
                    continue;
                }
                let r = running.swap_remove(i);
                let secs = r.started.elapsed().as_secs_f64();
                let ok = status.is_some_and(|s| s.success());
                let error = (!ok).then(|| {
                    if overdue {
                        format!("did not finish within {PULL_BOUND:?}")
                    } else {
                        tail(&fs::read_to_string(&r.log).unwrap_or_default(), 3)
                    }
                });
                done.push(Pull {
                    node: r.node,
                    started_s: (r.started - t0).as_secs_f64(),
                    secs,
                    ok,
                    killed: self.cluster.nodes[r.node].eddy.is_none(),
                    error,
                });
            }
            tick(self, t0.elapsed())?;
            std::thread::sleep(Duration::from_millis(20));
        }
        done.sort_by_key(|p| p.node);
        Ok(done)
    }

    /// A series of every node's metrics (0 for a node that is gone), in node order.
    fn per_node(&self, series: &str) -> Vec<f64> {
        self.cluster
            .nodes
            .iter()
            .map(|n| n.metric(series))
            .collect()
    }

    /// What the registry's log says it sent since line `from`.
    fn upstream_since(&self, from: usize, image_bytes: u64) -> Upstream {
        let requests = self.cluster.upstream.requests();
        let mut up = Upstream::default();
        for r in requests.iter().skip(from) {
            if r.method == "GET" && r.uri.contains("/blobs/") && r.written > 0 {
                up.blob_bytes += r.written;
                let digest = r.uri.rsplit('/').next().unwrap_or("?").to_string();
                *up.fetches.entry(digest).or_default() += 1;
            }
        }
        up.ratio = up.blob_bytes as f64 / image_bytes as f64;
        up.worst_blob_fetches = up.fetches.values().copied().max().unwrap_or(0);
        up
    }

    /// A cold wave during which a third of the nodes are SIGKILLed: the bootstrap nodes
    /// (the first addresses the peers' host name lists), the node fetching from upstream, and
    /// others at random.
    fn churn(&mut self) -> Result<ChurnReport> {
        let direct_s = self.direct()?;
        let (image, reference) = self.push_image("churn")?;
        let nodes = self.live();
        let quota = nodes.len().div_ceil(3);
        let mut report = ChurnReport::default();
        let before = self.per_node(UPSTREAM_BYTES);
        let mut killed_at = None;
        let wave = self.measure(
            &image,
            &reference,
            &nodes,
            Duration::ZERO,
            direct_s,
            |sim, elapsed| {
                if killed_at.is_some() {
                    return Ok(());
                }
                // Mid-wave: once some node has upstream bytes flowing (or after 2 s regardless).
                let now = sim.per_node(UPSTREAM_BYTES);
                let fetcher = (0..now.len())
                    .filter(|i| sim.cluster.nodes[*i].eddy.is_some())
                    .max_by(|a, b| (now[*a] - before[*a]).total_cmp(&(now[*b] - before[*b])))
                    .filter(|i| now[*i] - before[*i] > 0.0);
                if fetcher.is_none() && elapsed < Duration::from_secs(2) {
                    return Ok(());
                }
                let mut victims: Vec<usize> = Vec::new();
                victims.extend(fetcher);
                for bootstrap in [0, 1] {
                    if !victims.contains(&bootstrap) {
                        victims.push(bootstrap);
                    }
                }
                let mut rest: Vec<usize> = (0..sim.cluster.nodes.len())
                    .filter(|i| !victims.contains(i))
                    .collect();
                use rand::seq::SliceRandom;
                rest.shuffle(&mut rand::thread_rng());
                victims.extend(rest.into_iter().take(quota.saturating_sub(victims.len())));
                victims.truncate(quota);
                for v in &victims {
                    if let Some(mut eddy) = sim.cluster.nodes[*v].eddy.take() {
                        eddy.kill9()?;
                        save_log(&sim.out, *v, &eddy.log_text());
                        eddy.stop_quietly();
                    }
                }
                victims.sort();
                report.killed = victims;
                report.upstream_fetcher = fetcher;
                killed_at = Some(elapsed);
                Ok(())
            },
        )?;
        report.killed_at_s = killed_at.map_or(0.0, |d| d.as_secs_f64());
        report.survivors_max_after_kill_s = wave
            .pulls
            .pulls
            .iter()
            .filter(|p| !p.killed)
            .map(|p| p.started_s + p.secs - report.killed_at_s)
            .fold(0.0, f64::max);
        report.wave = wave;
        Ok(report)
    }

    /// `departing` nodes pull one image and leave for good (SIGKILL, then their namespaces
    /// go, as a node the autoscaler removed); the survivors had pulled another. Then the
    /// survivors pull both.
    fn scale_down(&mut self, departing: usize) -> Result<ScaleDownReport> {
        let live = self.live();
        ensure!(
            live.len() >= departing * 2,
            "scale-down needs {} live nodes, {} are left",
            departing * 2,
            live.len()
        );
        let (leaving, staying) = live.split_at(departing);
        let (leaving, staying) = (leaving.to_vec(), staying.to_vec());
        let direct_s = self.direct()?;
        let (departed_image, departed_ref) = self.push_image("departed")?;
        let (kept_image, kept_ref) = self.push_image("kept")?;
        let first = self.pull(&leaving, &departed_ref, Duration::ZERO, &mut |_, _| Ok(()))?;
        ensure!(
            first.iter().all(|p| p.ok),
            "the departing nodes' own pull failed: {first:?}"
        );
        let second = self.pull(&staying, &kept_ref, Duration::ZERO, &mut |_, _| Ok(()))?;
        ensure!(
            second.iter().all(|p| p.ok),
            "the survivors' first pull failed: {second:?}"
        );
        for &i in &leaving {
            let node = &mut self.cluster.nodes[i];
            if let Some(mut eddy) = node.eddy.take() {
                eddy.kill9()?;
                save_log(&self.out, i, &eddy.log_text());
                eddy.stop_quietly();
            }
        }
        // Their addresses go too (the link down): dials to them now time out instead of
        // being refused, as with a machine that is gone.
        for &i in &leaving {
            let netns = self.cluster.nodes[i].netns.name().to_string();
            eddy_tests::process::run_ok(
                std::process::Command::new("ip")
                    .args(["-n", &netns, "link", "set", "eth0", "down"]),
            )?;
        }
        let failures_before = self.failures();
        let departed = self.measure(
            &departed_image,
            &departed_ref,
            &staying,
            Duration::ZERO,
            direct_s,
            |_, _| Ok(()),
        )?;
        let survivors = self.measure(
            &kept_image,
            &kept_ref,
            &staying,
            Duration::ZERO,
            direct_s,
            |_, _| Ok(()),
        )?;
        let failures_after = self.failures();
        let peer_failures = failures_after
            .into_iter()
            .map(|(k, v)| {
                let b = failures_before.get(&k).copied().unwrap_or(0.0);
                (k, v - b)
            })
            .filter(|(_, v)| *v > 0.0)
            .collect();
        Ok(ScaleDownReport {
            departed: leaving,
            departed_image: departed,
            survivors_image: survivors,
            peer_failures,
        })
    }

    /// eddy_peer_failures_total by reason, summed over the live nodes.
    fn failures(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for node in self.cluster.nodes.iter().filter(|n| n.eddy.is_some()) {
            let Ok(text) = node.eddy().metrics() else {
                continue;
            };
            for line in text
                .lines()
                .filter(|l| l.starts_with("eddy_peer_failures_total{"))
            {
                let Some((series, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let reason = series
                    .split("reason=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("?")
                    .to_string();
                *out.entry(reason).or_default() += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        out
    }

    /// The swarm left alone for `d`: CPU and RSS of every eddy, DHT requests received.
    fn idle(&mut self, d: Duration) -> Result<IdleReport> {
        let live: Vec<usize> = self.live();
        let pids: Vec<u32> = live
            .iter()
            .map(|i| self.cluster.nodes[*i].eddy().pid())
            .collect();
        let cpu_before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        let dht_before: f64 = self.per_node("eddy_p2p_dht_requests_total").iter().sum();
        let t0 = Instant::now();
        sleep(d)?;
        let secs = t0.elapsed().as_secs_f64();
        let dht_after: f64 = self.per_node("eddy_p2p_dht_requests_total").iter().sum();
        let cpu: Vec<f64> = pids
            .iter()
            .zip(&cpu_before)
            .map(|(p, b)| (cpu_seconds(*p) - b) / secs * 100.0)
            .collect();
        let rss: Vec<f64> = pids
            .iter()
            .map(|p| rss_kib(*p).map(|k| k as f64 / 1024.0))
            .collect::<Result<_>>()?;
        let n = live.len() as f64;
        Ok(IdleReport {
            secs,
            cpu_percent_mean: cpu.iter().sum::<f64>() / n,
            cpu_percent_max: cpu.iter().copied().fold(0.0, f64::max),
            rss_mib_mean: rss.iter().sum::<f64>() / n,
            rss_mib_max: rss.iter().copied().fold(0.0, f64::max),
            dht_requests_per_node_per_min: (dht_after - dht_before) / n / (secs / 60.0),
        })
    }

    /// Every live eddy's log into the output folder (for reading a run afterwards).
    fn save_logs(&self) {
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            if let Some(eddy) = &node.eddy {
                save_log(&self.out, i, &eddy.log_text());
            }
        }
    }

    fn stop_quietly(mut self) {
        for node in &mut self.cluster.nodes {
            if let Some(eddy) = node.eddy.take() {
                eddy.stop_quietly();
            }
        }
    }
}

const UPSTREAM_BYTES: &str = r#"eddy_bytes_total{source="upstream"}"#;

fn save_log(out: &std::path::Path, node: usize, text: &str) {
    let _ = fs::write(out.join(format!("node-{node}.log")), text);
}

/// Core-seconds the machine has spent busy since boot (/proc/stat: all but idle and iowait).
fn machine_busy_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    ensure!(ticks.len() >= 5, "unexpected /proc/stat line {cpu:?}");
    let busy: u64 = ticks.iter().sum::<u64>() - ticks[3] - ticks[4];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 / hz)
}

fn image_blob_bytes(image: &Image) -> u64 {
    image.total_bytes()
}

fn summarize(pulls: Vec<Pull>) -> PullSummary {
    let counted: Vec<&Pull> = pulls.iter().filter(|p| !p.killed).collect();
    let mut times: Vec<f64> = counted.iter().map(|p| p.secs).collect();
    times.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if times.is_empty() {
            return 0.0;
        }
        let idx = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1;
        times[idx]
    };
    PullSummary {
        failed: counted.iter().filter(|p| !p.ok).count(),
        failed_killed: pulls.iter().filter(|p| p.killed && !p.ok).count(),
        p50_s: pct(0.50),
        p99_s: pct(0.99),
        max_s: times.last().copied().unwrap_or(0.0),
        wave_s: counted
            .iter()
            .map(|p| p.started_s + p.secs)
            .fold(0.0, f64::max),
        pulls,
    }
}

impl WaveReport {
    fn line(&self) -> String {
        format!(
            "{} pulls, {} failed; p50 {:.2} s, p99 {:.2} s (direct {:.2} s); upstream {:.3}x the image, worst blob fetched {}x; most sent by one node {:.2}x the image",
            self.pulls.pulls.len(),
            self.pulls.failed,
            self.pulls.p50_s,
            self.pulls.p99_s,
            self.direct_s,
            self.upstream.ratio,
            self.upstream.worst_blob_fetches,
            self.spread.max
        )
    }
}

/// The issue's targets that this report misses.
fn missed(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for (i, w) in r.waves.iter().enumerate() {
        if w.pulls.failed > 0 {
            out.push(format!("wave {}: {} pulls failed", i + 1, w.pulls.failed));
        }
        if w.upstream.ratio > 1.05 {
            out.push(format!(
                "wave {}: upstream {:.3}x > 1.05x",
                i + 1,
                w.upstream.ratio
            ));
        }
    }
    if let Some(w) = &r.rollout {
        if w.pulls.failed > 0 {
            out.push(format!("rollout: {} pulls failed", w.pulls.failed));
        }
        if w.upstream.ratio > 1.01 {
            out.push(format!(
                "rollout: upstream {:.3}x > 1.01x",
                w.upstream.ratio
            ));
        }
    }
    if let Some(c) = &r.churn {
        if c.wave.pulls.failed > 0 {
            out.push(format!(
                "churn: {} surviving pulls failed",
                c.wave.pulls.failed
            ));
        }
    }
    if let Some(s) = &r.scale_down {
        for (what, w) in [
            ("departed image", &s.departed_image),
            ("survivors' image", &s.survivors_image),
        ] {
            if w.pulls.failed > 0 {
                out.push(format!(
                    "scale-down, {what}: {} pulls failed",
                    w.pulls.failed
                ));
            }
        }
        if s.departed_image.upstream.worst_blob_fetches > 1 {
            out.push(format!(
                "scale-down: a blob of the departed image came from upstream {}x",
                s.departed_image.upstream.worst_blob_fetches
            ));
        }
        if s.survivors_image.upstream.blob_bytes > 0 {
            out.push(format!(
                "scale-down: the survivors' image took {} B from upstream",
                s.survivors_image.upstream.blob_bytes
            ));
        }
    }
    if let Some(i) = &r.idle {
        if i.cpu_percent_mean > 0.5 {
            out.push(format!("idle: {:.2}% of a core > 0.5%", i.cpu_percent_mean));
        }
        if i.rss_mib_max > 64.0 {
            out.push(format!("idle: RSS {:.1} MiB > 64 MiB", i.rss_mib_max));
        }
    }
    out
}

// The report, section after section in the order it reads; long but flat.
#[allow(clippy::too_many_lines)]
fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### `cargo xtask sim --nodes {}`, {} ({})\n",
        r.nodes, r.date, r.machine
    );
    let _ = writeln!(
        md,
        "Image: {} layers of {:?} MiB, upstream link {}. Startup of the cluster: {:.1} s.\n",
        r.layers_mib.len(),
        r.layers_mib,
        r.rate,
        r.startup_s
    );
    let _ = writeln!(
        md,
        "| scenario | pulls (failed) | p50 / p99 / last | direct pull | upstream / image (worst blob) | most sent by one node (seeders) | eddy error answers |\n|---|---|---|---|---|---|---|"
    );
    let mut row = |name: String, w: &WaveReport| {
        let _ = writeln!(
            md,
            "| {name} | {} ({}) | {:.2} / {:.2} / {:.2} s | {:.2} s | {:.3}x ({}x) | {:.2}x ({}) | {} |",
            w.pulls.pulls.iter().filter(|p| !p.killed).count(),
            w.pulls.failed,
            w.pulls.p50_s,
            w.pulls.p99_s,
            w.pulls.wave_s,
            w.direct_s,
            w.upstream.ratio,
            w.upstream.worst_blob_fetches,
            w.spread.max,
            w.spread.seeders,
            w.eddy_error_responses
        );
    };
    for (i, w) in r.waves.iter().enumerate() {
        row(format!("cold wave {}", i + 1), w);
    }
    if let Some(w) = &r.rollout {
        row("rollout".into(), w);
    }
    if let Some(c) = &r.churn {
        row(format!("churn ({} killed)", c.killed.len()), &c.wave);
    }
    if let Some(s) = &r.scale_down {
        row(
            format!(
                "scale-down: image only the {} departed had",
                s.departed.len()
            ),
            &s.departed_image,
        );
        row(
            "scale-down: image the survivors had".into(),
            &s.survivors_image,
        );
    }
    md.push('\n');
    let mut cpu = |name: String, w: &WaveReport| {
        let _ = writeln!(
            md,
            "- {name}: the machine was busy {:.1} core-seconds ({:.1} of them eddy's), {:.1} s of CPU per GiB delivered; spread over every core that is a floor of {:.1} s, against the last pull ending at {:.1} s.",
            w.machine_cpu_s, w.eddy_cpu_s, w.cpu_s_per_gib, w.cpu_floor_s, w.pulls.wave_s
        );
    };
    for (i, w) in r.waves.iter().enumerate() {
        cpu(format!("cold wave {}", i + 1), w);
    }
    if let Some(w) = &r.rollout {
        cpu("rollout".into(), w);
    }
    md.push('\n');
    if !r.waves.is_empty() {
        let worst = r.waves.iter().map(|w| w.upstream.ratio).fold(0.0, f64::max);
        let worst_blob = r
            .waves
            .iter()
            .map(|w| w.upstream.worst_blob_fetches)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "Cold waves: worst upstream ratio {worst:.3}x over {} waves; no blob fetched more than {worst_blob}x from upstream.\n",
            r.waves.len()
        );
    }
    if let Some(w) = &r.rollout {
        let times: Vec<String> = w
            .pulls
            .pulls
            .iter()
            .map(|p| format!("{:.2}", p.secs))
            .collect();
        let _ = writeln!(
            md,
            "Rollout, each node's pull (s, node order): {}\n",
            times.join(", ")
        );
    }
    if let Some(w) = r.waves.last() {
        let spread: Vec<String> = w
            .spread
            .per_node
            .iter()
            .take(10)
            .map(|s| format!("{s:.2}"))
            .collect();
        let _ = writeln!(
            md,
            "Spread in the last cold wave, bytes sent to peers / image, top 10 nodes: {}\n",
            spread.join(", ")
        );
    }
    if let Some(c) = &r.churn {
        let _ = writeln!(
            md,
            "Churn: nodes {:?} SIGKILLed at {:.2} s (the upstream fetcher: {:?}); the last surviving pull ended {:.2} s after the kill; slowest surviving pull {:.2} s against {} in the cold wave without churn.\n",
            c.killed,
            c.killed_at_s,
            c.upstream_fetcher,
            c.survivors_max_after_kill_s,
            c.wave.pulls.max_s,
            c.reference_wave_max_s.map_or("n/a".into(), |s| format!("{s:.2} s"))
        );
    }
    if let Some(s) = &r.scale_down {
        let _ = writeln!(
            md,
            "Scale-down: survivors' failed peer fetches by reason: {:?}\n",
            s.peer_failures
        );
    }
    if let Some(i) = &r.idle {
        let _ = writeln!(
            md,
            "Idle for {:.0} s: CPU {:.2}% of a core per eddy (max {:.2}%), RSS {:.1} MiB (max {:.1}), {:.1} DHT requests received per node per minute.\n",
            i.secs, i.cpu_percent_mean, i.cpu_percent_max, i.rss_mib_mean, i.rss_mib_max, i.dht_requests_per_node_per_min
        );
    }
    if r.missed.is_empty() {
        md.push_str("Targets: all met.\n");
    } else {
        let _ = writeln!(md, "Targets missed: {}.", r.missed.join("; "));
    }
    md
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |k| k / (1 << 20));
    format!("{cpus} CPUs, {mem} GiB")
}
