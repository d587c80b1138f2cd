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
    cgroup::CgroupGuard, containerd::Containerd, eddy::eddy_bin, process::run_bounded,
    require_privileges, unique_suffix,
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

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// containerd in its own cgroup, named like a systemd unit so that doctor names the unit.
fn containerd_in(cgroup: &Path) -> Result<Containerd> {
    let containerd = Containerd::start()?;
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
    let containerd = containerd_in(&unit_cgroup)?;
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

    // The CA goes into the bundle after containerd started: containerd does not trust it.
    let install = eddy(&[
        "ca",
        "install",
        "--bundle",
        bundle.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ])?;
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
    let again = eddy(&[
        "ca",
        "install",
        "--bundle",
        bundle.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--restart-containerd",
    ])?;
    ensure!(again.status.success(), "{}", text(&again));
    ensure!(
        text(&again).contains("already in") && text(&again).contains("not restarted"),
        "{}",
        text(&again)
    );

    // A containerd started after the install trusts the CA: every check passes.
    drop(containerd);
    thread::sleep(Duration::from_millis(50));
    let restarted = containerd_in(&unit_cgroup)?;
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
