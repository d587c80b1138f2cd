//! eddy-demo: what `cargo xtask demo` runs (as root, with EDDY_BIN set).
//!
//! A throwaway upstream registry (docker-registry over TLS in a network namespace, behind a
//! 200 Mbit/s tbf link like a WAN) holding a small runnable image (a busybox rootfs and a
//! few random layers); a containerd daemon in a fresh cgroup; eddy attached to that cgroup.
//! Then a COLD pull (`ctr images pull`, fetch and unpack) and a WARM pull from a second,
//! empty containerd, a `ctr run` of the image, and a summary of where the bytes came from:
//! the registry's own log and eddy's metrics. Everything is torn down on the way out, on
//! failure too: every resource is a guard from the eddy-tests harness.
// unsafe: a SIGINT handler, and geteuid. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use eddy_tests::{
    cgroup::cgroup2_mount,
    containerd::{Client, Containerd, Run},
    eddy::{eddy_bin, metric_value, status_command, status_text},
    oci::{self, Blob, Image, ImageSpec, PlatformImage, MEDIA_LAYER_TAR, MEDIA_MANIFEST},
    process::{run_bounded, run_ok},
    registry::{shape_link, Served, Upstream, REGISTRY_HOST},
    registry_eddy::{RegistryEddy, STORE_BYTES, UPSTREAM_BYTES},
    require_privileges,
    world::WorldSpec,
    MIB,
};
use serde_json::json;

/// The containerd namespace the demo pulls into.
const NS: &str = "eddy-demo";
const REPO: &str = "demo/app";
const TAG: &str = "v1";
/// The simulated WAN between the node and the registry.
const WAN_RATE: &str = "200mbit";
/// Random layers after the busybox rootfs: about 75 MiB in all.
const RANDOM_LAYERS: [u64; 3] = [40 * MIB, 24 * MIB, 10 * MIB];
const PULL_TIMEOUT: Duration = Duration::from_secs(60);
/// Tools the rootfs gets as busybox symlinks.
const APPLETS: [&str; 8] = ["sh", "echo", "ls", "cat", "uname", "wc", "sha256sum", "du"];

/// Set by SIGINT/SIGTERM.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Ctrl-C reaches the demo's children too (one process group): they stop, the step
    // waiting on them fails, and the guards clean up on the way out. Without a handler the
    // demo itself would die first and leave its netns, cgroup and temp dirs behind.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    let result = run(started).and_then(|()| {
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            println!(
                "\neddy demo: OK in {:.1}s; everything it created is removed.",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "\neddy demo FAILED after {:.1}s: {e:#}",
                started.elapsed().as_secs_f64()
            );
            ExitCode::FAILURE
        }
    }
}

/// Progress lines, stamped with the time since the start.
struct Log(Instant);

impl Log {
    fn say(&self, msg: impl AsRef<str>) {
        println!("[{:5.1}s] {}", self.0.elapsed().as_secs_f64(), msg.as_ref());
    }
}

// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn run(started: Instant) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo needs root: it creates a cgroup, a network namespace and attaches BPF \
             programs. Run `sudo cargo xtask demo` (or as root)."
        );
    }
    // Fails with a reason (no cgroup v2, no BPF, a missing tool) instead of half-working.
    if !require_privileges() {
        bail!("this machine cannot run the demo (see above)");
    }
    let log = Log(started);
    let bin = eddy_bin();

    // The world: the registry in its namespace, the cgroup, eddy's CA and (started below,
    // once its cgroup argument is chosen) eddy. It drops after the containerds: eddy, the
    // registry, the namespace, the cgroup (which kills anything left in it), the files.
    let mut world = WorldSpec::new()
        .cert_names(&[REGISTRY_HOST])
        .eddy_hosts(&[(REGISTRY_HOST, 0)])
        .eddy_started_later()
        .start()?;
    let (upstream, netns) = (&world.upstream, &world.netns);
    let hooked = world.cgroup.path().to_path_buf();
    log.say(format!(
        "upstream registry: docker-registry at https://{REGISTRY_HOST} ({} in netns {}), \
         its own test CA",
        upstream.addr(),
        netns.name()
    ));

    log.say("building the demo image: a busybox rootfs and 3 random layers…");
    let image = demo_image(&world.work.path().join("layout"))?;
    log.say(format!(
        "pushing the demo image ({:.1} MiB, {} layers) with skopeo…",
        mib(image.total_bytes()),
        image.layers().len()
    ));
    let pushed = upstream.push(&image, REPO)?;
    let after_push = upstream.served()?;
    log.say(format!("  pushed in {:.1}s", pushed.as_secs_f64()));
    shape_link(netns, Some(WAN_RATE))?;
    log.say(format!(
        "link to the registry shaped to {WAN_RATE} (tc tbf, both directions), like a WAN"
    ));

    let containerd = start_containerd_in(&hooked)?;
    log.say(format!(
        "containerd {} started in a fresh cgroup {} (root {})",
        containerd_version(),
        hooked.display(),
        containerd.root.display()
    ));

    // `--cgroup auto` finds the oldest process named containerd; only use it when that
    // can only be ours.
    let others = foreign_containerds(&hooked)?;
    let cgroup_arg = if others.is_empty() {
        log.say(
            "eddy: --cgroup auto (the demo's containerd is the only containerd on this \
             machine, so auto finds its cgroup)",
        );
        PathBuf::from("auto")
    } else {
        log.say(format!(
            "eddy: --cgroup {} (explicit: other containerd processes run here, pids {others:?}, \
             so auto could pick theirs)",
            hooked.display()
        ));
        hooked.clone()
    };
    // The node trusts eddy's CA (what `eddy ca install` does for the host bundle) and the
    // registry's own CA: the world's client does.
    world.eddy_config.cgroup = cgroup_arg;
    world.start_eddy()?;
    let (upstream, eddy) = (&world.upstream, world.eddy());
    let status = eddy_status_json(&bin, &eddy.pin_dir)?;
    let attached_to = status["cgroup"]["path"].as_str().unwrap_or("?").to_string();
    log.say(format!(
        "eddy ready: pid {}, proxy {}, admin http://{}, attached to {attached_to}",
        eddy.pid(),
        eddy.listen,
        eddy.admin
    ));
    ensure!(
        Path::new(&attached_to) == hooked,
        "eddy attached to {attached_to}, not the demo's cgroup {}",
        hooked.display()
    );

    // ctr (1.6 fetches in the client process) runs in the same cgroup as containerd, with
    // a private /etc/hosts that resolves registry.test to the upstream. No hosts.toml, no
    // mirror configuration: ctr believes it talks to registry.test.
    let client = &world.client;
    let reference = format!("{REGISTRY_HOST}/{REPO}:{TAG}");

    let before_cold = Snapshot::take(upstream, eddy, after_push)?;
    log.say(format!(
        "COLD pull: ctr images pull {reference} (eddy's store is empty)…"
    ));
    // One pull into `containerd`, checked, and the counters after it.
    let pull = |containerd: &Containerd, what: &str| -> Result<(Run, Snapshot)> {
        let run = client
            .pull(containerd, NS, &reference, &[], PULL_TIMEOUT)?
            .check(&format!("{what} ctr images pull through eddy"))?;
        let after = Snapshot::take(upstream, eddy, after_push)?;
        log.say(format!("  done in {:.2}s", run.elapsed.as_secs_f64()));
        containerd.ensure_content(NS, &image.blobs())?;
        Ok((run, after))
    };
    let (cold, after_cold) = pull(&containerd, "cold")?;

    let warm_containerd = start_containerd_in(&hooked)?;
    log.say(format!(
        "WARM pull: a second containerd with an empty content store (root {}) pulls the same \
         image…",
        warm_containerd.root.display()
    ));
    let (warm, after_warm) = pull(&warm_containerd, "warm")?;

    log.say("running the pulled image: ctr run --rm … /bin/sh -c 'echo …; uname -a'");
    let ran = run_container(client, &warm_containerd, &reference)?;

    let eddy_status_text = status_text(&eddy.pin_dir, eddy.admin)?;

    println!();
    println!("==================== eddy demo: summary ====================");
    println!(
        "image {reference}: {:.1} MiB in {} blobs ({} layers, one a busybox rootfs)",
        mib(image.total_bytes()),
        image.blobs().len(),
        image.layers().len()
    );
    println!("link to the registry: {WAN_RATE} (tbf); containerd + ctr in the hooked cgroup\n");
    let cold_d = after_cold.since(&before_cold);
    let warm_d = after_warm.since(&after_cold);
    summary_table(&[("COLD pull", &cold, &cold_d), ("WARM pull", &warm, &warm_d)]);
    println!(
        "\nwarm pull: {:.1}× faster than cold; upstream sent {} for it",
        cold.elapsed.as_secs_f64() / warm.elapsed.as_secs_f64().max(1e-3),
        bytes(warm_d.served.bytes())
    );
    println!("\ncontainer output (ctr run of the warm-pulled image):");
    for line in ran.stdout().lines() {
        println!("  | {line}");
    }
    println!(
        "\n$ eddy status --bpf-pin-dir {} --admin {}",
        eddy.pin_dir.display(),
        eddy.admin
    );
    for line in eddy_status_text.lines() {
        println!("  {line}");
    }
    println!("=============================================================");

    // Expectations the numbers above must meet.
    let mut problems = Vec::new();
    if warm_d.served.bytes() != 0 || warm_d.upstream != 0 {
        problems.push(format!(
            "the warm pull read from upstream: registry sent {} B, eddy counted {} B",
            warm_d.served.bytes(),
            warm_d.upstream
        ));
    }
    let layer_bytes: u64 = image.layers().iter().map(|b| b.size).sum();
    if warm_d.store < layer_bytes {
        problems.push(format!(
            "eddy served {} B from its store on the warm pull, less than the {layer_bytes} B of \
             layers",
            warm_d.store
        ));
    }
    if cold_d.served.bytes() as f64 > image.total_bytes() as f64 * 1.02 {
        problems.push(format!(
            "the cold pull made upstream send {} B for a {} B image",
            cold_d.served.bytes(),
            image.total_bytes()
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }

    log.say("cleaning up: eddy, containerd, registry, netns, cgroup, pins, temp dirs…");
    // eddy's guard prints its log tail when dropped (useful when a test fails); on success
    // the demo keeps its own output readable instead.
    drop(warm_containerd);
    drop(containerd);
    if let Some(eddy) = world.eddy.take() {
        eddy.stop_quietly();
    }
    drop(world);
    Ok(())
}

/// The registry's log and eddy's counters at one moment.
#[derive(Clone, Default)]
struct Snapshot {
    served: Served,
    upstream: u64,
    store: u64,
    /// Manifest HEADs in the registry's log (tag checks; not counted in `served`).
    manifest_heads: u64,
    /// `kind/source` → eddy_requests_total.
    requests: BTreeMap<String, u64>,
}

impl Snapshot {
    /// `baseline`: what the registry had served before (skopeo's push reads blobs back).
    fn take(upstream: &Upstream, eddy: &RegistryEddy, baseline: Served) -> Result<Self> {
        let served = upstream.served()?;
        let metrics = eddy.metrics()?;
        let mut requests = BTreeMap::new();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("eddy_requests_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k.trim() == name).then(|| v.trim_matches('"').to_string())
                })
            };
            let key = format!(
                "{}/{}",
                label("kind").unwrap_or_default(),
                label("source").unwrap_or_default()
            );
            let value: f64 = value.split_whitespace().next().unwrap_or("0").parse()?;
            *requests.entry(key).or_default() += value as u64;
        }
        Ok(Self {
            served: Served {
                blob_gets: served.blob_gets - baseline.blob_gets,
                blob_bytes: served.blob_bytes - baseline.blob_bytes,
                manifest_gets: served.manifest_gets - baseline.manifest_gets,
                manifest_bytes: served.manifest_bytes - baseline.manifest_bytes,
                redirects: served.redirects - baseline.redirects,
                unauthorized: served.unauthorized - baseline.unauthorized,
            },
            upstream: metric_value(&metrics, UPSTREAM_BYTES).unwrap_or(0.0) as u64,
            store: metric_value(&metrics, STORE_BYTES).unwrap_or(0.0) as u64,
            manifest_heads: upstream
                .manifest_requests()
                .iter()
                .filter(|r| r.starts_with("HEAD "))
                .count() as u64,
            requests,
        })
    }

    fn since(&self, before: &Snapshot) -> Snapshot {
        let mut requests = BTreeMap::new();
        for (key, value) in &self.requests {
            let delta = value - before.requests.get(key).copied().unwrap_or(0);
            requests.insert(key.clone(), delta);
        }
        Snapshot {
            served: Served {
                blob_gets: self.served.blob_gets - before.served.blob_gets,
                blob_bytes: self.served.blob_bytes - before.served.blob_bytes,
                manifest_gets: self.served.manifest_gets - before.served.manifest_gets,
                manifest_bytes: self.served.manifest_bytes - before.served.manifest_bytes,
                redirects: self.served.redirects - before.served.redirects,
                unauthorized: self.served.unauthorized - before.served.unauthorized,
            },
            upstream: self.upstream - before.upstream,
            store: self.store - before.store,
            manifest_heads: self.manifest_heads - before.manifest_heads,
            requests,
        }
    }
}

fn summary_table(pulls: &[(&str, &Run, &Snapshot)]) {
    let cells = |f: &dyn Fn(&Snapshot) -> String| -> Vec<String> {
        pulls.iter().map(|(_, _, d)| f(d)).collect()
    };
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "wall time".into(),
            pulls
                .iter()
                .map(|(_, run, _)| format!("{:.2} s", run.elapsed.as_secs_f64()))
                .collect(),
        ),
        (
            "upstream sent (registry's own log)".into(),
            cells(&|d| bytes(d.served.bytes())),
        ),
        (
            "  in GETs (blob + manifest), HEADs".into(),
            cells(&|d| {
                format!(
                    "{} + {}, {}",
                    d.served.blob_gets, d.served.manifest_gets, d.manifest_heads
                )
            }),
        ),
        (UPSTREAM_BYTES.to_string(), cells(&|d| bytes(d.upstream))),
        (STORE_BYTES.to_string(), cells(&|d| bytes(d.store))),
    ];
    let mut keys: Vec<&String> = pulls
        .iter()
        .flat_map(|(_, _, d)| d.requests.keys())
        .collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let (kind, source) = key.split_once('/').unwrap_or((key, ""));
        rows.push((
            format!("eddy_requests_total{{kind=\"{kind}\",source=\"{source}\"}}"),
            cells(&|d| d.requests.get(key).copied().unwrap_or(0).to_string()),
        ));
    }
    let first = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..pulls.len())
        .map(|i| {
            rows.iter()
                .map(|(_, cells)| cells[i].chars().count())
                .chain([pulls[i].0.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut header = format!("{:first$}", "");
    for (i, (name, _, _)) in pulls.iter().enumerate() {
        header.push_str(&format!("  {:>w$}", name, w = widths[i]));
    }
    println!("{header}");
    for (name, cells) in rows {
        let mut line = format!("{name:first$}");
        for (i, cell) in cells.iter().enumerate() {
            line.push_str(&format!("  {:>w$}", cell, w = widths[i]));
        }
        println!("{line}");
    }
}

/// Start a containerd daemon as a member of `cgroup`: this process joins the cgroup for
/// the moment of the fork (children start in their parent's cgroup), then goes back.
fn start_containerd_in(cgroup: &Path) -> Result<Containerd> {
    let home = own_cgroup()?;
    let pid = std::process::id().to_string();
    fs::write(cgroup.join("cgroup.procs"), &pid)
        .with_context(|| format!("joining {}", cgroup.display()))?;
    let started = Containerd::start();
    let back = fs::write(home.join("cgroup.procs"), &pid)
        .with_context(|| format!("going back to {}", home.display()));
    let containerd = started?;
    back?;
    Ok(containerd)
}

/// This process's cgroup v2 directory.
fn own_cgroup() -> Result<PathBuf> {
    let mount = cgroup2_mount().context("no cgroup2 mount")?;
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Pids of processes named `containerd` that are not in `ours`.
fn foreign_containerds(ours: &Path) -> Result<Vec<u32>> {
    let mount = cgroup2_mount().context("no cgroup2 mount")?;
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim() != "containerd" {
            continue;
        }
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let inside = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|rel| mount.join(rel.trim_start_matches('/')) == ours)
            .unwrap_or(false);
        if !inside {
            found.push(pid);
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn containerd_version() -> String {
    run_bounded(
        Command::new("containerd").arg("--version"),
        Duration::from_secs(10),
    )
    .ok()
    .and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .nth(2)
            .map(str::to_string)
    })
    .unwrap_or_else(|| "?".into())
}

fn eddy_status_json(bin: &Path, pin_dir: &Path) -> Result<serde_json::Value> {
    let out = status_command(bin, pin_dir)?;
    ensure!(
        out.status.success(),
        "eddy status failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("parsing eddy status --json")
}

/// `ctr run --rm` of the pulled image: proof it is a real, runnable image.
fn run_container(client: &Client, containerd: &Containerd, reference: &str) -> Result<Run> {
    let id = format!("eddy-demo-{}", std::process::id());
    let script = "echo \"hello from a container pulled through eddy\"; uname -srm; \
                  du -sh /data-*.bin";
    let argv = containerd.ctr_args(
        NS,
        &["run", "--rm", reference, &id, "/bin/sh", "-c", script],
    );
    client
        .run(&argv, Duration::from_secs(60))?
        .check("ctr run of the pulled image")
}

/// The demo image: a busybox-static rootfs layer, then random layers.
fn demo_image(layout: &Path) -> Result<Image> {
    let random = oci::write_layout(layout, TAG, &ImageSpec::single(&RANDOM_LAYERS))?;
    let [platform] = random.platforms.as_slice() else {
        bail!("expected one platform");
    };
    let busybox = busybox_layer(layout)?;

    let mut config: serde_json::Value =
        serde_json::from_slice(&random.read_blob(&platform.config)?)?;
    let mut diff_ids = vec![json!(busybox.digest)];
    diff_ids.extend(
        config["rootfs"]["diff_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    config["rootfs"]["diff_ids"] = json!(diff_ids);
    config["config"] = json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]});
    let config = oci::write_json_blob(layout, &platform.config.media_type, &config)?;

    let mut layers = vec![busybox];
    layers.extend(platform.layers.iter().cloned());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = oci::write_json_blob(layout, MEDIA_MANIFEST, &manifest)?;
    for old in [&platform.manifest, &platform.config] {
        let _ = fs::remove_file(oci::blob_path(layout, &old.digest));
    }
    let mut top = manifest.descriptor();
    top["annotations"] = json!({"org.opencontainers.image.ref.name": TAG});
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]}))?,
    )?;
    Ok(Image {
        layout: layout.to_path_buf(),
        tag: TAG.to_string(),
        top: manifest.clone(),
        platforms: vec![PlatformImage {
            platform: platform.platform.clone(),
            manifest,
            config,
            layers,
        }],
    })
}

/// An uncompressed tar of /bin/busybox (static) with a few applet symlinks.
fn busybox_layer(layout: &Path) -> Result<Blob> {
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file(),
        "/bin/busybox is missing (apt-get install busybox-static)"
    );
    let rootfs = layout.join("busybox-rootfs");
    fs::create_dir_all(rootfs.join("bin"))?;
    fs::copy(busybox, rootfs.join("bin/busybox"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    let tar = layout.join("busybox.tar");
    run_ok(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "--numeric-owner", "--mtime=@0"])
            .args(["--sort=name", "-C"])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("bin"),
    )?;
    let blob = oci::write_blob(layout, MEDIA_LAYER_TAR, &fs::read(&tar)?)?;
    fs::remove_file(&tar)?;
    fs::remove_dir_all(&rootfs)?;
    Ok(blob)
}

fn mib(n: u64) -> f64 {
    n as f64 / MIB as f64
}

fn bytes(n: u64) -> String {
    if n >= MIB {
        format!("{:.1} MiB", mib(n))
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}
