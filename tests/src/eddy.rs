//! Running eddy under test: unique ports, pin dir and data dir; readiness, metrics, status.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::{OsStr, OsString},
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::process::{run_bounded, ProcessGuard};

/// The eddy binary under test, from `EDDY_BIN`. Panics with instructions when unset.
pub fn eddy_bin() -> PathBuf {
    match std::env::var_os("EDDY_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => panic!(
            "EDDY_BIN is not set. Run the privileged tests with `cargo xtask test`, which \
             builds eddy and sets EDDY_BIN (or set EDDY_BIN=/path/to/target/release/eddy)."
        ),
    }
}

/// How to start eddy. `EddyConfig::new(cgroup)` gives the defaults the tests use.
#[derive(Clone, Debug)]
pub struct EddyConfig {
    /// `--cgroup`: a path, or `auto`.
    pub cgroup: String,
    pub intercept_ports: Vec<u16>,
    /// `--listen`; a free loopback port when None.
    pub listen: Option<SocketAddr>,
    pub heartbeat_timeout_ms: Option<u64>,
    /// Start eddy as a member of this cgroup (the loop-guard test).
    pub run_in_cgroup: Option<PathBuf>,
    /// A program and arguments to run eddy under, e.g. `unshare --pid --fork --mount-proc`.
    pub wrapper: Vec<String>,
    /// Leave `--listen` and `--admin` to eddy's defaults (127.0.0.1:15443, 127.0.0.1:15090).
    /// Only for an eddy in a network namespace of the test's own, where they cannot collide;
    /// `listen` and `admin` then name those defaults, as seen inside that namespace.
    pub default_addresses: bool,
    /// More `eddy run` arguments, appended as they are.
    pub extra_args: Vec<OsString>,
}

impl EddyConfig {
    pub fn new(cgroup: &Path) -> Self {
        Self {
            cgroup: cgroup.display().to_string(),
            intercept_ports: vec![crate::basics::INTERCEPTED_PORT],
            listen: None,
            heartbeat_timeout_ms: None,
            run_in_cgroup: None,
            wrapper: Vec::new(),
            default_addresses: false,
            extra_args: Vec::new(),
        }
    }
}

/// A running (or exited) eddy. Dropping it kills eddy, prints the tail of its log and removes
/// any pins it left behind; [`Eddy::stop_quietly`] does the same without printing.
pub struct Eddy {
    inner: EddyProcess,
    bin: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub pin_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl Eddy {
    /// Start eddy and wait (bounded) until /readyz answers 200.
    pub fn start(bin: &Path, config: &EddyConfig) -> Result<Self> {
        let mut eddy = Self::spawn(bin, config)?;
        eddy.wait_ready(Duration::from_secs(20))?;
        Ok(eddy)
    }

    /// Start eddy without waiting for it.
    pub fn spawn(bin: &Path, config: &EddyConfig) -> Result<Self> {
        // Holds the data dir and the log.
        let work = tempfile::Builder::new().prefix("eddy-test-").tempdir()?;
        let data_dir = work.path().join("data");
        fs::create_dir(&data_dir)?;

        let mut wrapper: Vec<OsString> = Vec::new();
        if let Some(cgroup) = &config.run_in_cgroup {
            // The shell joins the cgroup, then becomes eddy: eddy's pid is the child's pid,
            // and eddy creates every socket from inside the cgroup.
            wrapper.extend(["sh", "-c", r#"echo $$ > "$0" && exec "$@""#].map(OsString::from));
            wrapper.push(cgroup.join("cgroup.procs").into());
        }
        wrapper.extend(config.wrapper.iter().map(OsString::from));
        let mut run = RunCommand::new(
            wrapper,
            bin,
            config.cgroup.as_ref(),
            config.listen,
            &config.intercept_ports,
            &data_dir,
        )?;
        if let Some(ms) = config.heartbeat_timeout_ms {
            run.flag("--heartbeat-timeout-ms", ms.to_string());
        }
        if config.default_addresses {
            run.use_default_addresses();
        }
        run.argv.extend(config.extra_args.iter().cloned());
        let inner = run.spawn(work, false)?;
        Ok(Self {
            bin: bin.to_path_buf(),
            listen: inner.listen,
            admin: inner.admin,
            pin_dir: inner.pin_dir.clone(),
            data_dir,
            inner,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// The proxy address a redirected IPv4 client sees as its peer.
    pub fn listen_v6(&self) -> SocketAddr {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.listen.port()))
    }

    /// The proxy address a redirected v4-mapped client sees as its peer.
    pub fn listen_v4_mapped(&self) -> SocketAddr {
        match self.listen {
            SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
            v6 => v6,
        }
    }

    /// Everything eddy wrote to stderr so far (its stdout goes to the same file; `eddy run`
    /// prints nothing there).
    pub fn stderr(&self) -> String {
        self.inner.log_text()
    }

    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        self.inner.child.signal(signal)
    }

    pub fn kill_and_wait(&mut self) -> Result<ExitStatus> {
        self.inner.child.kill_and_wait()
    }

    /// Wait at most `timeout` for eddy to exit; error (with its log) if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.inner.child.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "eddy did not exit within {timeout:?}; log:\n{}",
                self.inner.log_tail(40)
            ),
        }
    }

    /// Poll /readyz until it answers 200, eddy exits, or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.inner.wait_ready(timeout)
    }

    /// GET a path on the admin server.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin, path)
    }

    /// The Prometheus text from /metrics.
    pub fn metrics(&self) -> Result<String> {
        self.inner.metrics()
    }

    /// One series, e.g. `eddy_connections_total{route="passthrough"}`. A series that has not
    /// been created yet reads as 0 (label sets appear on first use); tests that need it to
    /// exist assert a positive value.
    pub fn metric(&self, series: &str) -> Result<f64> {
        self.inner.metric(series)
    }

    /// `eddy_bpf_events_total{event="<event>"}`.
    pub fn bpf_event(&self, event: &str) -> Result<u64> {
        Ok(self.metric(&bpf_event_series(event))? as u64)
    }

    /// `eddy_connections_total{route="passthrough"}`.
    pub fn passthrough_connections(&self) -> Result<u64> {
        Ok(self.metric(PASSTHROUGH_SERIES)? as u64)
    }

    /// Poll a series until it reaches `min` (counters may be read from BPF maps on an
    /// interval). Returns the last value read; the caller asserts on it.
    pub fn wait_metric_at_least(&self, series: &str, min: f64, timeout: Duration) -> Result<f64> {
        self.inner.wait_metric_at_least(series, min, timeout)
    }

    /// `eddy status --json` for this instance's pin dir; fails if the command fails.
    pub fn status(&self) -> Result<Status> {
        let out = status_command(&self.bin, &self.pin_dir)?;
        if !out.status.success() {
            bail!(
                "eddy status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&text).with_context(|| format!("parsing eddy status --json: {text}"))
    }

    /// Kill eddy and clean up as dropping it does, without printing its log (for a run that
    /// went well and keeps its own output readable).
    pub fn stop_quietly(self) {
        self.inner.stop_quietly();
    }
}

/// An `eddy run` command line for a test: free loopback ports and a unique pin dir.
pub(crate) struct RunCommand {
    listen: SocketAddr,
    admin: SocketAddr,
    pin_dir: PathBuf,
    pub(crate) argv: Vec<OsString>,
}

impl RunCommand {
    /// `WRAPPER... BIN run --cgroup CGROUP --listen ADDR --admin ADDR [--intercept-port P]...
    /// --data-dir DATA_DIR --bpf-pin-dir DIR`, listening on `listen` (a free loopback port
    /// when None).
    pub(crate) fn new(
        wrapper: Vec<OsString>,
        bin: &Path,
        cgroup: &OsStr,
        listen: Option<SocketAddr>,
        intercept_ports: &[u16],
        data_dir: &Path,
    ) -> Result<Self> {
        let listen = match listen {
            Some(addr) => addr,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/eddy-test-{}",
            crate::basics::unique_suffix()
        ));
        let mut run = Self {
            listen,
            admin,
            pin_dir: pin_dir.clone(),
            argv: wrapper,
        };
        run.argv.push(bin.into());
        run.argv.push("run".into());
        run.flag("--cgroup", cgroup);
        run.flag("--listen", listen.to_string());
        run.flag("--admin", admin.to_string());
        for port in intercept_ports {
            run.flag("--intercept-port", port.to_string());
        }
        run.flag("--data-dir", data_dir);
        run.flag("--bpf-pin-dir", pin_dir);
        Ok(run)
    }

    /// Drop `--listen` and `--admin`, so eddy binds its defaults.
    pub(crate) fn use_default_addresses(&mut self) {
        for flag in ["--listen", "--admin"] {
            if let Some(i) = self.argv.iter().position(|a| a == flag) {
                self.argv.drain(i..i + 2);
            }
        }
        self.listen = SocketAddr::from(([127, 0, 0, 1], 15443));
        self.admin = SocketAddr::from(([127, 0, 0, 1], 15090));
    }

    /// Replace the `--admin` address (an eddy in a namespace: the test reaches it there).
    pub(crate) fn set_admin(&mut self, admin: SocketAddr) {
        if let Some(i) = self.argv.iter().position(|a| a == "--admin") {
            self.argv[i + 1] = admin.to_string().into();
        }
        self.admin = admin;
    }

    /// Append `FLAG VALUE`.
    pub(crate) fn flag(&mut self, flag: &str, value: impl Into<OsString>) {
        self.argv.extend([flag.into(), value.into()]);
    }

    /// Start it with stdout and stderr to `eddy.log` in `work` (which the process keeps),
    /// printing the command line first unless `quiet`.
    pub(crate) fn spawn(self, work: tempfile::TempDir, quiet: bool) -> Result<EddyProcess> {
        let log = work.path().join("eddy.log");
        let log_file = fs::File::create(&log)?;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // Tests pass everything as flags; an inherited EDDY_* must not change the setup.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("EDDY_") {
                cmd.env_remove(key);
            }
        }
        if !quiet {
            eprintln!("starting eddy: {}", shell_words(&self.argv));
        }
        Ok(EddyProcess {
            child: ProcessGuard::spawn("eddy", &mut cmd)?,
            listen: self.listen,
            admin: self.admin,
            pin_dir: self.pin_dir,
            log,
            quiet: false,
            _work: work,
        })
    }
}

/// What both launchers run ([`Eddy`] here, [`RegistryEddy`] for the registry cache): the
/// process, its addresses and pin dir, and its log. Dropping it kills eddy, prints the log's
/// tail (libtest shows it only when a test fails) unless stopped quietly, and removes the
/// pins SIGKILL leaves behind.
///
/// [`RegistryEddy`]: crate::registry_eddy::RegistryEddy
pub(crate) struct EddyProcess {
    pub(crate) child: ProcessGuard,
    pub(crate) listen: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) pin_dir: PathBuf,
    log: PathBuf,
    quiet: bool,
    // Holds the log (and maybe the data dir); removed last.
    _work: tempfile::TempDir,
}

impl EddyProcess {
    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Everything eddy logged so far.
    pub(crate) fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        crate::basics::tail(&self.log_text(), lines)
    }

    /// Poll /readyz until it answers 200, eddy exits, or `timeout` passes.
    pub(crate) fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "eddy exited ({status}) before it was ready; log:\n{}",
                    self.log_tail(40)
                );
            }
            let last = match http_get(self.admin, "/readyz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "eddy was not ready within {timeout:?} (last /readyz: {last}); log:\n{}",
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus text from /metrics.
    pub(crate) fn metrics(&self) -> Result<String> {
        match http_get(self.admin, "/metrics")? {
            (200, body) => Ok(body),
            (code, body) => bail!("/metrics answered {code}: {body}"),
        }
    }

    /// One series; absent reads as 0 (label sets appear on first use).
    pub(crate) fn metric(&self, series: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics()?, series).unwrap_or(0.0))
    }

    /// Poll `series` until it is at least `min` or `timeout` passes; returns the last value.
    pub(crate) fn wait_metric_at_least(
        &self,
        series: &str,
        min: f64,
        timeout: Duration,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(series)?;
            if value >= min || Instant::now() >= deadline {
                return Ok(value);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Drop without printing the log.
    pub(crate) fn stop_quietly(mut self) {
        self.quiet = true;
    }
}

impl Drop for EddyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill_and_wait();
        if !self.quiet {
            // Shown only when the test fails (libtest captures it otherwise).
            eprintln!("--- eddy log (last 40 lines) ---\n{}", self.log_tail(40));
        }
        // SIGKILL leaves the pinned maps behind; the programs went with the link.
        if self.pin_dir.exists() {
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
    }
}

pub const PASSTHROUGH_SERIES: &str = r#"eddy_connections_total{route="passthrough"}"#;

pub fn bpf_event_series(event: &str) -> String {
    format!(r#"eddy_bpf_events_total{{event="{event}"}}"#)
}

/// Run `eddy status --bpf-pin-dir DIR --json` (bounded), whatever its outcome.
pub fn status_command(bin: &Path, pin_dir: &Path) -> Result<std::process::Output> {
    run_bounded(
        Command::new(bin)
            .args(["status", "--json", "--bpf-pin-dir"])
            .arg(pin_dir),
        Duration::from_secs(10),
    )
}

/// `eddy status` as text, for the eddy with pins in `pin_dir` and its admin server at
/// `admin`; fails if the command fails.
pub fn status_text(pin_dir: &Path, admin: SocketAddr) -> Result<String> {
    let out = run_bounded(
        Command::new(eddy_bin())
            .args(["status", "--bpf-pin-dir"])
            .arg(pin_dir)
            .arg("--admin")
            .arg(admin.to_string()),
        Duration::from_secs(20),
    )?;
    if !out.status.success() {
        bail!(
            "eddy status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `eddy status --json`, per the CLI contract.
#[derive(Debug, Deserialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub running: bool,
    pub pid: u32,
    pub cgroup: StatusCgroup,
    pub attached: Vec<Attached>,
    pub listen: String,
    pub intercept_ports: Vec<u16>,
    pub heartbeat_age_ms: Option<u64>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
pub struct StatusCgroup {
    pub id: u64,
    pub path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
pub struct Attached {
    pub attach_type: String,
    pub prog_id: u32,
    pub name: String,
}

/// The value of one series in Prometheus text format.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        // `series value [timestamp]`; the space rules out a longer name with this prefix.
        let value = rest.strip_prefix(' ')?.split_whitespace().next()?;
        value.parse().ok()
    })
}

/// A loopback port free on both 127.0.0.1 and [::1] (eddy listens on both), and never handed
/// out before by this process: the probe listener closes on return, so the kernel may offer the
/// same port to the next probe, and two calls for one eddy (`--listen`, `--admin`) would collide.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0")?;
        let port = v4.local_addr()?.port();
        if TcpListener::bind(("::1", port)).is_ok()
            && HANDED_OUT.lock().expect("port set lock").insert(port)
        {
            return Ok(port);
        }
    }
    bail!("no loopback port free on both 127.0.0.1 and [::1]")
}

/// Minimal HTTP/1.0 GET: HTTP/1.0 makes the server close after the body, without chunking.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connect to admin {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream
        .take(16 << 20)
        .read_to_end(&mut response)
        .with_context(|| format!("reading GET {path}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response to GET {path}: {head:?}"))?;
    Ok((code, body.to_string()))
}

fn shell_words(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labelled_series() {
        let text = "# HELP eddy_bpf_events_total events\n\
                    eddy_bpf_events_total{event=\"redirected\"} 12\n\
                    eddy_bpf_events_total{event=\"skipped_loop\"} 3\n\
                    eddy_connections_total{route=\"passthrough\"} 7.0\n";
        assert_eq!(
            metric_value(text, &bpf_event_series("redirected")),
            Some(12.0)
        );
        assert_eq!(
            metric_value(text, &bpf_event_series("skipped_loop")),
            Some(3.0)
        );
        assert_eq!(metric_value(text, PASSTHROUGH_SERIES), Some(7.0));
        assert_eq!(metric_value(text, &bpf_event_series("skipped_netns")), None);
    }
}
