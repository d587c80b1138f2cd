//! eddy-p2p-bench: the multi-node figures (run as root, EDDY_BIN set; `cargo xtask bench`
//! runs it after the registry figures). Nodes as in the P2P tests (`eddy_tests::cluster`):
//! each in its own network namespace on one bridge, with its own cgroup, containerd, ctr
//! client and eddy, in one swarm; the upstream docker-registry sits in another namespace on
//! that bridge, behind a tbf-shaped link.
//!
//! a. Peer-to-peer throughput: one 512 MiB blob that node 0 holds, fetched with curl through
//!    node 1's eddy (its store is cold: the bytes come from node 0, are verified, then served).
//!    curl's first byte marks the end of the verified transfer between the nodes; its last
//!    byte the end to end figure.
//! b. The second wave: a multi-layer image that node 0 pulled, pulled by another node, against
//!    a direct pull through the shaped link.
//! c. The simultaneous cold wave: all nodes pull one image at the same moment; the slowest
//!    pull against one node's cold pull of an image of the same shape, and upstream blob
//!    bytes against the image's size.
//! d. eddy's peak RSS on each node (VmHWM).
//! e. The cold wave of c on a second cluster with `--p2p-single-flight announce`
//!    (announce-then-fetch) instead of the election: the two strategies side by side.
use std::{fs, io::Write, path::PathBuf, time::Duration};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use eddy_tests::{
    cluster::{Cluster, NAMESPACE},
    containerd::Client,
    oci::ImageSpec,
    process::{cpu_seconds, peak_rss_kib},
    registry::{shape_link, UpstreamOptions, REGISTRY_HOST},
    require_privileges, MIB,
};

/// Measure eddy's P2P figures on a local cluster
#[derive(Parser)]
#[command(name = "eddy-p2p-bench")]
struct Args {
    /// Nodes in the swarm.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// tbf rate of the link to the upstream (tc syntax).
    #[arg(long, default_value = "200mbit")]
    rate: String,
    /// Layer sizes of the pulled images, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "32,16,8,4")]
    layers_mib: Vec<u64>,
    /// Size of the single blob for the throughput figure, in MiB.
    #[arg(long, default_value_t = 512)]
    blob_mib: u64,
    /// Append the markdown to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure only the peer-to-peer throughput (a), e.g. under a profiler.
    #[arg(long)]
    throughput_only: bool,
    /// Run the swarm without a swarm key (no --p2p-psk-file).
    #[arg(long)]
    open_swarm: bool,
}

// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        require_privileges(),
        "eddy-p2p-bench needs root, cgroup v2 and BPF"
    );
    let cluster = Cluster::start_with(
        args.nodes,
        UpstreamOptions::default(),
        &[],
        !args.open_swarm,
    )?;
    let layers: Vec<u64> = args.layers_mib.iter().map(|m| m * MIB).collect();
    let spec = ImageSpec::single(&layers);
    let mut md = String::from("\n### P2P (cargo xtask bench)\n\n| figure | value |\n|---|---|\n");

    // a. Peer-to-peer throughput of one warm blob.
    let big = cluster.image("p2p/big", "v1", &ImageSpec::single(&[args.blob_mib * MIB]))?;
    let layer = big.largest_layer();
    cluster.nodes[0]
        .fetch(&format!("{REGISTRY_HOST}/p2p/big:v1"))?
        .check("node 0's pull of the big blob")?;
    let eddy_pid = |i: usize| cluster.nodes[i].eddy.as_ref().map(|e| e.pid());
    let (serving, receiving) = (eddy_pid(0), eddy_pid(1));
    let cpu_before = (serving.map(cpu_seconds), receiving.map(cpu_seconds));
    let (first_byte, secs) = curl_blob(&cluster, 1, "p2p/big", &layer.digest)?;
    // What each end spent, for a node's CPU per GB (and for a machine with more cores than
    // this bench's, where both nodes share them).
    let cpu = |pid: Option<u32>, before: Option<f64>| match (pid, before) {
        (Some(pid), Some(before)) => cpu_seconds(pid) - before,
        _ => f64::NAN,
    };
    let (serving_cpu, receiving_cpu) = (cpu(serving, cpu_before.0), cpu(receiving, cpu_before.1));
    // Peer bytes are held until they verify, so curl's first byte marks the end of the
    // transfer between the nodes (with the lookup and curl's TLS handshake in it).
    let peer_gbps = layer.size as f64 / first_byte / 1e9;
    let gbps = layer.size as f64 / secs / 1e9;
    eprintln!(
        "a. peer-to-peer: {} MiB moved and verified in {first_byte:.2} s = {peer_gbps:.2} GB/s; \
         the client had all of it after {secs:.2} s = {gbps:.2} GB/s",
        layer.size / MIB
    );
    md += &format!(
        "| peer-to-peer, one warm {} MiB blob between two nodes' namespaces (moved and verified: curl's first byte through the cold node) | {first_byte:.2} s = **{peer_gbps:.2} GB/s** |\n",
        layer.size / MIB
    );
    md += &format!(
        "| the same blob end to end (curl's last byte: the transfer, then served from the store) | {secs:.2} s = **{gbps:.2} GB/s** |\n"
    );
    let gib = layer.size as f64 / (1u64 << 30) as f64;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "a. CPU: serving eddy {serving_cpu:.2} s, receiving eddy {receiving_cpu:.2} s (the receiving one also served curl), on {cpus} CPUs"
    );
    md += &format!(
        "| CPU of that transfer, end to end: serving eddy / receiving eddy (which also served curl), per GiB | {:.2} / {:.2} s, on {cpus} CPUs shared by both nodes |\n",
        serving_cpu / gib,
        receiving_cpu / gib,
    );
    // The machine's own ceiling for any node that stores the blob: writing that many bytes of
    // new file data (1 MiB writes, no fsync), on the filesystem of the nodes' data dirs, right
    // after the transfer. On a VM that hands freed memory back to its host, new page-cache
    // pages can cost far more than reused ones, and this varies with what ran before.
    let write_secs = new_file_write_secs(cluster.work.path(), layer.size)?;
    eprintln!(
        "a. reference: writing {} MiB of new file data on this machine: {write_secs:.2} s = {:.2} GB/s",
        layer.size / MIB,
        layer.size as f64 / write_secs / 1e9
    );
    md += &format!(
        "| reference, no eddy: writing {} MiB of new file data on the nodes' filesystem right after (1 MiB writes) | {write_secs:.2} s = {:.2} GB/s |\n",
        layer.size / MIB,
        layer.size as f64 / write_secs / 1e9
    );
    if args.throughput_only {
        print!("{md}");
        return Ok(());
    }

    shape_link(&cluster.netns, Some(&args.rate))?;

    // b. The second wave against direct through the shaped link.
    let wave = cluster.image("p2p/second", "v1", &spec)?;
    let reference = format!("{REGISTRY_HOST}/p2p/second:v1");
    cluster.nodes[0]
        .fetch(&reference)?
        .check("node 0's cold pull")?;
    let direct = {
        let node = &cluster.nodes[1];
        let client = Client {
            cgroup: None,
            ca_bundle: cluster.pki.ca_cert.clone(),
            ..node.client.clone()
        };
        let run = client.fetch(
            &node.containerd,
            "direct",
            &reference,
            &[],
            Duration::from_secs(300),
        )?;
        run.check("the direct pull")?.elapsed.as_secs_f64()
    };
    let second = cluster.nodes[2]
        .fetch(&reference)?
        .check("node 2's pull")?
        .elapsed
        .as_secs_f64();
    eprintln!(
        "b. second wave {second:.2} s, direct {direct:.2} s ({:.1}x)",
        direct / second
    );
    md += &format!(
        "| second wave ({} MiB image a peer holds) vs direct at {} | {second:.2} s vs {direct:.2} s: **{:.1}x faster** |\n",
        wave.total_bytes() / MIB,
        args.rate,
        direct / second
    );

    // c. The simultaneous cold wave against one cold pull.
    let single = cluster.image("p2p/single", "v1", &spec)?;
    let one = cluster.nodes[3 % cluster.nodes.len()]
        .fetch(&format!("{REGISTRY_HOST}/p2p/single:v1"))?
        .check("one cold pull")?
        .elapsed
        .as_secs_f64();
    let (wave_secs, upstream, ratio) = cold_wave(&cluster, &spec)?;
    eprintln!(
        "c. cold wave of {}: {wave_secs:.2} s vs one cold pull {one:.2} s ({:.2}x); upstream {ratio:.3}x the image",
        cluster.nodes.len(),
        wave_secs / one
    );
    md += &format!(
        "| simultaneous cold wave of {} nodes vs one cold pull ({} MiB image), `--p2p-single-flight elect` (default) | {wave_secs:.2} s vs {one:.2} s: **{:.2}x** |\n",
        cluster.nodes.len(),
        single.total_bytes() / MIB,
        wave_secs / one
    );
    md += &format!(
        "| upstream blob bytes during that wave / image size | **{ratio:.3}x** ({upstream} B) |\n"
    );

    // d. Peak RSS per node.
    let rss: Vec<String> = cluster
        .nodes
        .iter()
        .filter_map(|n| n.eddy.as_ref())
        .map(|e| peak_rss_kib(e.pid()).map(|k| format!("{:.1}", k as f64 / 1024.0)))
        .collect::<Result<_>>()?;
    eprintln!("d. peak RSS per node (MiB): {}", rss.join(", "));
    md += &format!(
        "| eddy peak RSS per node (VmHWM) | {} MiB |\n",
        rss.join(" / ")
    );

    // e. The same cold wave with announce-then-fetch instead of the election, on a cluster
    // of its own (same shape, same link), against the same one cold pull.
    drop(cluster);
    let announce = Cluster::start_with(
        args.nodes,
        UpstreamOptions::default(),
        &["--p2p-single-flight", "announce"],
        !args.open_swarm,
    )?;
    shape_link(&announce.netns, Some(&args.rate))?;
    let (secs, upstream, ratio) = cold_wave(&announce, &spec)?;
    eprintln!(
        "e. announce-then-fetch: cold wave {secs:.2} s ({:.2}x one cold pull); upstream {ratio:.3}x the image",
        secs / one
    );
    md += &format!(
        "| the same cold wave with `--p2p-single-flight announce` (another cluster, same link) | {secs:.2} s: **{:.2}x** one cold pull; upstream **{ratio:.3}x** the image ({upstream} B) |\n",
        secs / one
    );

    print!("{md}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?
            .write_all(md.as_bytes())?;
    }
    Ok(())
}

/// Every node pulls a new image of shape `spec` at the same moment: the seconds until the
/// last pull ended, the upstream blob bytes sent meanwhile, and those over the image size.
fn cold_wave(cluster: &Cluster, spec: &ImageSpec) -> Result<(f64, u64, f64)> {
    let cold = cluster.image("p2p/cold", "v1", spec)?;
    let before = cluster.upstream_blob_bytes()?;
    let started = std::time::Instant::now();
    let mut pulls = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let log = cluster.work.path().join(format!("wave-{i}.log"));
        let argv = node.containerd.ctr_args(
            NAMESPACE,
            &["content", "fetch", &format!("{REGISTRY_HOST}/p2p/cold:v1")],
        );
        pulls.push((node.client.spawn(&argv, &log)?, log));
    }
    for (i, (mut pull, log)) in pulls.into_iter().enumerate() {
        let status = pull
            .wait_timeout(Duration::from_secs(300))?
            .with_context(|| format!("node {i}'s pull did not finish"))?;
        ensure!(status.success(), "node {i}: {}", fs::read_to_string(log)?);
    }
    let secs = started.elapsed().as_secs_f64();
    let upstream = cluster.upstream_blob_bytes()? - before;
    Ok((secs, upstream, upstream as f64 / cold.total_bytes() as f64))
}

/// Seconds to write `bytes` of new data into a fresh file under `dir` (then removed).
fn new_file_write_secs(dir: &std::path::Path, bytes: u64) -> Result<f64> {
    let path = dir.join("write-reference");
    let chunk = vec![0x5a_u8; MIB as usize];
    let mut file = fs::File::create(&path)?;
    let started = std::time::Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(file);
    fs::remove_file(&path)?;
    Ok(secs)
}

/// Seconds for curl to fetch `digest` through node `i`'s eddy (body discarded): until the
/// first byte of the body, and until the last.
fn curl_blob(cluster: &Cluster, i: usize, repo: &str, digest: &str) -> Result<(f64, f64)> {
    let node = &cluster.nodes[i];
    let headers = cluster.work.path().join("curl.headers");
    let run = node.client.curl(
        &format!("https://{REGISTRY_HOST}/v2/{repo}/blobs/{digest}"),
        &[
            "--cacert",
            node.client.ca_bundle.to_str().context("utf-8 path")?,
            "-w",
            "%{time_starttransfer} %{time_total}",
        ],
        std::path::Path::new("/dev/null"),
        &headers,
        Duration::from_secs(300),
    )?;
    let run = run.check("curl of the blob")?;
    let times = run.stdout();
    let parsed: Vec<f64> = times
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("curl's -w times: {times:?}"))?;
    match parsed[..] {
        [first_byte, total] => Ok((first_byte, total)),
        _ => anyhow::bail!("curl's -w times: {times:?}"),
    }
}
