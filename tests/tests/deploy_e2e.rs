//! Deployment checks with real programs: `eddy doctor` against a real containerd in a test
//! cgroup, the trust bootstrap (`eddy ca install`, and containerd's start time against the
//! bundle's), and a cluster CA read from a read-only directory (as a mounted Secret is).
//!
//! Run as root: `cargo xtask test --privileged-only -- deploy_`.
use std::{
    fs,
    net::TcpListener,
    path::Path,
    process::{Command, Output},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use eddy_tests::{
    cgroup::CgroupGuard,
    containerd::{Client, Containerd},
    eddy::{eddy_bin, free_port},
    oci::{self, ImageSpec},
    pki::{write_bundle, Pki},
    process::run_bounded,
    registry::{Upstream, REGISTRY_HOST},
    require_privileges, unique_suffix,
    world::WorldSpec,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

fn eddy(args: &[&str]) -> Result<Output> {
    run_bounded(Command::new(eddy_bin()).args(args), TIMEOUT)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// containerd in its own cgroup, named like a systemd unit so that doctor names the unit.
/// A containerd in `cgroup` that reads its trust roots from `bundle`, as a node's reads the
/// host bundle.
fn containerd_in(cgroup: &Path, bundle: &Path) -> Result<Containerd> {
    let containerd = Containerd::start_with_roots(bundle)?;
    fs::write(cgroup.join("cgroup.procs"), containerd.pid().to_string())
        .context("moving containerd into the test cgroup")?;
    Ok(containerd)
}

/// The checks of `eddy doctor --json`, by name.
fn doctor(args: &[String]) -> Result<(bool, Vec<Value>)> {
    let mut all = vec!["doctor".to_string(), "--json".to_string()];
    all.extend_from_slice(args);
    let out = run_bounded(Command::new(eddy_bin()).args(&all), TIMEOUT)?;
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("doctor output is not JSON: {}", text(&out)))?;
    Ok((out.status.success(), checks))
}

fn outcome<'a>(checks: &'a [Value], name: &str) -> (&'a str, String) {
    let c = checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:#?}"));
    (
        c["outcome"].as_str().unwrap_or_default(),
        format!("{} {}", c["detail"], c["fix"]),
    )
}

#[test]
fn deploy_doctor_and_trust_bootstrap_with_a_real_containerd() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let bundle = work.path().join("bundle.crt");
    fs::write(&bundle, "")?;
    let cgroup = CgroupGuard::new()?;
    let unit_cgroup = cgroup.child("ctd-e2e.service")?;
    let containerd = containerd_in(&unit_cgroup, &bundle)?;
    // An upstream on loopback that accepts connections, as a reachable registry does.
    let upstream = TcpListener::bind("127.0.0.1:0")?;
    let args = |containerd: &Containerd| -> Vec<String> {
        vec![
            "--cgroup".into(),
            unit_cgroup.display().to_string(),
            "--containerd-socket".into(),
            containerd.socket.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--registry".into(),
            upstream.local_addr().unwrap().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port().unwrap()),
            "--admin".into(),
            format!("127.0.0.1:{}", free_port().unwrap()),
            "--bpf-pin-dir".into(),
            format!("/sys/fs/bpf/eddy-doctor-{}", unique_suffix()),
        ]
    };

    // Before `ca install`: no CA, so containerd cannot trust it.
    let (ok, checks) = doctor(&args(&containerd))?;
    ensure!(!ok, "doctor passed without a CA: {checks:#?}");
    let (o, detail) = outcome(&checks, "containerd.trust");
    ensure!(o == "fail" && detail.contains("no CA"), "{detail}");
    for name in [
        "containerd.process",
        "containerd.cgroup",
        "containerd.socket",
    ] {
        let (o, detail) = outcome(&checks, name);
        ensure!(o == "pass", "{name}: {o} {detail}");
    }
    let (_, detail) = outcome(&checks, "containerd.process");
    ensure!(
        detail.contains(&format!("pid {}", containerd.pid())) && detail.contains("ctd-e2e.service"),
        "doctor found another containerd or no unit: {detail}"
    );
    let upstream_check = format!("upstream.{}", upstream.local_addr()?);
    ensure!(outcome(&checks, &upstream_check).0 == "pass");

    // `eddy ca VERB --bundle BUNDLE --data-dir DATA MORE...`.
    let ca = |verb: &str, more: &[&str]| {
        let mut argv = vec![
            "ca",
            verb,
            "--bundle",
            bundle.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        argv.extend_from_slice(more);
        eddy(&argv)
    };
    // The CA goes into the bundle after containerd started: containerd does not trust it.
    let install = ca("install", &[])?;
    ensure!(install.status.success(), "{}", text(&install));
    ensure!(
        text(&install).contains("added eddy's CA"),
        "{}",
        text(&install)
    );
    let (ok, checks) = doctor(&args(&containerd))?;
    let (o, detail) = outcome(&checks, "containerd.trust");
    ensure!(!ok && o == "fail", "{o} {detail}");
    ensure!(
        detail.contains("started before") && detail.contains("systemctl restart ctd-e2e.service"),
        "{detail}"
    );

    // Installing again adds nothing, and so restarts nothing.
    let again = ca("install", &["--restart-containerd"])?;
    ensure!(again.status.success(), "{}", text(&again));
    ensure!(
        text(&again).contains("already in") && text(&again).contains("not restarted"),
        "{}",
        text(&again)
    );

    // A containerd started after the install trusts the CA: every check passes.
    drop(containerd);
    thread::sleep(Duration::from_millis(50));
    let restarted = containerd_in(&unit_cgroup, &bundle)?;
    let (ok, checks) = doctor(&args(&restarted))?;
    let failed: Vec<_> = checks.iter().filter(|c| c["outcome"] == "fail").collect();
    ensure!(ok && failed.is_empty(), "doctor failed: {failed:#?}");

    // Text output: one line per check plus the summary, and exit 0.
    let out = run_bounded(
        Command::new(eddy_bin())
            .arg("doctor")
            .args(args(&restarted)),
        TIMEOUT,
    )?;
    ensure!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.lines().count() == checks.len() + 1 && stdout.contains(", 0 failed"),
        "{stdout}"
    );
    drop(restarted);

    // Uninstall leaves the bundle as it was before install (empty here), and says so twice.
    let uninstall = |expect: &str| -> Result<()> {
        let out = ca("uninstall", &[])?;
        ensure!(
            out.status.success() && text(&out).contains(expect),
            "{}",
            text(&out)
        );
        Ok(())
    };
    uninstall("removed eddy's CA")?;
    ensure!(fs::read_to_string(&bundle)?.is_empty());
    uninstall("is not in")?;
    Ok(())
}

/// One CA for the cluster: created once with `--ca-dir`, then used read-only (a Secret is
/// mounted read-only) by `ca export`, `ca install` and `ca talos-patch`, which all yield it.
#[test]
fn deploy_cluster_ca_from_a_read_only_dir() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let ca_dir = work.path().join("cluster-ca");
    let created = eddy(&["ca", "export", "--ca-dir", ca_dir.to_str().unwrap()])?;
    ensure!(created.status.success(), "{}", text(&created));
    let pem = String::from_utf8(created.stdout)?;
    ensure!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    // As a Secret volume: key mode 0400.
    fs::set_permissions(
        ca_dir.join("ca.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )?;

    let bundle = work.path().join("bundle.crt");
    let script = format!(
        "set -e; mount --bind {dir} {dir}; mount -o remount,bind,ro {dir}; \
         touch {dir}/probe 2>/dev/null && exit 99; \
         {eddy} ca export --ca-dir {dir}; \
         {eddy} ca install --ca-dir {dir} --data-dir {data} --bundle {bundle}; \
         {eddy} ca talos-patch --ca-dir {dir}",
        dir = ca_dir.display(),
        eddy = eddy_bin().display(),
        data = work.path().join("data").display(),
        bundle = bundle.display(),
    );
    let out = run_bounded(
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
        TIMEOUT,
    )?;
    ensure!(
        out.status.success(),
        "on a read-only CA dir: {}",
        text(&out)
    );
    let stdout = String::from_utf8(out.stdout)?;
    ensure!(stdout.starts_with(&pem), "another CA was used: {stdout}");
    ensure!(stdout.contains("added eddy's CA"), "{stdout}");
    ensure!(stdout.contains("kind: TrustedRootsConfig"), "{stdout}");
    let first_line = pem.lines().nth(1).unwrap();
    ensure!(stdout.contains(&format!("  {first_line}")), "{stdout}");
    ensure!(fs::read_to_string(&bundle)?.contains(first_line));
    // No per-node CA was created beside the cluster CA.
    ensure!(!work.path().join("data/ca").exists());
    Ok(())
}

/// The image `cargo xtask image` builds, run by containerd as the chart's DaemonSet runs it:
/// privileged, host network and PID namespace, bpffs, the cgroup file system, the data
/// hostPath, the trust bundle's directory and containerd's socket directory mounted. The
/// init step (`ca install`) and `eddy doctor` pass in it, and `eddy run` attaches its hooks
/// to a test cgroup from inside the container and serves a second pull from its cache: a
/// real docker-registry upstream in a network namespace, ctr pulling from the hooked cgroup.
#[test]
// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn deploy_image_runs_with_the_daemonset_privileges() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let archive = std::env::var_os("EDDY_IMAGE").context(
        "EDDY_IMAGE is not set: run through `cargo xtask test`, which builds the image with `cargo xtask image`",
    )?;
    // The upstream, and a cgroup; eddy runs in the container. eddy and the pulling client
    // resolve registry.test to the upstream through the world's client hosts file.
    let world = WorldSpec::new()
        .cert_names(&[REGISTRY_HOST])
        .without_eddy()
        .start()?;
    let (work, pki, upstream) = (&world.work, &world.pki, &world.upstream);
    let hosts = world.client.hosts.as_path();
    let app = world.image("deploy/app", "v1", &ImageSpec::single(&[3 << 20, 1 << 20]))?;
    let data = work.path().join("data");
    let trust = work.path().join("trust");
    fs::create_dir_all(&data)?;
    fs::create_dir_all(&trust)?;
    fs::write(trust.join("bundle.crt"), "")?;
    let cgroup = &world.cgroup;
    let hooked = cgroup.child("hooked")?;
    let node_cgroup = cgroup.child("node-containerd.service")?;
    // The runtime that runs eddy's container.
    let runtime = Containerd::start()?;
    let ctr = |args: &[&str]| -> Result<Output> {
        run_bounded(
            Command::new("ctr")
                .arg("--address")
                .arg(&runtime.socket)
                .args(["-n", "deploy"])
                .args(args),
            Duration::from_secs(60),
        )
    };
    let import = ctr(&[
        "images",
        "import",
        "--base-name",
        "eddy.test/eddy",
        Path::new(&archive).to_str().unwrap(),
    ])?;
    ensure!(
        import.status.success(),
        "ctr images import: {}",
        text(&import)
    );
    let names = ctr(&["images", "ls", "-q"])?;
    let image = String::from_utf8_lossy(&names.stdout)
        .lines()
        .find(|l| l.starts_with("eddy.test/eddy:"))
        .map(str::to_string)
        .with_context(|| format!("imported image not listed: {}", text(&names)))?;

    let pin_dir = format!("/sys/fs/bpf/eddy-img-{}", unique_suffix());
    let mounts = |socket_dir: &Path| -> Vec<String> {
        let bind = |src: &Path, dst: &Path, mode: &str| {
            format!(
                "type=bind,src={},dst={},options=rbind:{mode}",
                src.display(),
                dst.display()
            )
        };
        [
            bind(Path::new("/sys/fs/bpf"), Path::new("/sys/fs/bpf"), "rw"),
            // As the chart: the host's /sys/fs/cgroup (with a hybrid host's unified/ below).
            bind(
                Path::new("/sys/fs/cgroup"),
                Path::new("/sys/fs/cgroup"),
                "ro",
            ),
            bind(&data, Path::new("/var/lib/eddy"), "rw"),
            bind(&trust, Path::new("/host-trust"), "rw"),
            bind(socket_dir, socket_dir, "ro"),
            // The test's name for the upstream, and its CA (eddy verifies upstream TLS).
            bind(hosts, Path::new("/etc/hosts"), "ro"),
            bind(&pki.ca_cert, Path::new("/etc/eddy/upstream-ca.crt"), "ro"),
        ]
        .into_iter()
        .flat_map(|m| ["--mount".to_string(), m])
        .collect()
    };
    // The host's PID namespace, as hostPID gives (named through this process: /proc/1 may
    // be unreadable in a sandbox).
    let host_pid_ns = format!("pid:/proc/{}/ns/pid", std::process::id());
    let eddy_log = work.path().join("eddy-in-image.log");
    let run_in_image = |id: &str, socket_dir: &Path, detach: bool, argv: &[&str]| {
        let mut args: Vec<String> = vec!["run".into(), "--rm".into()];
        if detach {
            // The detached task's output goes to a file, for the failure messages.
            args = vec![
                "run".into(),
                "-d".into(),
                "--log-uri".into(),
                format!("file://{}", eddy_log.display()),
            ];
        }
        args.extend(["--privileged", "--net-host", "--with-ns", &host_pid_ns].map(String::from));
        args.extend(mounts(socket_dir));
        args.push(image.clone());
        args.push(id.to_string());
        args.extend(argv.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ctr(&refs)
    };
    let runtime_dir = runtime.socket.parent().unwrap().to_path_buf();

    let version = run_in_image(
        &format!("version-{}", unique_suffix()),
        &runtime_dir,
        false,
        &["/usr/local/bin/eddy", "--version"],
    )?;
    ensure!(
        version.status.success() && text(&version).starts_with("eddy "),
        "eddy --version in the image: {}",
        text(&version)
    );

    // The chart's init step, in the image.
    let install = run_in_image(
        &format!("install-{}", unique_suffix()),
        &runtime_dir,
        false,
        &[
            "/usr/local/bin/eddy",
            "ca",
            "install",
            "--bundle",
            "/host-trust/bundle.crt",
            "--registry",
            REGISTRY_HOST,
        ],
    )?;
    ensure!(
        install.status.success() && text(&install).contains("added eddy's CA"),
        "ca install in the image: {}",
        text(&install)
    );
    ensure!(
        data.join("ca/ca.crt").exists(),
        "the CA is not on the data hostPath"
    );

    // The node's containerd starts after the CA is in place, as after a restart.
    thread::sleep(Duration::from_millis(50));
    let node = containerd_in(&node_cgroup, &trust.join("bundle.crt"))?;
    let node_dir = node.socket.parent().unwrap().to_path_buf();
    // For doctor's reachability check: a listener on loopback.
    let reachable = TcpListener::bind("127.0.0.1:0")?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let admin = format!("127.0.0.1:{}", free_port()?);
    let registry = reachable.local_addr()?.to_string();
    let doctor = run_in_image(
        &format!("doctor-{}", unique_suffix()),
        &node_dir,
        false,
        &[
            "/usr/local/bin/eddy",
            "doctor",
            "--cgroup",
            node_cgroup.to_str().unwrap(),
            "--containerd-socket",
            node.socket.to_str().unwrap(),
            "--bundle",
            "/host-trust/bundle.crt",
            "--registry",
            &registry,
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--bpf-pin-dir",
            &pin_dir,
        ],
    )?;
    ensure!(
        doctor.status.success(),
        "eddy doctor in the image failed:\n{}",
        text(&doctor)
    );

    // eddy run in the image attaches to the test cgroup; `eddy status` on the host sees it.
    let container = format!("run-{}", unique_suffix());
    let run = run_in_image(
        &container,
        &node_dir,
        true,
        &[
            "/usr/local/bin/eddy",
            "run",
            "--cgroup",
            hooked.to_str().unwrap(),
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--registry",
            REGISTRY_HOST,
            "--upstream-ca",
            "/etc/eddy/upstream-ca.crt",
            "--bpf-pin-dir",
            &pin_dir,
        ],
    )?;
    ensure!(run.status.success(), "ctr run -d: {}", text(&run));
    let mut attached = String::new();
    for _ in 0..100 {
        let status = eddy(&["status", "--json", "--bpf-pin-dir", &pin_dir])?;
        if status.status.success() {
            let s: Value = serde_json::from_slice(&status.stdout)?;
            let names: Vec<String> = s["attached"]
                .as_array()
                .map(|a| a.iter().map(|p| p["name"].to_string()).collect())
                .unwrap_or_default();
            if s["running"] == true
                && s["cgroup"]["path"] == hooked.to_str().unwrap()
                && names.iter().any(|n| n.contains("eddy_connect4"))
            {
                attached = names.join(",");
                break;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let pulls = if attached.is_empty() {
        Ok(())
    } else {
        pull_twice(work, &hooked, hosts, pki, &data, upstream, &app)
    };
    let _ = ctr(&["tasks", "kill", "-s", "SIGTERM", &container]);
    // Bounded: eddy drains for at most its drain timeout (10 s), then exits.
    let mut stopped = false;
    for _ in 0..150 {
        let tasks = ctr(&["tasks", "ls"])?;
        stopped = String::from_utf8_lossy(&tasks.stdout)
            .lines()
            .any(|l| l.starts_with(&container) && l.contains("STOPPED"));
        if stopped {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let _ = ctr(&["tasks", "delete", "-f", &container]);
    let _ = ctr(&["containers", "delete", &container]);
    let log = fs::read_to_string(&eddy_log).unwrap_or_default();
    ensure!(
        !attached.is_empty(),
        "eddy in the image did not attach to {}; its log:\n{log}",
        hooked.display()
    );
    pulls.with_context(|| format!("pulls through eddy in the image; its log:\n{log}"))?;
    ensure!(
        stopped,
        "eddy in the image did not stop on SIGTERM; its log:\n{log}"
    );
    ensure!(
        !Path::new(&pin_dir).exists(),
        "{pin_dir} left behind after SIGTERM; eddy's log:\n{log}"
    );
    drop(node);
    Ok(())
}

/// A cold then a warm pull (each into a fresh containerd) from the hooked cgroup, trusting
/// eddy's CA from the data hostPath: the warm one is served by eddy's store, so upstream
/// sends no blob bytes for it.
fn pull_twice(
    work: &tempfile::TempDir,
    hooked: &Path,
    hosts: &Path,
    pki: &Pki,
    data: &Path,
    upstream: &Upstream,
    app: &oci::Image,
) -> Result<()> {
    let bundle = work.path().join("client-bundle.pem");
    write_bundle(&bundle, &[&data.join("ca/ca.crt"), &pki.ca_cert])?;
    let client = Client {
        cgroup: Some(hooked.to_path_buf()),
        hosts: hosts.to_path_buf(),
        ca_bundle: bundle,
        netns: None,
    };
    let reference = format!("{REGISTRY_HOST}/deploy/app:v1");
    let timeout = Duration::from_secs(120);
    let cold = Containerd::start()?;
    client
        .fetch(&cold, "deploy", &reference, &[], timeout)?
        .check("cold pull through eddy in the image")?;
    let after_cold = upstream.served()?;
    ensure!(
        after_cold.blob_bytes + (64 << 10) >= app.total_bytes(),
        "upstream sent {} blob bytes for a {} byte image: the cold pull did not go upstream",
        after_cold.blob_bytes,
        app.total_bytes()
    );
    drop(cold);
    let warm = Containerd::start()?;
    client
        .fetch(&warm, "deploy", &reference, &[], timeout)?
        .check("warm pull through eddy in the image")?;
    let after_warm = upstream.served()?;
    println!(
        "image {} B; upstream blob bytes after the cold pull {}, after the warm pull {}",
        app.total_bytes(),
        after_cold.blob_bytes,
        after_warm.blob_bytes
    );
    ensure!(
        after_warm.blob_bytes == after_cold.blob_bytes,
        "upstream sent {} more blob bytes for the warm pull: not served from eddy's cache",
        after_warm.blob_bytes - after_cold.blob_bytes
    );
    ensure!(
        fs::read_dir(data.join("store"))?.next().is_some(),
        "nothing in eddy's store on the data hostPath"
    );
    Ok(())
}
