//! containerd daemons and pull clients (ctr, curl) for the registry end-to-end tests.
//!
//! Each [`Containerd`] is its own daemon with config, root, state and socket under a temp
//! dir, so every one starts with an empty content store. containerd 1.6's `ctr images
//! pull` / `ctr content fetch` fetch in the ctr process itself, so [`Client`] runs ctr (or
//! curl) inside the hooked cgroup, with a private /etc/hosts that resolves the test
//! registry and an `SSL_CERT_FILE` bundle. No hosts.toml anywhere: interception is
//! transparent.
use std::{
    ffi::OsString,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    oci::Blob,
    process::{run_bounded, ProcessGuard},
    tail,
};

/// A containerd daemon with its own everything. Killed on drop.
pub struct Containerd {
    process: ProcessGuard,
    pub socket: PathBuf,
    pub root: PathBuf,
    log: PathBuf,
    _work: tempfile::TempDir,
}

impl Containerd {
    /// Start a daemon and wait (bounded) until it answers `ctr version`.
    pub fn start() -> Result<Self> {
        Self::start_with(None, "", None, None)
    }

    /// As [`Containerd::start`], reading its trust roots from `bundle` alone
    /// (`SSL_CERT_FILE`), as a node's containerd reads the host bundle: what `eddy doctor`
    /// and the trust gate judge.
    pub fn start_with_roots(bundle: &Path) -> Result<Self> {
        Self::start_with(None, "", None, Some(bundle))
    }

    /// As [`Containerd::start`], inside network namespace `netns` (a name under
    /// /run/netns): a node's own containerd.
    pub fn start_in(netns: &str) -> Result<Self> {
        Self::start_with(None, "", Some(netns), None)
    }

    /// Start a daemon with the CRI plugin, as `client` (in its cgroup, with its /etc/hosts
    /// and its `SSL_CERT_FILE`): pulls requested through CRI ([`crate::cri::pull_image`])
    /// then run in this daemon, with the trust roots it read when it started, as the
    /// kubelet's pulls do on a node. Its images land in namespace `k8s.io`.
    pub fn start_cri(client: &Client) -> Result<Self> {
        Self::start_with(Some(client), "", None, None)
    }

    /// As [`Containerd::start`], with content isolated per namespace: a pull into a new
    /// namespace downloads every blob again instead of reusing another namespace's copy
    /// (repeated pulls by one daemon, as in the soak).
    pub fn start_isolated() -> Result<Self> {
        Self::start_with(
            None,
            "\n[plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n",
            None,
            None,
        )
    }

    /// `extra`: appended to the config file. `netns`: run there (a CRI client brings its own).
    /// `roots`: the only trust bundle it reads (a CRI client brings its own).
    fn start_with(
        cri_client: Option<&Client>,
        extra: &str,
        netns: Option<&str>,
        roots: Option<&Path>,
    ) -> Result<Self> {
        let work = tempfile::Builder::new().prefix("eddy-ctd-").tempdir()?;
        let dir = work.path();
        let socket = dir.join("containerd.sock");
        let root = dir.join("root");
        let cri = if cri_client.is_some() {
            // Image pulls need no CNI; an empty CNI directory only logs a warning.
            format!(
                r#"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{cni}"
  conf_dir = "{cni}"
"#,
                cni = dir.join("cni").display()
            )
        } else {
            String::new()
        };
        let disabled_cri = if cri_client.is_some() {
            ""
        } else {
            "\n  \"io.containerd.grpc.v1.cri\","
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled_cri}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
{cri}"#,
            root = root.display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            opt = dir.join("opt").display(),
        ) + extra;
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config)?;
        let log = dir.join("containerd.log");
        let log_file = fs::File::create(&log)?;
        let mut command = match cri_client {
            Some(client) => {
                client.command(&["containerd".into(), "--config".into(), config_path.into()])
            }
            None => {
                let mut c = match netns {
                    Some(netns) => {
                        let mut c = Command::new("nsenter");
                        c.arg(format!("--net=/run/netns/{netns}")).arg("containerd");
                        c
                    }
                    None => Command::new("containerd"),
                };
                c.arg("--config").arg(&config_path);
                if let Some(bundle) = roots {
                    c.env("SSL_CERT_FILE", bundle).env_remove("SSL_CERT_DIR");
                }
                c
            }
        };
        let process = ProcessGuard::spawn(
            "containerd",
            command
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file),
        )?;
        let mut containerd = Self {
            process,
            socket,
            root,
            log,
            _work: work,
        };
        containerd.wait_ready(Duration::from_secs(20))?;
        Ok(containerd)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait()? {
                bail!(
                    "containerd exited ({status}) at start; log:\n{}",
                    self.log_tail()
                );
            }
            if self.socket.exists() {
                let out = run_bounded(
                    Command::new("ctr")
                        .arg("--address")
                        .arg(&self.socket)
                        .arg("version"),
                    Duration::from_secs(5),
                );
                if matches!(&out, Ok(o) if o.status.success()) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd not ready after {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), 20)
    }

    /// The daemon's pid (the client wrapper execs it, so it keeps the wrapper's pid).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The digest this daemon recorded for image `reference` in `namespace` (`ctr images ls`).
    pub fn image_digest(&self, namespace: &str, reference: &str) -> Result<String> {
        let text = self.ctr(namespace, &["images", "ls"], Duration::from_secs(20))?;
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
            .map(str::to_string)
            .with_context(|| format!("no image {reference} in `ctr images ls`:\n{text}"))
    }

    /// Run `ctr --address SOCK -n NS ARGS...` (outside any cgroup: it only talks to the
    /// daemon), bounded by `timeout`; error unless it succeeds. Returns its stdout.
    pub fn ctr(&self, namespace: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let argv = self.ctr_args(namespace, args);
        let out = run_bounded(Command::new(&argv[0]).args(&argv[1..]), timeout)?;
        ensure!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr --address SOCK -n NS` followed by `args`.
    pub fn ctr_args(&self, namespace: &str, args: &[&str]) -> Vec<OsString> {
        let mut argv: Vec<OsString> =
            vec!["ctr".into(), "--address".into(), self.socket.clone().into()];
        argv.extend(["-n", namespace].map(OsString::from));
        argv.extend(args.iter().map(OsString::from));
        argv
    }

    /// Bytes in the daemon's partial ingests (downloads in progress or interrupted).
    pub fn ingest_bytes(&self) -> u64 {
        let dir = self.root.join("io.containerd.content.v1.content/ingest");
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| fs::metadata(e.path().join("data")).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The digests (`sha256:...`) in namespace `ns`'s content store, via `ctr content ls -q`
    /// (run outside any cgroup: it only talks to the daemon).
    pub fn content_digests(&self, namespace: &str) -> Result<Vec<String>> {
        let text = self.ctr(namespace, &["content", "ls", "-q"], Duration::from_secs(20))?;
        Ok(text
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Error unless the content store in `namespace` holds every one of `blobs` (containerd
    /// verified each digest when it committed it).
    pub fn ensure_content(&self, namespace: &str, blobs: &[Blob]) -> Result<()> {
        let have = self.content_digests(namespace)?;
        for blob in blobs {
            ensure!(
                have.contains(&blob.digest),
                "containerd lacks {} ({}); it has {have:?}",
                blob.digest,
                blob.media_type
            );
        }
        Ok(())
    }
}

/// How a pull client runs: in which cgroup (the hooked one, or none for a direct baseline),
/// with which /etc/hosts and which CA bundle.
#[derive(Clone, Debug)]
pub struct Client {
    pub cgroup: Option<PathBuf>,
    pub hosts: PathBuf,
    pub ca_bundle: PathBuf,
    /// Run in this network namespace (a name under /run/netns), as a node's processes do.
    pub netns: Option<String>,
}

/// The outcome of one client run.
#[derive(Debug)]
pub struct Run {
    pub output: Output,
    pub elapsed: Duration,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.output.status.success()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Error unless the command succeeded.
    pub fn check(self, what: &str) -> Result<Self> {
        ensure!(
            self.ok(),
            "{what} failed ({}) after {:?}\nstdout: {}\nstderr: {}",
            self.output.status,
            self.elapsed,
            tail(&self.stdout(), 15),
            tail(&self.stderr(), 30)
        );
        Ok(self)
    }
}

/// Joins the cgroup (when given), then enters a private mount namespace whose /etc/hosts is
/// the test's, then execs the program: the same pid throughout, so the program itself is
/// in the cgroup.
const CLIENT_SCRIPT: &str = r#"set -e
if [ -n "$EDDY_T_CGROUP" ]; then echo $$ > "$EDDY_T_CGROUP/cgroup.procs"; fi
exec unshare --mount sh -c 'mount --bind "$EDDY_T_HOSTS" /etc/hosts && exec "$@"' client "$@"
"#;

impl Client {
    /// A hosts file at `path` mapping `names` to `ip` (and localhost).
    pub fn write_hosts(path: &Path, ip: Ipv4Addr, names: &[&str]) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for name in names {
            text.push_str(&format!("{ip} {name}\n"));
        }
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The command that runs `argv` as this client.
    pub fn command(&self, argv: &[OsString]) -> Command {
        let mut cmd = match &self.netns {
            // nsenter execs (no fork), so the shell keeps the pid that joins the cgroup.
            Some(netns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{netns}")).arg("sh");
                cmd
            }
            None => Command::new("sh"),
        };
        cmd.arg("-c")
            .arg(CLIENT_SCRIPT)
            .arg("client")
            .args(argv)
            .env("EDDY_T_HOSTS", &self.hosts)
            .env("SSL_CERT_FILE", &self.ca_bundle)
            // curl reads these rather than SSL_CERT_FILE in some builds.
            .env("CURL_CA_BUNDLE", &self.ca_bundle)
            .env_remove("SSL_CERT_DIR");
        match &self.cgroup {
            Some(cgroup) => cmd.env("EDDY_T_CGROUP", cgroup),
            None => cmd.env("EDDY_T_CGROUP", ""),
        };
        cmd
    }

    /// Run `argv` as this client, bounded by `timeout`.
    pub fn run(&self, argv: &[OsString], timeout: Duration) -> Result<Run> {
        let start = Instant::now();
        let output = run_bounded(&mut self.command(argv), timeout)?;
        Ok(Run {
            output,
            elapsed: start.elapsed(),
        })
    }

    /// Start `argv` as this client in the background (output to `log`).
    pub fn spawn(&self, argv: &[OsString], log: &Path) -> Result<ProcessGuard> {
        let file = fs::File::create(log)?;
        ProcessGuard::spawn(
            "client",
            self.command(argv)
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file),
        )
    }

    /// `ctr images pull` (unpacks for the host platform) of `reference` into `containerd`.
    pub fn pull(
        &self,
        containerd: &Containerd,
        namespace: &str,
        reference: &str,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<Run> {
        self.ctr_get(
            ["images", "pull"],
            containerd,
            namespace,
            reference,
            extra,
            timeout,
        )
    }

    /// `ctr content fetch` (no unpack) of `reference` into `containerd`.
    pub fn fetch(
        &self,
        containerd: &Containerd,
        namespace: &str,
        reference: &str,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<Run> {
        self.ctr_get(
            ["content", "fetch"],
            containerd,
            namespace,
            reference,
            extra,
            timeout,
        )
    }

    /// `ctr COMMAND... EXTRA... REFERENCE` against `containerd`, as this client.
    fn ctr_get(
        &self,
        command: [&str; 2],
        containerd: &Containerd,
        namespace: &str,
        reference: &str,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<Run> {
        let mut args = command.to_vec();
        args.extend_from_slice(extra);
        args.push(reference);
        self.run(&containerd.ctr_args(namespace, &args), timeout)
    }

    /// `curl` `url` with extra arguments, writing the body to `body` and the response
    /// headers to `headers`. curl's own exit status is in the returned run; the HTTP
    /// status is in the headers (see [`http_status`]).
    pub fn curl(
        &self,
        url: &str,
        extra: &[&str],
        body: &Path,
        headers: &Path,
        timeout: Duration,
    ) -> Result<Run> {
        let mut argv: Vec<OsString> = ["curl", "-sS", "--http1.1", "-o"]
            .map(OsString::from)
            .to_vec();
        argv.push(body.into());
        argv.push("-D".into());
        argv.push(headers.into());
        argv.extend(extra.iter().map(OsString::from));
        argv.push(url.into());
        self.run(&argv, timeout)
    }

    /// [`Client::curl`] with the body and the headers kept as `<name>.body` and
    /// `<name>.headers` in `dir`; also the HTTP status of the last response, if any.
    pub fn curl_status(
        &self,
        dir: &Path,
        name: &str,
        url: &str,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<(Run, Option<u16>)> {
        let body = dir.join(format!("{name}.body"));
        let headers = dir.join(format!("{name}.headers"));
        let run = self.curl(url, extra, &body, &headers, timeout)?;
        let status = http_status(&fs::read_to_string(&headers).unwrap_or_default());
        Ok((run, status))
    }
}

/// The status code of the last response in a curl `-D` header dump.
pub fn http_status(headers: &str) -> Option<u16> {
    headers
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
}

/// A header's value (case-insensitive name) from the last response in a curl `-D` dump.
pub fn header(headers: &str, name: &str) -> Option<String> {
    let last = headers.rsplit("HTTP/").next().unwrap_or(headers);
    last.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_last_response_headers() {
        let dump = "HTTP/1.1 307 Temporary Redirect\r\nLocation: x\r\n\r\n\
                    HTTP/1.1 206 Partial Content\r\ncontent-range: bytes 5-9/10\r\n\r\n";
        assert_eq!(http_status(dump), Some(206));
        assert_eq!(
            header(dump, "Content-Range").as_deref(),
            Some("bytes 5-9/10")
        );
        assert_eq!(header(dump, "Location"), None);
    }
}
