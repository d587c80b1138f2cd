//! `eddy doctor`: can eddy work on this node, and if not, what to fix.
//!
//! Each check is one line, pass, warn or fail, with the fix for a failure. Nothing is
//! changed: no CA is created, nothing is attached, no port is held. The exit code is
//! non-zero when any check fails (warnings do not count).
use std::{
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    os::unix::{fs::FileTypeExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{
    hook::cgroup,
    listener::registries::Registries,
    node::distro::{self, Containerd},
    node::sys,
};

/// Below this, eddy caches little before it runs proxy-only.
const MIN_FREE_BYTES: u64 = 1 << 30;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// What the checks look at; `eddy doctor`'s flags, with `eddy run`'s defaults.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub cgroup: String,
    /// `auto` or a path.
    pub containerd_socket: String,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub ca_dir: PathBuf,
    pub bundle: PathBuf,
    pub pin_dir: PathBuf,
    pub registries: Registries,
    pub proc: PathBuf,
    /// The P2P listen and data ports (flag name, address) when P2P is on.
    pub p2p_ports: Vec<(&'static str, SocketAddr)>,
}

pub fn run(inputs: &Inputs) -> Vec<Check> {
    let mut checks = vec![
        check_privileges(),
        check_bpf_syscall(),
        check_cgroup2(),
        check_btf(),
        check_bpffs(&inputs.pin_dir),
    ];
    let containerd = find_containerd(inputs);
    checks.push(check_containerd(&containerd));
    checks.push(check_cgroup(&inputs.cgroup));
    checks.push(check_socket(
        &inputs.containerd_socket,
        containerd.as_ref().ok(),
    ));
    checks.push(check_trust(
        &inputs.ca_dir,
        &inputs.bundle,
        containerd.as_ref().ok(),
    ));
    let eddy_running =
        crate::ops::status::collect(&inputs.pin_dir, inputs.admin).is_ok_and(|s| s.running);
    checks.push(check_port("listen", inputs.listen, eddy_running));
    checks.push(check_port("admin", inputs.admin, eddy_running));
    for &(flag, addr) in &inputs.p2p_ports {
        checks.push(check_port(flag, addr, eddy_running));
    }
    checks.push(check_free_space(&inputs.data_dir));
    checks.extend(check_upstreams(&inputs.registries));
    checks
}

/// The containerd the flags point at: the one in `--cgroup` and/or serving
/// `--containerd-socket` when given, else the node's (`distro::detect`).
fn find_containerd(inputs: &Inputs) -> Result<Containerd, distro::DistroError> {
    let cgroup = (inputs.cgroup != "auto")
        .then(|| {
            let mount = cgroup::cgroup2_mount().ok()?;
            let rel = Path::new(&inputs.cgroup).strip_prefix(mount).ok()?;
            Some(format!("/{}", rel.display()))
        })
        .flatten();
    let socket =
        (inputs.containerd_socket != "auto").then(|| PathBuf::from(&inputs.containerd_socket));
    distro::detect_where(&inputs.proc, |c| {
        cgroup.as_ref().is_none_or(|g| c.cgroup == *g)
            && socket.as_ref().is_none_or(|s| c.socket == *s)
    })
}

pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.outcome == Outcome::Fail)
}

pub fn render_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.outcome {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        };
        out.push_str(&format!("{tag} {:<20} {}", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!(" (fix: {fix})"));
        }
        out.push('\n');
    }
    let failures = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    out.push_str(&format!("{} checks, {} failed\n", checks.len(), failures));
    out
}

fn pass(name: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        outcome: Outcome::Pass,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        outcome: Outcome::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        outcome: Outcome::Warn,
        ..fail(name, detail, fix)
    }
}

fn check_privileges() -> Check {
    if sys::has_bpf_privileges() {
        pass(
            "privileges",
            "CAP_BPF/CAP_SYS_ADMIN and CAP_NET_ADMIN present",
        )
    } else {
        fail(
            "privileges",
            "missing CAP_BPF (or CAP_SYS_ADMIN) or CAP_NET_ADMIN",
            "run as root, or privileged in a container (the chart does)",
        )
    }
}

fn check_bpf_syscall() -> Check {
    match sys::bpf_syscall_works() {
        Ok(()) => pass("kernel.bpf", "bpf() creates maps"),
        Err(e) => fail(
            "kernel.bpf",
            format!("bpf() failed: {e}"),
            "a kernel with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF, and the privileges above",
        ),
    }
}

fn check_cgroup2() -> Check {
    match cgroup::cgroup2_mount() {
        Ok(dir) => pass("kernel.cgroup2", format!("cgroup v2 mounted at {}", dir.display())),
        Err(e) => fail(
            "kernel.cgroup2",
            e.to_string(),
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or mount -t cgroup2 none /sys/fs/cgroup",
        ),
    }
}

fn check_btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        pass("kernel.btf", "/sys/kernel/btf/vmlinux present")
    } else {
        // eddy's programs use no CO-RE relocations against the kernel, so they load without it.
        warn(
            "kernel.btf",
            "/sys/kernel/btf/vmlinux missing (eddy's programs do not need it)",
            "CONFIG_DEBUG_INFO_BTF=y for bpftool's readable dumps of kernel types",
        )
    }
}

fn check_bpffs(pin_dir: &Path) -> Check {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if sys::is_bpffs(parent) || sys::is_bpffs(pin_dir) {
        pass("kernel.bpffs", format!("bpffs at {}", parent.display()))
    } else {
        fail(
            "kernel.bpffs",
            format!("{} is not a bpffs", parent.display()),
            format!("mount -t bpf bpf {}", parent.display()),
        )
    }
}

fn check_containerd(found: &Result<Containerd, distro::DistroError>) -> Check {
    match found {
        Ok(c) => pass(
            "containerd.process",
            format!(
                "pid {} ({}), unit {}",
                c.pid,
                c.distro,
                c.unit.as_deref().unwrap_or("none")
            ),
        ),
        Err(e) => fail(
            "containerd.process",
            e.to_string(),
            "run eddy in the host's PID namespace (hostPID) on a node with containerd",
        ),
    }
}

fn check_cgroup(spec: &str) -> Check {
    match cgroup::resolve(spec) {
        Ok(c) => pass("containerd.cgroup", c.path.display().to_string()),
        Err(e) => fail(
            "containerd.cgroup",
            e.to_string(),
            "give --cgroup the cgroup v2 directory of containerd (see /proc/PID/cgroup)",
        ),
    }
}

fn check_socket(spec: &str, containerd: Option<&Containerd>) -> Check {
    let path = if spec == "auto" {
        match containerd {
            Some(c) => c.socket.clone(),
            None => match distro::find_socket(Path::new("/")) {
                Ok(p) => p,
                Err(e) => {
                    return fail(
                        "containerd.socket",
                        e.to_string(),
                        "mount containerd's socket directory, or give --containerd-socket",
                    )
                }
            },
        }
    } else {
        PathBuf::from(spec)
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(&path) {
            Ok(_) => pass(
                "containerd.socket",
                format!("{} accepts connections", path.display()),
            ),
            Err(e) => fail(
                "containerd.socket",
                format!("{}: {e}", path.display()),
                "is containerd running? the chart mounts the socket's directory",
            ),
        },
        Ok(_) => fail(
            "containerd.socket",
            format!("{} is not a socket", path.display()),
            "give --containerd-socket the path of containerd's gRPC socket",
        ),
        Err(e) => fail(
            "containerd.socket",
            format!("{}: {e}", path.display()),
            "mount containerd's socket directory into the container (the chart does)",
        ),
    }
}

/// Whether containerd trusts eddy's CA, judged as the trust gate judges every client: the CA
/// is in the roots containerd itself reads (through /proc/PID/root and its `SSL_CERT_*`
/// variables, so this holds on Talos too, whose roots come from the machine config), and
/// containerd started after it got there (Go reads its roots once, at start). Without a
/// containerd to look at, only `--bundle` can be checked.
fn check_trust(ca_dir: &Path, bundle: &Path, containerd: Option<&Containerd>) -> Check {
    use crate::trust::{ClientProcess, Host, Reason, TrustGate, TrustVerdict};
    use rustls::pki_types::{pem::PemObject, CertificateDer};

    let name = "containerd.trust";
    let ca_file = ca_dir.join("ca.crt");
    let Ok(ca) = std::fs::read(&ca_file) else {
        return fail(
            name,
            format!("no CA at {}", ca_file.display()),
            "eddy ca install --bundle BUNDLE (creates the CA and installs it)",
        );
    };
    let Some(c) = containerd else {
        let bundle_text = std::fs::read(bundle).unwrap_or_default();
        if !bundle_contains(&bundle_text, &ca) {
            return fail(
                name,
                format!("eddy's CA is not in {}", bundle.display()),
                format!("eddy ca install --bundle {}", bundle.display()),
            );
        }
        return fail(
            name,
            "CA installed, but containerd was not found",
            "see containerd.process",
        );
    };
    let Ok(ca_der) = CertificateDer::from_pem_slice(&ca) else {
        return fail(
            name,
            format!("{} holds no PEM certificate", ca_file.display()),
            "remove it and run eddy ca install again",
        );
    };
    let gate = TrustGate::new(&ca_der, Host::real(), Default::default());
    let client = ClientProcess {
        tgid: c.pid,
        cgroup_id: 0,
    };
    match gate.verdict(&client) {
        TrustVerdict::Trusting => pass(
            name,
            format!(
                "containerd (pid {}) reads eddy's CA from its roots and started after it got there",
                c.pid
            ),
        ),
        TrustVerdict::Untrusting(Reason::CaNotInRoots)
            if bundle_contains(&std::fs::read(bundle).unwrap_or_default(), &ca) =>
        {
            fail(
                name,
                format!(
                    "eddy's CA is in {}, but in none of the roots containerd (pid {}) reads",
                    bundle.display(),
                    c.pid
                ),
                "give --bundle (the chart's trustBundle) as the bundle containerd reads",
            )
        }
        TrustVerdict::Untrusting(Reason::CaNotInRoots) => fail(
            name,
            format!(
                "eddy's CA is in none of the roots containerd (pid {}) reads",
                c.pid
            ),
            install_fix(c.distro, bundle),
        ),
        TrustVerdict::Untrusting(Reason::StartedBeforeCa) => fail(
            name,
            format!(
                "containerd (pid {}) started before eddy's CA entered its roots: it does not trust the CA yet",
                c.pid
            ),
            match &c.unit {
                Some(unit) => {
                    format!("systemctl restart {unit} (or install with trust.restartContainerd)")
                }
                None => "restart containerd once".into(),
            },
        ),
        TrustVerdict::Untrusting(_) => warn(
            name,
            format!("containerd's roots could not be read (pid {})", c.pid),
            "run eddy doctor in the host's PID namespace, as root",
        ),
    }
}

/// How to put eddy's CA into containerd's roots on `distro`.
fn install_fix(distro: distro::Distro, bundle: &Path) -> String {
    match distro {
        // The root filesystem is read-only: roots come from the machine config.
        distro::Distro::Talos => {
            "apply the patch from `eddy ca talos-patch` to the machine config".into()
        }
        _ => format!("eddy ca install --bundle {}", bundle.display()),
    }
}

fn check_port(what: &str, addr: SocketAddr, eddy_running: bool) -> Check {
    let name = format!("port.{what}");
    match TcpListener::bind(addr) {
        Ok(_) => pass(&name, format!("{addr} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && eddy_running => {
            pass(&name, format!("{addr} in use by the running eddy"))
        }
        Err(e) => fail(
            &name,
            format!("{addr}: {e}"),
            format!("free the port, or give eddy another --{what}"),
        ),
    }
}

fn check_free_space(data_dir: &Path) -> Check {
    // The data dir may not exist yet: measure the nearest existing ancestor.
    let existing = data_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match sys::free_bytes(existing) {
        Ok(free) if free >= MIN_FREE_BYTES => pass(
            "datadir.space",
            format!("{} MiB free at {}", free >> 20, existing.display()),
        ),
        Ok(free) => fail(
            "datadir.space",
            format!("only {} MiB free at {}", free >> 20, existing.display()),
            "give the data dir (the chart's cacheHostPath) at least 1 GiB",
        ),
        Err(e) => fail(
            "datadir.space",
            format!("{}: {e}", existing.display()),
            "check --data-dir",
        ),
    }
}

/// A TCP connection to each configured registry on 443 (or its own port), in parallel.
fn check_upstreams(registries: &Registries) -> Vec<Check> {
    let targets = dial_targets(registries);
    let handles: Vec<_> = targets
        .into_iter()
        .map(|(label, host, port)| {
            std::thread::spawn(move || {
                let name = format!("upstream.{label}");
                let addrs = match (host.as_str(), port).to_socket_addrs() {
                    Ok(a) => a.collect::<Vec<_>>(),
                    Err(e) => return fail(&name, format!("{host}: {e}"), "check the node's DNS"),
                };
                let mut last = None;
                for addr in addrs.iter().take(4) {
                    match TcpStream::connect_timeout(addr, UPSTREAM_TIMEOUT) {
                        Ok(_) => return pass(&name, format!("{host}:{port} reachable ({addr})")),
                        Err(e) => last = Some(format!("{addr}: {e}")),
                    }
                }
                fail(
                    &name,
                    last.unwrap_or_else(|| format!("{host}: no address")),
                    "check the node's route and firewall to the registry",
                )
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("upstream check thread"))
        .collect()
}

/// Whether a PEM bundle holds the (first) certificate of `ca_pem`, compared as DER.
fn bundle_contains(bundle: &[u8], ca_pem: &[u8]) -> bool {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let Ok(ca) = CertificateDer::from_pem_slice(ca_pem) else {
        return false;
    };
    CertificateDer::pem_slice_iter(bundle)
        .filter_map(Result::ok)
        .any(|c| c == ca)
}

/// (label, host, port) per configured registry: names on 443, addresses on their own port.
fn dial_targets(registries: &Registries) -> Vec<(String, String, u16)> {
    let mut out: Vec<_> = registries
        .hosts
        .iter()
        .map(|h| (h.clone(), h.clone(), 443))
        .collect();
    out.extend(registries.addrs.iter().map(|(ip, port)| {
        let port = port.unwrap_or(443);
        (SocketAddr::new(*ip, port).to_string(), ip.to_string(), port)
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_one_line_per_check_and_a_summary() {
        let checks = vec![
            pass("a", "fine"),
            warn("b", "meh", "do x"),
            fail("c", "broken", "do y"),
        ];
        let text = render_text(&checks);
        assert_eq!(
            text,
            "PASS a                    fine\n\
             WARN b                    meh (fix: do x)\n\
             FAIL c                    broken (fix: do y)\n\
             3 checks, 1 failed\n"
        );
        assert!(failed(&checks));
        assert!(!failed(&checks[..2]));
    }

    #[test]
    fn a_port_in_use_fails_unless_eddy_holds_it() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        assert_eq!(check_port("listen", addr, false).outcome, Outcome::Fail);
        assert_eq!(check_port("listen", addr, true).outcome, Outcome::Pass);
        drop(held);
        assert_eq!(check_port("listen", addr, false).outcome, Outcome::Pass);
    }

    #[test]
    fn upstream_reachable_and_refused_on_loopback() {
        let open = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let regs = Registries::parse(&[
            open.local_addr().unwrap().to_string(),
            closed_addr.to_string(),
        ])
        .unwrap();
        let checks = check_upstreams(&regs);
        assert_eq!(checks.len(), 2, "{checks:?}");
        assert_eq!(checks[0].outcome, Outcome::Pass, "{checks:?}");
        assert_eq!(checks[1].outcome, Outcome::Fail, "{checks:?}");
        assert!(checks[1].detail.contains("refused"), "{checks:?}");
    }

    #[test]
    fn trust_fails_without_ca_or_outside_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.crt");
        let c = check_trust(&dir.path().join("ca"), &bundle, None);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("no CA"), "{c:?}");

        let ca = crate::tls::Ca::load_or_create_in(&dir.path().join("ca"), None).unwrap();
        let c = check_trust(&dir.path().join("ca"), &bundle, None);
        assert!(c.detail.contains("not in"), "{c:?}");

        crate::tls::install_into_bundle(&bundle, ca.cert_pem()).unwrap();
        let c = check_trust(&dir.path().join("ca"), &bundle, None);
        assert!(c.detail.contains("containerd was not found"), "{c:?}");
    }

    #[test]
    fn the_ca_goes_into_the_bundle_except_on_talos_where_the_machine_config_holds_roots() {
        let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
        assert_eq!(
            install_fix(distro::Distro::K3s, bundle),
            "eddy ca install --bundle /etc/ssl/certs/ca-certificates.crt"
        );
        assert!(install_fix(distro::Distro::Talos, bundle).contains("eddy ca talos-patch"));
    }

    #[test]
    fn free_space_of_a_missing_data_dir_is_measured_at_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let c = check_free_space(&dir.path().join("not/yet"));
        assert!(
            c.detail.contains(&dir.path().display().to_string()),
            "{c:?}"
        );
    }
}
