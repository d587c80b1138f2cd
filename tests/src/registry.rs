//! A real upstream registry for the end-to-end tests: docker-registry (distribution 2.8.2)
//! serving HTTPS on 10.A.B.1:443 (or plain HTTP on another port) inside a test network
//! namespace, optionally behind htpasswd Basic auth, optionally answering blob GETs with 307
//! to `cdn.test:8443`, a small HTTPS file server (python3) over the registry's storage root
//! in the same namespace.
//!
//! Both servers log every response with the bytes it wrote, so a test can count what the
//! upstream really sent: that is the ground truth for "eddy fetched it once" checks, not
//! eddy's own metrics.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    netns::Netns,
    oci::Image,
    pki::Pki,
    process::{run_bounded, run_ok, ProcessGuard},
};

/// The registry's name; clients resolve it to the namespace's address.
pub const REGISTRY_HOST: &str = "registry.test";
/// The "CDN" the redirect middleware sends blob GETs to.
pub const CDN_HOST: &str = "cdn.test";
pub const CDN_PORT: u16 = 8443;
pub const REGISTRY_PORT: u16 = 443;

#[derive(Clone, Debug, Default)]
pub struct UpstreamOptions {
    /// Protect every repository with Basic auth for this user and password.
    pub basic_auth: Option<(String, String)>,
    /// Answer blob GETs with 307 to `https://cdn.test:8443/...`, served by a file server.
    pub redirect_to_cdn: bool,
    /// The CDN answers whole-file GETs chunked, without a Content-Length.
    pub cdn_chunked: bool,
    /// Serve plain HTTP (no TLS) on this port instead of HTTPS on [`REGISTRY_PORT`].
    pub plain_http_port: Option<u16>,
    /// Bearer-token auth instead: the registry config's `auth:` section (see
    /// [`crate::token_auth::SigningKey::registry_auth_config`]).
    pub token_auth: Option<String>,
    /// Credentials for skopeo's push when they are not `basic_auth`'s (token auth).
    pub push_creds: Option<(String, String)>,
    /// Run skopeo's push with this file over /etc/hosts (in a private mount namespace) and
    /// the test CA as `SSL_CERT_FILE`: it must resolve and trust a token host.
    pub push_hosts: Option<PathBuf>,
}

/// docker-registry (and the CDN when asked) running in a netns. Killed on drop.
pub struct Upstream {
    registry: Option<ProcessGuard>,
    cdn: Option<ProcessGuard>,
    pub ip: Ipv4Addr,
    pub options: UpstreamOptions,
    /// The registry's filesystem storage root (also the CDN's document root).
    pub storage: PathBuf,
    /// The registry's JSON log (one "response completed" line per request).
    pub log: PathBuf,
    /// The CDN's log, one JSON line per response with the body bytes sent.
    pub cdn_log: PathBuf,
    cert_dir: PathBuf,
    work: tempfile::TempDir,
}

/// What the registry's own log says it sent for successful GETs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub blob_gets: u64,
    pub blob_bytes: u64,
    pub manifest_gets: u64,
    pub manifest_bytes: u64,
    /// Blob GETs answered with 307 (to the CDN).
    pub redirects: u64,
    /// Requests answered 401.
    pub unauthorized: u64,
}

/// One request from the registry's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub written: u64,
    pub user_agent: String,
}

impl Served {
    pub fn bytes(&self) -> u64 {
        self.blob_bytes + self.manifest_bytes
    }
}

impl Upstream {
    /// Start docker-registry (and the CDN) in `netns`, serving `pki`'s server certificate,
    /// and wait until they accept connections.
    pub fn start(netns: &Netns, pki: &Pki, options: UpstreamOptions) -> Result<Self> {
        let work = tempfile::Builder::new()
            .prefix("eddy-upstream-")
            .tempdir()?;
        let storage = work.path().join("storage");
        fs::create_dir_all(&storage)?;
        let ip = netns.ns_v4;
        let log = work.path().join("registry.log");
        let cdn_log = work.path().join("cdn.log");
        let port = options.plain_http_port.unwrap_or(REGISTRY_PORT);
        let tls = match options.plain_http_port {
            Some(_) => String::new(),
            None => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                pki.server_cert.display(),
                pki.server_key.display(),
            ),
        };

        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 cache:\n    blobdescriptor: inmemory\n\
             http:\n  addr: {ip}:{port}\n{tls}",
            storage = storage.display(),
        );
        if let Some((user, password)) = &options.basic_auth {
            let hash = bcrypt::hash(password, 4).context("bcrypt")?;
            let htpasswd = work.path().join("htpasswd");
            fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: eddy-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some(auth) = &options.token_auth {
            config.push_str(auth);
        }
        if options.redirect_to_cdn {
            config.push_str(&format!(
                "middleware:\n  storage:\n    - name: redirect\n      options:\n        \
                 baseurl: https://{CDN_HOST}:{CDN_PORT}\n"
            ));
        }
        let config_path = work.path().join("config.yml");
        fs::write(&config_path, &config)?;

        let log_file = fs::File::create(&log)?;
        let registry = ProcessGuard::spawn(
            "docker-registry",
            netns
                .command("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file),
        )?;
        let mut upstream = Self {
            registry: Some(registry),
            cdn: None,
            ip,
            options,
            storage,
            log,
            cdn_log,
            cert_dir: pki.cert_dir.clone(),
            work,
        };
        if upstream.options.redirect_to_cdn {
            let script = upstream.work.path().join("cdn.py");
            fs::write(&script, CDN_SERVER)?;
            let out = fs::File::create(upstream.work.path().join("cdn.stderr"))?;
            upstream.cdn = Some(ProcessGuard::spawn(
                "cdn",
                netns
                    .command(&python3())
                    .arg(&script)
                    .arg(&upstream.storage)
                    .arg(&pki.server_cert)
                    .arg(&pki.server_key)
                    .arg(ip.to_string())
                    .arg(CDN_PORT.to_string())
                    .arg(&upstream.cdn_log)
                    .arg(if upstream.options.cdn_chunked {
                        "chunked"
                    } else {
                        "sized"
                    })
                    .stdin(Stdio::null())
                    .stdout(out.try_clone()?)
                    .stderr(out),
            )?);
        }
        upstream.wait_listening(SocketAddr::from((ip, port)), Duration::from_secs(15))?;
        if upstream.options.redirect_to_cdn {
            upstream.wait_listening(SocketAddr::from((ip, CDN_PORT)), Duration::from_secs(15))?;
        }
        Ok(upstream)
    }

    /// Make the CDN's next `count` blob GETs fail with `kind`: `reset` (RST after half the
    /// body), `corrupt` (one flipped byte), `stall` (half the body, then silence) or `503`.
    pub fn inject_cdn_fault(&self, kind: &str, count: u32) -> Result<()> {
        let faults = PathBuf::from(format!("{}.faults", self.cdn_log.display()));
        fs::write(&faults, format!("{kind} {count}"))?;
        Ok(())
    }

    /// The registry's address (`10.A.B.1:443`, or the plain-HTTP port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((
            self.ip,
            self.options.plain_http_port.unwrap_or(REGISTRY_PORT),
        ))
    }

    /// How clients name the registry by address: `10.A.B.1` (HTTPS on 443) or
    /// `10.A.B.1:PORT` (plain HTTP).
    pub fn ip_authority(&self) -> String {
        match self.options.plain_http_port {
            Some(port) => format!("{}:{port}", self.ip),
            None => self.ip.to_string(),
        }
    }

    fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut exited = None;
            for (name, guard) in [
                ("docker-registry", &mut self.registry),
                ("cdn", &mut self.cdn),
            ] {
                if let Some(guard) = guard {
                    if let Some(status) = guard.try_wait()? {
                        exited = Some((name, status));
                    }
                }
            }
            if let Some((name, status)) = exited {
                bail!(
                    "{name} exited ({status}) at start; logs:\n{}",
                    self.logs_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nothing listens on {addr} after {timeout:?}; logs:\n{}",
                    self.logs_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the registry's and the CDN's logs.
    pub fn logs_tail(&self) -> String {
        let mut text = String::new();
        for path in [
            self.log.clone(),
            self.cdn_log.clone(),
            self.work.path().join("cdn.stderr"),
        ] {
            let body = fs::read_to_string(&path).unwrap_or_default();
            text.push_str(&format!("--- {} ---\n", path.display()));
            text.push_str(&crate::basics::tail(&body, 15));
            text.push('\n');
        }
        text
    }

    /// Push `image` as `registry.test/<repo>:<tag>` with skopeo (by IP; the certificate
    /// carries it; plain HTTP when the registry has no TLS), keeping the layers' digests.
    pub fn push(&self, image: &Image, repo: &str) -> Result<Duration> {
        let start = Instant::now();
        let mut cmd = match &self.options.push_hosts {
            Some(hosts) => {
                let mut cmd = Command::new("unshare");
                cmd.args([
                    "--mount",
                    "sh",
                    "-c",
                    r#"mount --bind "$0" /etc/hosts && exec "$@""#,
                ])
                .arg(hosts)
                .arg("skopeo")
                .env("SSL_CERT_FILE", self.cert_dir.join("ca.crt"))
                .env_remove("SSL_CERT_DIR");
                cmd
            }
            None => Command::new("skopeo"),
        };
        cmd.args([
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-cert-dir",
        ])
        .arg(&self.cert_dir);
        if self.options.plain_http_port.is_some() {
            cmd.arg("--dest-tls-verify=false");
        }
        if let Some((user, password)) = self
            .options
            .basic_auth
            .as_ref()
            .or(self.options.push_creds.as_ref())
        {
            cmd.args(["--dest-creds", &format!("{user}:{password}")]);
        }
        cmd.arg(format!("oci:{}:{}", image.layout.display(), image.tag))
            .arg(format!(
                "docker://{}/{repo}:{}",
                self.ip_authority(),
                image.tag
            ));
        let out = run_bounded(&mut cmd, Duration::from_secs(120))?;
        if !out.status.success() {
            bail!(
                "skopeo push of {repo}:{} failed ({}): {}\nregistry log:\n{}",
                image.tag,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.logs_tail()
            );
        }
        Ok(start.elapsed())
    }

    /// Stop docker-registry (SIGKILL): upstream "goes away". The CDN stays.
    pub fn stop_registry(&mut self) -> Result<()> {
        if let Some(mut registry) = self.registry.take() {
            registry.kill_and_wait()?;
        }
        Ok(())
    }

    /// Sum the registry's log: successful blob and manifest GETs and their bytes.
    pub fn served(&self) -> Result<Served> {
        let text = fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        Ok(parse_registry_log(&text))
    }

    /// Method, URI and status of every manifest request in the registry's log, in order.
    pub fn manifest_requests(&self) -> Vec<String> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|v| v["msg"] == "response completed")
            .filter(|v| {
                v["http.request.uri"]
                    .as_str()
                    .unwrap_or("")
                    .contains("/manifests/")
            })
            .map(|v| request_line(&v))
            .collect()
    }

    /// Every request the registry answered, errors included (which
    /// [`Upstream::requests`] leaves out), as `METHOD URI STATUS`, in order.
    pub fn answered(&self) -> Result<Vec<String>> {
        let text = fs::read_to_string(&self.log)?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["http.response.status"].is_u64())
            .map(|v| request_line(&v))
            .collect())
    }

    /// Every request in the registry's log (pushes included), in order. Requests refused by
    /// the `auth:` layer have no "response completed" line; they appear with status 401
    /// (distribution logs them as "error authorizing context: ...").
    pub fn requests(&self) -> Vec<LoggedRequest> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|v| {
                let msg = v["msg"].as_str().unwrap_or("");
                let status = if msg == "response completed" {
                    v["http.response.status"].as_u64().unwrap_or(0) as u16
                } else if msg.starts_with("error authorizing context") {
                    401
                } else {
                    return None;
                };
                Some((v, status))
            })
            .map(|(v, status)| LoggedRequest {
                method: v["http.request.method"].as_str().unwrap_or("?").to_string(),
                uri: v["http.request.uri"].as_str().unwrap_or("?").to_string(),
                status,
                written: v["http.response.written"].as_u64().unwrap_or(0),
                user_agent: v["http.request.useragent"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            })
            .collect()
    }

    /// Body bytes the CDN sent, over all GETs.
    pub fn cdn_bytes(&self) -> Result<u64> {
        let text = fs::read_to_string(&self.cdn_log).unwrap_or_default();
        let mut total = 0;
        for line in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("cdn log line {line:?}"))?;
            if v["method"] == "GET" {
                total += v["bytes"].as_u64().unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// GETs the CDN answered (any status).
    pub fn cdn_gets(&self) -> u64 {
        let text = fs::read_to_string(&self.cdn_log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(r#""method": "GET""#))
            .count() as u64
    }
}

/// `METHOD URI STATUS` of one request in distribution's JSON log.
fn request_line(v: &serde_json::Value) -> String {
    format!(
        "{} {} {}",
        v["http.request.method"].as_str().unwrap_or("?"),
        v["http.request.uri"].as_str().unwrap_or("?"),
        v["http.response.status"]
    )
}

/// The programs the registry end-to-end tests drive, with their Debian packages.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("tc", "iproute2"),
];

/// Error, naming the packages to install, unless every program in [`PROGRAMS`] is on PATH.
pub fn check_programs() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(program, _)| !std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .map(|(program, package)| format!("{program} (apt-get install {package})"))
        .collect();
    if !missing.is_empty() {
        bail!("the registry end-to-end tests need: {}", missing.join(", "));
    }
    Ok(())
}

/// Sum successful (200/206) blob and manifest GETs in distribution's JSON log.
pub fn parse_registry_log(text: &str) -> Served {
    let mut served = Served::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["msg"] != "response completed" {
            continue;
        }
        let status = v["http.response.status"].as_u64().unwrap_or(0);
        if status == 401 {
            served.unauthorized += 1;
        }
        if v["http.request.method"] != "GET" {
            continue;
        }
        let uri = v["http.request.uri"].as_str().unwrap_or("");
        let written = v["http.response.written"].as_u64().unwrap_or(0);
        let is_blob = uri.contains("/blobs/sha256:");
        let is_manifest = uri.contains("/manifests/");
        match status {
            200 | 206 if is_blob => {
                served.blob_gets += 1;
                served.blob_bytes += written;
            }
            200 | 206 if is_manifest => {
                served.manifest_gets += 1;
                served.manifest_bytes += written;
            }
            307 if is_blob => served.redirects += 1,
            _ => {}
        }
    }
    served
}

/// Shape the link between `netns` and whatever is outside it (the host, or a LAN's switch;
/// both directions) to `rate` (tc syntax, e.g. "50mbit"), or remove the shaping with None.
pub fn shape_link(netns: &Netns, rate: Option<&str>) -> Result<()> {
    let (outside_if, _) = netns.outside_if();
    match rate {
        Some(rate) => {
            let tbf = [
                "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms",
            ];
            run_ok(
                netns
                    .outside_command("tc")
                    .args(["qdisc", "replace", "dev", outside_if])
                    .args(tbf),
            )?;
            run_ok(
                netns
                    .command("tc")
                    .args(["qdisc", "replace", "dev", "eth0"])
                    .args(tbf),
            )?;
        }
        None => {
            let _ = run_ok(
                netns
                    .outside_command("tc")
                    .args(["qdisc", "del", "dev", outside_if, "root"]),
            );
            let _ = run_ok(
                netns
                    .command("tc")
                    .args(["qdisc", "del", "dev", "eth0", "root"]),
            );
        }
    }
    Ok(())
}

/// The system python3 (not a user's pyenv shim, which may not work under `ip netns exec`).
fn python3() -> String {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".into()
    } else {
        "python3".into()
    }
}

/// An HTTPS static file server with Range support that logs the bytes of every response.
const CDN_SERVER: &str = r#"
import http.server, json, os, socket, ssl, struct, sys, threading

root, cert, key, addr, port, log, framing = sys.argv[1:8]
root = os.path.realpath(root)
lock = threading.Lock()
# Fault injection: a file "KIND COUNT" beside the log makes the next COUNT body GETs fail
# with KIND: reset (RST after half the body), corrupt (a flipped byte, full length),
# stall (half the body, then silence until the client leaves), 503 (an error answer).
faults = log + ".faults"

def take_fault():
    with lock:
        try:
            kind, count = open(faults).read().split()
        except (OSError, ValueError):
            return None
        if int(count) <= 0:
            return None
        with open(faults, "w") as f:
            f.write("%s %d" % (kind, int(count) - 1))
        return kind

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def record(self, status, sent):
        line = json.dumps({"method": self.command, "path": self.path, "status": status,
                           "range": self.headers.get("Range"), "bytes": sent})
        with lock, open(log, "a") as f:
            f.write(line + "\n")

    def serve(self, with_body):
        rel = self.path.split("?")[0].lstrip("/")
        path = os.path.realpath(os.path.join(root, rel))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.record(404, 0)
            return
        fault = take_fault() if with_body else None
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.record(503, 0)
            return
        size = os.path.getsize(path)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first) if first else 0
            if last:
                end = min(int(last), size - 1)
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % size)
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.record(416, 0)
                return
            status = 206
        chunked = framing == "chunked" and status == 200
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        sent = 0
        if with_body:
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    while left > 0:
                        chunk = f.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        if fault and sent + len(chunk) > (end - start + 1) // 2:
                            if fault == "corrupt":
                                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                                fault = None
                            elif fault == "reset":
                                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0))
                                # The descriptor closes (with an RST) only once rfile lets go.
                                self.rfile.close()
                                self.connection.close()
                                self.record(status, sent)
                                return
                            elif fault == "stall":
                                self.connection.settimeout(None)
                                try:
                                    while self.connection.recv(4096):
                                        pass
                                except OSError:
                                    pass
                                self.record(status, sent)
                                return
                        if chunked:
                            self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                        else:
                            self.wfile.write(chunk)
                        sent += len(chunk)
                        left -= len(chunk)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
        self.record(status, sent)

    def do_GET(self):
        self.serve(True)

    def do_HEAD(self):
        self.serve(False)

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server = Server((addr, int(port)), Handler)
# Handshake in the handler thread, so one slow client cannot stall accept().
server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
server.serve_forever()
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_successful_blob_and_manifest_gets() {
        let log = r#"{"http.request.method":"GET","http.request.uri":"/v2/r/blobs/sha256:aa","http.response.status":200,"http.response.written":1000,"msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/r/blobs/sha256:bb","http.response.status":206,"http.response.written":10,"msg":"response completed"}
{"http.request.method":"HEAD","http.request.uri":"/v2/r/manifests/v1","http.response.status":200,"http.response.written":0,"msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/r/manifests/v1","http.response.status":200,"http.response.written":500,"msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/r/blobs/sha256:cc","http.response.status":307,"http.response.written":0,"msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/r/manifests/v1","http.response.status":401,"http.response.written":90,"msg":"response completed"}
{"level":"info","msg":"listening on 10.0.0.1:443, tls"}
not json"#;
        let served = parse_registry_log(log);
        assert_eq!(
            served,
            Served {
                blob_gets: 2,
                blob_bytes: 1010,
                manifest_gets: 1,
                manifest_bytes: 500,
                redirects: 1,
                unauthorized: 1,
            }
        );
    }
}
