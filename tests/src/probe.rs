//! Driving `eddy-probe` from the harness: every run is bounded and returns a parsed report.
use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

use crate::{
    netns::Netns,
    process::{run_bounded, ProcessGuard},
    wire::{DownloadReport, EchoReport, LatencyReport, ManyReport},
};

#[derive(Clone, Debug)]
pub struct Probe {
    bin: PathBuf,
}

impl Probe {
    /// `bin` is `env!("CARGO_BIN_EXE_eddy-probe")` in integration tests.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self { bin: bin.into() }
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// One checksummed echo of `bytes`, from inside `cgroup` if given.
    pub fn echo(
        &self,
        target: SocketAddr,
        bytes: u64,
        timeout: Duration,
        cgroup: Option<&Path>,
    ) -> Result<EchoReport> {
        let mut cmd = self.client("echo", target, cgroup);
        cmd.args(["--bytes", &bytes.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        // Generous outer bound: process start-up plus the probe's own per-call timeouts.
        run_json(&mut cmd, timeout * 3 + Duration::from_secs(5))
    }

    /// Like [`Probe::echo`], but run inside another network namespace.
    pub fn echo_in_netns(
        &self,
        netns: &Netns,
        target: SocketAddr,
        bytes: u64,
        timeout: Duration,
        cgroup: Option<&Path>,
    ) -> Result<EchoReport> {
        // `ip netns exec` mounts a fresh /sys, which hides the cgroup2 mount, so join the
        // cgroup from a shell first and then exec into the namespace (same pid throughout).
        let mut cmd = Command::new("sh");
        match cgroup {
            Some(cgroup) => cmd
                .args(["-c", r#"echo $$ > "$0" && exec "$@""#])
                .arg(cgroup.join("cgroup.procs")),
            None => cmd.args(["-c", r#"exec "$@""#, "sh"]),
        };
        cmd.args(["ip", "netns", "exec", netns.name()])
            .arg(&self.bin)
            .args(["echo", "--connect", &target.to_string()])
            .args(["--bytes", &bytes.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        run_json(&mut cmd, timeout * 3 + Duration::from_secs(5))
    }

    /// Start an echo that connects at once but sends only after `delay`, and return
    /// without waiting: a connection in flight across some event (a drain).
    pub fn echo_background(
        &self,
        target: SocketAddr,
        bytes: u64,
        delay: Duration,
        cgroup: Option<&Path>,
    ) -> Result<BackgroundEcho> {
        let mut cmd = self.client("echo", target, cgroup);
        cmd.args(["--bytes", &bytes.to_string()])
            .args(["--delay-ms", &delay.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let what = format!("{cmd:?}");
        let process = ProcessGuard::spawn("eddy-probe echo", &mut cmd)?;
        Ok(BackgroundEcho { what, process })
    }

    /// `conns` concurrent checksummed echoes of `bytes` each.
    pub fn many(
        &self,
        target: SocketAddr,
        conns: u64,
        bytes: u64,
        timeout: Duration,
        cgroup: Option<&Path>,
    ) -> Result<ManyReport> {
        let mut cmd = self.client("many", target, cgroup);
        cmd.args(["--conns", &conns.to_string()])
            .args(["--bytes", &bytes.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        run_json(&mut cmd, timeout + Duration::from_secs(10))
    }

    /// Start `conns` connections that each send `send` (at once, or one byte per `trickle`)
    /// and then hold still for `hold`; returns without waiting. See [`BackgroundHold`].
    pub fn hold_background(
        &self,
        target: SocketAddr,
        conns: u64,
        hold: Duration,
        send: Option<&Path>,
        trickle: Duration,
        cgroup: Option<&Path>,
    ) -> Result<BackgroundHold> {
        let mut cmd = self.client("hold", target, cgroup);
        cmd.args(["--conns", &conns.to_string()])
            .args(["--hold-ms", &hold.as_millis().to_string()])
            .args(["--trickle-ms", &trickle.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(path) = send {
            cmd.arg("--send").arg(path);
        }
        let what = format!("{cmd:?}");
        let process = ProcessGuard::spawn("eddy-probe hold", &mut cmd)?;
        Ok(BackgroundHold { what, process })
    }

    /// `count` sequential connect() timings, `pause` apart.
    pub fn connect_latency(
        &self,
        target: SocketAddr,
        count: u64,
        pause: Duration,
        cgroup: Option<&Path>,
    ) -> Result<LatencyReport> {
        let mut cmd = self.client("connect-latency", target, cgroup);
        cmd.args(["--count", &count.to_string()])
            .args(["--timeout-ms", "1000"])
            .args(["--pause-us", &pause.as_micros().to_string()]);
        // Each connect is bounded by 1 s, plus the pauses.
        run_json(
            &mut cmd,
            (Duration::from_secs(1) + pause) * count as u32 + Duration::from_secs(10),
        )
    }

    /// Download `bytes` and measure the throughput.
    pub fn download(
        &self,
        target: SocketAddr,
        bytes: u64,
        timeout: Duration,
        cgroup: Option<&Path>,
    ) -> Result<DownloadReport> {
        let mut cmd = self.client("download", target, cgroup);
        cmd.args(["--bytes", &bytes.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        run_json(&mut cmd, timeout + Duration::from_secs(10))
    }

    /// Start the echo/download server inside `netns`, listening on `listen`; returns once
    /// it has bound every address.
    pub fn serve(&self, netns: &Netns, listen: &[SocketAddr]) -> Result<ProcessGuard> {
        let mut cmd = netns.command(&self.bin.display().to_string());
        cmd.arg("serve").arg("--listen");
        cmd.args(listen.iter().map(|a| a.to_string()));
        ProcessGuard::spawn_until_ready(
            &format!("probe server in netns {}", netns.name()),
            &mut cmd,
            Duration::from_secs(10),
        )
    }

    fn client(&self, subcommand: &str, target: SocketAddr, cgroup: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(subcommand).args(["--connect", &target.to_string()]);
        if let Some(cgroup) = cgroup {
            cmd.arg("--join-cgroup").arg(cgroup);
        }
        cmd
    }
}

/// Run a probe client and parse its one-line JSON report (present whether or not it
/// succeeded; the caller asserts on its fields).
fn run_json<T: DeserializeOwned>(cmd: &mut Command, timeout: Duration) -> Result<T> {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout)?;
    parse_report(
        &what,
        out.status,
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    )
}

fn parse_report<T: DeserializeOwned>(
    what: &str,
    status: ExitStatus,
    stdout: &str,
    stderr: &str,
) -> Result<T> {
    let Some(line) = stdout.lines().rev().find(|l| !l.trim().is_empty()) else {
        bail!(
            "{what} printed no report ({status}); stderr: {}",
            stderr.trim()
        );
    };
    serde_json::from_str(line).with_context(|| {
        format!(
            "{what}: unparseable report {line:?}; stderr: {}",
            stderr.trim()
        )
    })
}

/// An echo client running in the background; see [`Probe::echo_background`].
pub struct BackgroundEcho {
    what: String,
    process: ProcessGuard,
}

impl BackgroundEcho {
    /// Wait (bounded) for the client to finish and return its report.
    pub fn finish(mut self, timeout: Duration) -> Result<EchoReport> {
        let status = self
            .process
            .wait_timeout(timeout)?
            .with_context(|| format!("{} did not finish within {timeout:?}", self.what))?;
        // The report is one short line: it fits in the pipe, so the child never blocked.
        let mut stdout = String::new();
        if let Some(mut pipe) = self.process.child_mut().stdout.take() {
            pipe.read_to_string(&mut stdout)?;
        }
        parse_report(&self.what, status, &stdout, "")
    }
}

/// Connections held open in the background; see [`Probe::hold_background`].
pub struct BackgroundHold {
    what: String,
    process: ProcessGuard,
}

impl BackgroundHold {
    /// Wait (bounded) for the hold to end and return its report.
    pub fn finish(mut self, timeout: Duration) -> Result<crate::wire::HoldReport> {
        let status = self
            .process
            .wait_timeout(timeout)?
            .with_context(|| format!("{} did not finish within {timeout:?}", self.what))?;
        let mut stdout = String::new();
        if let Some(mut pipe) = self.process.child_mut().stdout.take() {
            pipe.read_to_string(&mut stdout)?;
        }
        parse_report(&self.what, status, &stdout, "")
    }
}
