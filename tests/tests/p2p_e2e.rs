//! P2P with real programs: several eddy nodes in one swarm (see `eddy_tests::cluster`), each
//! with its own containerd, hooked cgroup and ctr client, in front of one docker-registry.
//! Each test asserts on the upstream's own logs (what left the registry) and on the nodes'
//! stores (nothing corrupt committed).
//!
//! Run as root: `cargo xtask test --privileged-only -- p2p`.
use std::{
    fs,
    os::unix::fs::FileExt,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use eddy_tests::{
    cluster::{write_swarm_key, Cluster, NAMESPACE},
    eddy::metric_value,
    oci::ImageSpec,
    registry::{shape_link, UpstreamOptions, REGISTRY_HOST},
    registry_eddy::{store_blob_dir, store_has, verify_store},
    require_privileges, MIB,
};

fn cluster(n: usize) -> Option<Cluster> {
    if !require_privileges() {
        return None;
    }
    Some(Cluster::start(n, UpstreamOptions::default(), &[]).expect("starting the cluster"))
}

fn reference(repo: &str) -> String {
    format!("{REGISTRY_HOST}/{repo}:v1")
}

fn verify_all(cluster: &Cluster) -> Result<()> {
    for (i, node) in cluster.nodes.iter().enumerate() {
        verify_store(node.data_dir()).with_context(|| format!("node {i}: a corrupt blob"))?;
    }
    Ok(())
}

#[test]
fn a_second_wave_comes_from_peers_not_upstream() -> Result<()> {
    let Some(cluster) = cluster(4) else {
        return Ok(());
    };
    let image = cluster.image(
        "p2p/wave",
        "v1",
        &ImageSpec::single(&[6 * MIB, 3 * MIB, MIB]),
    )?;
    cluster.nodes[0]
        .fetch(&reference("p2p/wave"))?
        .check("cold pull on node 0")?;
    let after_cold = cluster.upstream_blob_bytes()?;
    ensure!(
        after_cold >= image.total_bytes() - 64 * 1024,
        "the cold pull fetched {after_cold} B upstream, the image is {} B",
        image.total_bytes()
    );
    for (i, node) in cluster.nodes.iter().enumerate().skip(1) {
        node.fetch(&reference("p2p/wave"))?
            .check(&format!("pull on node {i}"))?;
        node.containerd.ensure_content(NAMESPACE, &image.blobs())?;
        ensure!(
            node.bytes_from("peer") >= image.layers().iter().map(|b| b.size).sum::<u64>() as f64,
            "node {i} got {} B from peers",
            node.bytes_from("peer")
        );
    }
    let after_wave = cluster.upstream_blob_bytes()?;
    ensure!(
        after_wave == after_cold,
        "the second wave fetched {} more blob bytes upstream",
        after_wave - after_cold
    );
    verify_all(&cluster)
}

#[test]
fn a_simultaneous_cold_wave_fetches_upstream_about_once() -> Result<()> {
    let Some(cluster) = cluster(4) else {
        return Ok(());
    };
    let image = cluster.image("p2p/cold", "v1", &ImageSpec::single(&[16 * MIB, 8 * MIB]))?;
    // Slow enough that the four pulls overlap for seconds, as on a real WAN link.
    shape_link(&cluster.netns, Some("200mbit"))?;
    let logs: Vec<_> = (0..cluster.nodes.len())
        .map(|i| cluster.work.path().join(format!("cold-{i}.log")))
        .collect();
    let mut pulls = Vec::new();
    for (node, log) in cluster.nodes.iter().zip(&logs) {
        let argv = node
            .containerd
            .ctr_args(NAMESPACE, &["content", "fetch", &reference("p2p/cold")]);
        pulls.push(node.client.spawn(&argv, log)?);
    }
    for (i, (mut pull, log)) in pulls.into_iter().zip(&logs).enumerate() {
        let status = pull
            .wait_timeout(Duration::from_secs(120))?
            .with_context(|| format!("node {i}'s pull did not finish"))?;
        ensure!(
            status.success(),
            "node {i}'s pull failed: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }
    for node in &cluster.nodes {
        node.containerd.ensure_content(NAMESPACE, &image.blobs())?;
    }
    let upstream = cluster.upstream_blob_bytes()?;
    let ratio = upstream as f64 / image.total_bytes() as f64;
    eprintln!(
        "cold wave of {}: upstream sent {upstream} B for a {} B image ({ratio:.3}x)",
        cluster.nodes.len(),
        image.total_bytes()
    );
    ensure!(ratio <= 1.05, "upstream sent {ratio:.3}x the image");
    verify_all(&cluster)
}

#[test]
fn the_serving_node_killed_mid_transfer_does_not_fail_the_pull() -> Result<()> {
    let Some(mut cluster) = cluster(2) else {
        return Ok(());
    };
    let image = cluster.image("p2p/kill", "v1", &ImageSpec::single(&[40 * MIB]))?;
    let layer = image.largest_layer();
    // 40 MiB at 60 Mbit/s: about 6 s upstream, so node 1 joins node 0's download midway.
    shape_link(&cluster.netns, Some("60mbit"))?;
    let log0 = cluster.work.path().join("kill-0.log");
    let argv = cluster.nodes[0]
        .containerd
        .ctr_args(NAMESPACE, &["content", "fetch", &reference("p2p/kill")]);
    let _first = cluster.nodes[0].client.spawn(&argv, &log0)?;
    // Until node 0 streams the layer (its in-flight download is announced).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.nodes[0].bytes_from("upstream") < (4 * MIB) as f64 {
        ensure!(Instant::now() < deadline, "node 0 never started the layer");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log1 = cluster.work.path().join("kill-1.log");
    let argv = cluster.nodes[1]
        .containerd
        .ctr_args(NAMESPACE, &["content", "fetch", &reference("p2p/kill")]);
    let mut second = cluster.nodes[1].client.spawn(&argv, &log1)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.nodes[1].bytes_from("peer") < MIB as f64 {
        ensure!(
            Instant::now() < deadline,
            "node 1 never streamed from node 0"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The node serving the layer dies mid-transfer.
    cluster.nodes[0]
        .eddy
        .take()
        .expect("node 0 runs")
        .kill9()
        .context("killing node 0")?;
    let status = second
        .wait_timeout(Duration::from_secs(120))?
        .context("node 1's pull did not finish")?;
    ensure!(
        status.success(),
        "node 1's pull failed after its peer died: {}",
        fs::read_to_string(&log1).unwrap_or_default()
    );
    cluster.nodes[1]
        .containerd
        .ensure_content(NAMESPACE, &image.blobs())?;
    ensure!(store_has(cluster.nodes[1].data_dir(), &layer.digest));
    verify_store(cluster.nodes[1].data_dir())?;
    Ok(())
}

#[test]
fn a_rogue_peer_is_detected_and_its_bytes_are_never_served() -> Result<()> {
    let Some(cluster) = cluster(2) else {
        return Ok(());
    };
    let image = cluster.image("p2p/rogue", "v1", &ImageSpec::single(&[8 * MIB]))?;
    let layer = image.largest_layer();
    let (rogue, victim) = (&cluster.nodes[0], &cluster.nodes[1]);
    rogue
        .fetch(&reference("p2p/rogue"))?
        .check("cold pull on the rogue")?;
    // The rogue's copy goes bad on disk after it was verified: it serves wrong bytes.
    let path = store_blob_dir(rogue.data_dir()).join(layer.digest.trim_start_matches("sha256:"));
    let file = fs::OpenOptions::new().write(true).open(&path)?;
    file.write_all_at(b"corrupt!", 1_000_000)?;
    drop(file);
    let upstream_before = cluster.upstream_blob_bytes()?;
    victim
        .fetch(&reference("p2p/rogue"))?
        .check("the pull next to a rogue peer")?;
    victim
        .containerd
        .ensure_content(NAMESPACE, &image.blobs())?;
    let metrics = victim.eddy().metrics()?;
    let mismatches = metric_value(
        &metrics,
        r#"eddy_peer_failures_total{reason="digest_mismatch"}"#,
    )
    .unwrap_or(0.0);
    ensure!(mismatches >= 1.0, "no digest mismatch recorded:\n{metrics}");
    verify_store(victim.data_dir()).context("the victim committed the rogue's bytes")?;
    ensure!(
        cluster.upstream_blob_bytes()? > upstream_before,
        "the victim's pull must have gone upstream after the rogue failed"
    );
    Ok(())
}

#[test]
fn a_node_with_another_key_fetches_nothing_from_the_swarm() -> Result<()> {
    let Some(mut cluster) = cluster(2) else {
        return Ok(());
    };
    let image = cluster.image("p2p/psk", "v1", &ImageSpec::single(&[4 * MIB]))?;
    cluster.nodes[0]
        .fetch(&reference("p2p/psk"))?
        .check("cold pull")?;
    let other_key = cluster.work.path().join("other.key");
    write_swarm_key(&other_key)?;
    let bootstrap: Vec<_> = cluster.nodes.iter().map(|n| n.p2p).collect();
    let outsider = cluster.node(9, &bootstrap, Some(&other_key), &[])?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(outsider.peers() == 0.0, "the outsider joined the swarm");
    let before = cluster.upstream_blob_bytes()?;
    outsider
        .fetch(&reference("p2p/psk"))?
        .check("the outsider's pull")?;
    ensure!(
        outsider.bytes_from("peer") == 0.0,
        "the outsider got bytes from a peer"
    );
    ensure!(
        cluster.upstream_blob_bytes()? - before >= image.layers()[0].size,
        "the outsider's layer must come from upstream"
    );
    cluster.nodes.push(outsider);
    Ok(())
}

#[test]
fn with_upstream_down_a_new_node_pulls_by_tag_through_peers() -> Result<()> {
    let Some(mut cluster) = cluster(2) else {
        return Ok(());
    };
    let image = cluster.image("p2p/outage", "v1", &ImageSpec::single(&[4 * MIB, MIB]))?;
    cluster.nodes[0]
        .fetch(&reference("p2p/outage"))?
        .check("cold pull on node 0")?;
    cluster.upstream.stop_registry()?;
    let node = &cluster.nodes[1];
    node.fetch(&reference("p2p/outage"))?
        .check("node 1's pull by tag with upstream down")?;
    node.containerd.ensure_content(NAMESPACE, &image.blobs())?;
    verify_all(&cluster)
}

#[test]
fn an_image_only_in_one_nodes_containerd_is_served_to_another_node() -> Result<()> {
    let Some(cluster) = cluster(2) else {
        return Ok(());
    };
    let image = cluster.image("p2p/before", "v1", &ImageSpec::single(&[6 * MIB, 2 * MIB]))?;
    // Pulled before eddy was there: straight from upstream into node 0's containerd.
    cluster.nodes[0]
        .pull_direct(&reference("p2p/before"))?
        .check("the direct pull on node 0")?;
    for layer in image.layers() {
        ensure!(
            !store_has(cluster.nodes[0].data_dir(), &layer.digest),
            "the direct pull went through eddy"
        );
    }
    // Until node 0's eddy learned the image from containerd's events and advertised it.
    let blobs = image.blobs().len() as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = cluster.nodes[0].eddy().metrics()?;
        let known = metric_value(&metrics, "eddy_containerd_digests").unwrap_or(0.0);
        let advertised = metric_value(&metrics, "eddy_p2p_advertised_digests").unwrap_or(0.0);
        if known >= blobs && advertised >= blobs {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "node 0's eddy knows {known} containerd digests and advertises {advertised}, of {blobs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = cluster.upstream_blob_bytes()?;
    let node = &cluster.nodes[1];
    node.fetch(&reference("p2p/before"))?
        .check("node 1's pull")?;
    node.containerd.ensure_content(NAMESPACE, &image.blobs())?;
    let layers: u64 = image.layers().iter().map(|b| b.size).sum();
    ensure!(
        node.bytes_from("peer") >= layers as f64,
        "node 1 got {} B from peers, the layers are {layers} B; its metrics:\n{}",
        node.bytes_from("peer"),
        node.eddy()
            .metrics()?
            .lines()
            .filter(|l| l.starts_with("eddy_requests_total")
                || l.starts_with("eddy_peer_failures")
                || l.starts_with("eddy_bytes_total")
                || l.starts_with("eddy_p2p"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        cluster.upstream_blob_bytes()? == before,
        "node 1 fetched {} blob bytes upstream",
        cluster.upstream_blob_bytes()? - before
    );
    verify_all(&cluster)
}

/// containerd's content may have been pulled with anyone's credentials: a client gets it
/// from there only when upstream accepts that client's own credentials.
#[test]
fn private_content_in_containerd_needs_the_clients_credentials() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let options = UpstreamOptions {
        basic_auth: Some(("puller".into(), "secret".into())),
        ..Default::default()
    };
    let cluster = Cluster::start(1, options, &[])?;
    let image = cluster.image("p2p/private", "v1", &ImageSpec::single(&[2 * MIB]))?;
    let node = &cluster.nodes[0];
    node.pull_direct_with(&reference("p2p/private"), &["--user", "puller:secret"])?
        .check("the direct pull with credentials")?;
    let layer = image.largest_layer();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric_value(&node.eddy().metrics()?, "eddy_containerd_digests").unwrap_or(0.0)
        < image.blobs().len() as f64
    {
        ensure!(
            Instant::now() < deadline,
            "eddy never learned containerd's content"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let path = format!("/v2/p2p/private/blobs/{}", layer.digest);
    let anonymous = node.curl(&cluster, &path, &[])?;
    ensure!(
        anonymous.0 == Some(401) && anonymous.1.len() as u64 != layer.size,
        "an anonymous client got {:?} with {} bytes",
        anonymous.0,
        anonymous.1.len()
    );
    let with_credentials = node.curl(&cluster, &path, &["--user", "puller:secret"])?;
    ensure!(
        with_credentials.0 == Some(200) && with_credentials.1.len() as u64 == layer.size,
        "the client with credentials got {:?} with {} bytes",
        with_credentials.0,
        with_credentials.1.len()
    );
    ensure!(
        node.bytes_from("containerd") >= layer.size as f64,
        "the layer did not come from containerd"
    );
    Ok(())
}
