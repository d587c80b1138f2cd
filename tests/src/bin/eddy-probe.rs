//! eddy-probe: the client and server the privileged tests and benchmarks drive.
//!
//! Every client subcommand prints exactly one JSON line (the `eddy_tests::wire` report types)
//! and exits 0 only if everything it measured succeeded. `--join-cgroup DIR` moves the probe
//! into a cgroup before it creates any socket, because eddy's hooks see a socket's cgroup
//! when the socket is created.
// unsafe: getrlimit/setrlimit, to hold thousands of sockets. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use eddy_tests::wire::{
    self, DownloadReport, EchoReport, HttpsGetReport, LatencyReport, ManyReport, Mode,
};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Upper bounds on what one invocation may do, so a typo cannot start an endless run.
const MAX_CONNS: u64 = 10_000;
const MAX_COUNT: u64 = 100_000;
const MAX_BYTES: u64 = 16 << 30;

/// Test client and server for eddy's end-to-end tests
#[derive(Parser)]
#[command(name = "eddy-probe")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo/download server (run it inside the upstream netns with `ip netns exec`).
    Serve {
        #[arg(long, num_args = 1.., required = true)]
        listen: Vec<SocketAddr>,
        /// Exit after this many seconds even if nobody stops the server.
        #[arg(long, default_value_t = 1800)]
        max_secs: u64,
    },
    /// Bearer-token server for distribution's `auth: token` (run it inside the upstream netns):
    /// HTTPS on `--listen`, ES256 JWTs. See eddy_tests::token_auth.
    TokenServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        tls_cert: PathBuf,
        #[arg(long)]
        tls_key: PathBuf,
        #[arg(long)]
        signing_cert_der: PathBuf,
        #[arg(long)]
        signing_key_der: PathBuf,
        /// Repositories anyone may pull.
        #[arg(long)]
        public: Vec<String>,
        /// Repositories only `--user`s may pull.
        #[arg(long)]
        private: Vec<String>,
        /// `user:password`, repeatable.
        #[arg(long)]
        user: Vec<String>,
        /// One JSON line per request.
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value_t = 1800)]
        max_secs: u64,
    },
    /// One checksummed echo round trip.
    Echo {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Wait this long between connect() and sending: a connection that is open across
        /// some event (eddy's SIGTERM drain) and must still work after it.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long)]
        join_cgroup: Option<PathBuf>,
    },
    /// Many concurrent checksummed echoes.
    Many {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: u64,
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
        /// Bound on the whole run.
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
        #[arg(long)]
        join_cgroup: Option<PathBuf>,
    },
    /// Hold `conns` connections open for `hold_ms`, each sending `--send` (a file's bytes)
    /// after connecting, at once or one byte every `--trickle-ms`: idle clients and slowloris.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 100)]
        conns: u64,
        #[arg(long, default_value_t = 5_000)]
        hold_ms: u64,
        /// Bytes to send on each connection (none: stay silent).
        #[arg(long)]
        send: Option<PathBuf>,
        /// Send one byte per this many ms instead of all at once (0: at once).
        #[arg(long, default_value_t = 0)]
        trickle_ms: u64,
        #[arg(long)]
        join_cgroup: Option<PathBuf>,
    },
    /// Sequential connect() timings (connect, then close).
    ConnectLatency {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Bound on each connect().
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Pause between samples, so that a slow acceptor is measured at a rate it can
        /// keep up with (back-to-back connects overflow its accept queue instead).
        #[arg(long, default_value_t = 0)]
        pause_us: u64,
        #[arg(long)]
        join_cgroup: Option<PathBuf>,
    },
    /// Download `bytes` from the server and report the throughput.
    Download {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
        #[arg(long)]
        join_cgroup: Option<PathBuf>,
    },
    /// One HTTPS GET (rustls, ring): the body is read in large chunks and discarded, and the
    /// throughput and this process's CPU time are reported.
    HttpsGet {
        /// The address dialled (eddy's hook redirects it when the probe is in the cgroup).
        #[arg(long)]
        connect: SocketAddr,
        /// TLS server name, also sent as the Host header.
        #[arg(long)]
        sni: String,
        #[arg(long)]
        path: String,
        /// PEM bundle: the only roots trusted.
        #[arg(long)]
        cacert: PathBuf,
        /// Offer only h2 in ALPN and speak HTTP/2 (hyper); default HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// Hash the body and compare it with the `sha256:` digest in the path (slower).
        #[arg(long)]
        sha256: bool,
        /// Offer only these cipher suites, in this order (rustls names, e.g.
        /// TLS13_AES_128_GCM_SHA256); default: ring's order, which prefers AES-256-GCM.
        #[arg(long, value_delimiter = ',')]
        cipher_suites: Vec<String>,
        /// Bound on the whole request.
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
        #[arg(long)]
        join_cgroup: Option<PathBuf>,
    },
}

// One arm per subcommand, each a call with its flags: a dispatch table, long but flat.
#[allow(clippy::too_many_lines)]
fn main() {
    raise_nofile_limit();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve { listen, max_secs } => serve(listen, Duration::from_secs(max_secs)),
        Cmd::TokenServer {
            listen,
            tls_cert,
            tls_key,
            signing_cert_der,
            signing_key_der,
            public,
            private,
            user,
            log,
            max_secs,
        } => (|| {
            check_at_most("--max-secs", max_secs, 7200)?;
            let users = user
                .iter()
                .map(|u| {
                    u.split_once(':')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .with_context(|| format!("--user {u:?} is not user:password"))
                })
                .collect::<Result<Vec<_>>>()?;
            eddy_tests::token_auth::serve(eddy_tests::token_auth::ServeConfig {
                listen,
                tls_cert,
                tls_key,
                signing_cert_der,
                signing_key_der,
                grants: eddy_tests::token_auth::Grants {
                    public,
                    private,
                    users,
                },
                log,
                max: Duration::from_secs(max_secs),
            })?;
            Ok(true)
        })(),
        Cmd::Echo {
            connect,
            bytes,
            timeout_ms,
            delay_ms,
            join_cgroup,
        } => join(join_cgroup.as_deref()).and_then(|()| {
            check_at_most("--bytes", bytes, MAX_BYTES)?;
            check_at_most("--delay-ms", delay_ms, 60_000)?;
            let report = echo(
                connect,
                bytes,
                Duration::from_millis(timeout_ms),
                Duration::from_millis(delay_ms),
            );
            print_json(&report, report.ok)
        }),
        Cmd::Many {
            connect,
            conns,
            bytes,
            timeout_ms,
            join_cgroup,
        } => join(join_cgroup.as_deref()).and_then(|()| {
            check_at_most("--conns", conns, MAX_CONNS)?;
            check_at_most("--bytes", bytes, MAX_BYTES / MAX_CONNS)?;
            let report = many(connect, conns, bytes, Duration::from_millis(timeout_ms))?;
            print_json(&report, report.ok == conns)
        }),
        Cmd::Hold {
            connect,
            conns,
            hold_ms,
            send,
            trickle_ms,
            join_cgroup,
        } => join(join_cgroup.as_deref()).and_then(|()| {
            check_at_most("--conns", conns, MAX_CONNS)?;
            check_at_most("--hold-ms", hold_ms, 600_000)?;
            let payload = match send {
                Some(path) => {
                    std::fs::read(&path).with_context(|| format!("{}", path.display()))?
                }
                None => Vec::new(),
            };
            let report = hold(
                connect,
                conns,
                Duration::from_millis(hold_ms),
                payload,
                Duration::from_millis(trickle_ms),
            )?;
            print_json(&report, report.failed_connect == 0)
        }),
        Cmd::ConnectLatency {
            connect,
            count,
            timeout_ms,
            pause_us,
            join_cgroup,
        } => join(join_cgroup.as_deref()).and_then(|()| {
            check_at_most("--count", count, MAX_COUNT)?;
            check_at_most("--pause-us", pause_us, 1_000_000)?;
            let report = connect_latency(
                connect,
                count,
                Duration::from_millis(timeout_ms),
                Duration::from_micros(pause_us),
            );
            print_json(&report, report.failed == 0)
        }),
        Cmd::Download {
            connect,
            bytes,
            timeout_ms,
            join_cgroup,
        } => join(join_cgroup.as_deref()).and_then(|()| {
            check_at_most("--bytes", bytes, MAX_BYTES)?;
            let report = download(connect, bytes, Duration::from_millis(timeout_ms));
            print_json(&report, report.ok)
        }),
        Cmd::HttpsGet {
            connect,
            sni,
            path,
            cacert,
            http2,
            sha256,
            cipher_suites,
            timeout_ms,
            join_cgroup,
        } => join(join_cgroup.as_deref()).and_then(|()| {
            let request = HttpsGet {
                target: connect,
                sni,
                path,
                cacert,
                http2,
                sha256,
                cipher_suites,
                timeout: Duration::from_millis(timeout_ms),
            };
            let report = https_get(&request);
            print_json(&report, report.ok)
        }),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("eddy-probe: {e:#}");
            std::process::exit(2);
        }
    }
}

fn check_at_most(flag: &str, value: u64, max: u64) -> Result<()> {
    if value > max {
        bail!("{flag} {value} is above the limit of {max}");
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(report: &T, ok: bool) -> Result<bool> {
    println!("{}", serde_json::to_string(report)?);
    Ok(ok)
}

/// Thousand-connection runs need more descriptors than the usual soft limit of 1024.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Move this process into a cgroup. Must happen before any socket exists.
fn join(cgroup: Option<&Path>) -> Result<()> {
    if let Some(dir) = cgroup {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining cgroup: write {}", procs.display()))?;
    }
    Ok(())
}

fn random_payload(len: u64) -> Vec<u8> {
    let mut payload = vec![0u8; len as usize];
    rand::thread_rng().fill(&mut payload[..]);
    payload
}

// ---------------------------------------------------------------------------------------
// Server

fn serve(listen: Vec<SocketAddr>, max: Duration) -> Result<bool> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let mut listeners = Vec::new();
        for addr in &listen {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(*addr).with_context(|| format!("bind {addr}"))?;
            // A deep backlog: the many-connection test opens 1000 at once.
            listeners.push(socket.listen(4096)?);
            println!("listening {addr}");
        }
        // The harness waits for this line before it starts clients.
        println!("ready");
        io::stdout().flush()?;

        let accept_all = async {
            let mut tasks = tokio::task::JoinSet::new();
            for listener in listeners {
                tasks.spawn(accept_loop(listener));
            }
            while tasks.join_next().await.is_some() {}
        };
        // Bounded lifetime: a leaked server goes away by itself.
        let _ = tokio::time::timeout(max, accept_all).await;
        Ok(true)
    })
}

async fn accept_loop(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    // Bounded per connection; errors are the client's business (it reports).
                    let _ = tokio::time::timeout(Duration::from_secs(600), handle(stream)).await;
                });
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn handle(mut stream: tokio::net::TcpStream) -> io::Result<()> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let mut header = [0u8; wire::HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let (mode, len) = wire::decode_header(&header)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad header"))?;
    stream
        .write_all(wire::server_line(local, peer).as_bytes())
        .await?;
    let (mut reader, mut writer) = stream.split();
    match mode {
        Mode::Echo => {
            let copied = tokio::io::copy(&mut (&mut reader).take(len), &mut writer).await?;
            if copied != len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Mode::Download => {
            let chunk = vec![0x5a_u8; 256 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                writer.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
        }
    }
    writer.shutdown().await
}

// ---------------------------------------------------------------------------------------
// Blocking clients (one connection at a time: precise timings, simple code)

fn echo(target: SocketAddr, bytes: u64, timeout: Duration, delay: Duration) -> EchoReport {
    let mut report = EchoReport {
        target: Some(target),
        bytes,
        ..Default::default()
    };
    match echo_inner(&mut report, target, bytes, timeout, delay) {
        Ok(()) => report.ok = report.sha256_match,
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    report
}

fn echo_inner(
    r: &mut EchoReport,
    target: SocketAddr,
    bytes: u64,
    timeout: Duration,
    delay: Duration,
) -> Result<()> {
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&target, timeout).context("connect")?;
    r.connect_us = start.elapsed().as_micros() as u64;
    r.peer = stream.peer_addr().ok();
    r.local = stream.local_addr().ok();
    // Per-call timeouts: every blocking read or write below waits at most `timeout`.
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    thread::sleep(delay);

    let payload = random_payload(bytes);
    let expected = Sha256::digest(&payload);
    // Write on another thread while reading here, so large payloads cannot deadlock on
    // full socket buffers.
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&wire::encode_header(Mode::Echo, bytes))?;
        writer.write_all(&payload)
    });
    let mut reader = BufReader::new(&stream);
    let (server_local, server_peer) = read_server_line(&mut reader)?;
    r.server_local = Some(server_local);
    r.server_peer = Some(server_peer);
    let mut hasher = Sha256::new();
    let got = io::copy(&mut (&mut reader).take(bytes), &mut hasher).context("reading echo")?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
        .context("sending payload")?;
    if got != bytes {
        bail!("short echo: {got} of {bytes} bytes");
    }
    r.sha256_match = hasher.finalize() == expected;
    Ok(())
}

fn read_server_line(reader: &mut impl BufRead) -> Result<(SocketAddr, SocketAddr)> {
    let mut line = Vec::new();
    reader
        .take(wire::MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .context("reading the server line")?;
    let text = String::from_utf8_lossy(&line);
    wire::parse_server_line(text.trim_end())
        .with_context(|| format!("unexpected server line {text:?}"))
}

fn connect_latency(
    target: SocketAddr,
    count: u64,
    timeout: Duration,
    pause: Duration,
) -> LatencyReport {
    let mut report = LatencyReport {
        count,
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let start = Instant::now();
        match TcpStream::connect_timeout(&target, timeout) {
            Ok(stream) => {
                samples.push(start.elapsed().as_micros() as u64);
                report.peer = stream.peer_addr().ok();
            }
            Err(e) => {
                report.failed += 1;
                let msg = e.to_string();
                if report.errors.len() < 5 && !report.errors.contains(&msg) {
                    report.errors.push(msg);
                }
            }
        }
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    report.ok = samples.len() as u64;
    samples.sort_unstable();
    if let (Some(&min), Some(&max)) = (samples.first(), samples.last()) {
        report.min_us = min;
        report.max_us = max;
        report.median_us = samples[samples.len() / 2];
        report.p90_us = samples[(samples.len() * 9 / 10).min(samples.len() - 1)];
    }
    report
}

fn download(target: SocketAddr, bytes: u64, timeout: Duration) -> DownloadReport {
    let mut report = DownloadReport {
        bytes,
        ..Default::default()
    };
    let start = Instant::now();
    let result = (|| -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&target, timeout).context("connect")?;
        report.peer = stream.peer_addr().ok();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&wire::encode_header(Mode::Download, bytes))?;
        let mut reader = BufReader::with_capacity(256 * 1024, &stream);
        read_server_line(&mut reader)?;
        let got = io::copy(&mut (&mut reader).take(bytes), &mut io::sink())?;
        if got != bytes {
            bail!("short download: {got} of {bytes} bytes");
        }
        Ok(())
    })();
    report.elapsed_us = start.elapsed().as_micros() as u64;
    match result {
        Ok(()) => {
            report.ok = true;
            report.mib_per_s =
                bytes as f64 / (1 << 20) as f64 / (report.elapsed_us.max(1) as f64 / 1e6);
        }
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    report
}

// ---------------------------------------------------------------------------------------
// Concurrent client

fn many(target: SocketAddr, conns: u64, bytes: u64, timeout: Duration) -> Result<ManyReport> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            tasks.spawn(tokio::time::timeout_at(deadline, one_echo(target, bytes)));
        }
        let mut report = ManyReport {
            conns,
            ..Default::default()
        };
        let mut peers = BTreeMap::new();
        while let Some(joined) = tasks.join_next().await {
            let outcome = match joined {
                Ok(Ok(result)) => result,
                Ok(Err(_elapsed)) => Err(anyhow::anyhow!("timed out after {timeout:?}")),
                Err(e) => Err(anyhow::anyhow!("task failed: {e}")),
            };
            match outcome {
                Ok((peer, matched)) => {
                    *peers.entry(peer.to_string()).or_insert(0) += 1;
                    if matched {
                        report.ok += 1;
                    } else {
                        report.mismatched += 1;
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    let msg = format!("{e:#}");
                    if report.errors.len() < 5 && !report.errors.contains(&msg) {
                        report.errors.push(msg);
                    }
                }
            }
        }
        report.peers = peers;
        report.elapsed_ms = start.elapsed().as_millis() as u64;
        Ok(report)
    })
}

fn hold(
    target: SocketAddr,
    conns: u64,
    hold: Duration,
    payload: Vec<u8>,
    trickle: Duration,
) -> Result<wire::HoldReport> {
    raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let deadline = tokio::time::Instant::now() + hold;
        let payload = std::sync::Arc::new(payload);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let payload = std::sync::Arc::clone(&payload);
            tasks.spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(target).await?;
                let mut sent = 0;
                let mut buf = [0u8; 4096];
                // Ok(true): still open at the deadline; Ok(false): the peer closed it.
                loop {
                    if sent < payload.len() {
                        let n = if trickle.is_zero() {
                            payload.len() - sent
                        } else {
                            1
                        };
                        if stream.write_all(&payload[sent..sent + n]).await.is_err() {
                            return Ok::<bool, io::Error>(false);
                        }
                        sent += n;
                    }
                    let wake = if trickle.is_zero() || sent >= payload.len() {
                        deadline
                    } else {
                        (tokio::time::Instant::now() + trickle).min(deadline)
                    };
                    match tokio::time::timeout_at(wake, stream.read(&mut buf)).await {
                        Err(_) if tokio::time::Instant::now() >= deadline => return Ok(true),
                        Err(_) => {}
                        Ok(Ok(0)) | Ok(Err(_)) => return Ok(false),
                        // The server answered (an error page, a handshake): keep holding.
                        Ok(Ok(_)) => {}
                    }
                }
            });
        }
        let mut report = wire::HoldReport {
            conns,
            ..Default::default()
        };
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(true)) => report.open_at_end += 1,
                Ok(Ok(false)) => report.closed_by_peer += 1,
                Ok(Err(e)) => {
                    report.failed_connect += 1;
                    if report.errors.len() < 5 {
                        report.errors.push(e.to_string());
                    }
                }
                Err(e) => bail!("hold task failed: {e}"),
            }
        }
        Ok(report)
    })
}

/// Thousands of held sockets need more than the usual soft limit of 1024 descriptors.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// One echo; returns getpeername() and whether the echoed bytes matched.
async fn one_echo(target: SocketAddr, bytes: u64) -> Result<(SocketAddr, bool)> {
    let stream = tokio::net::TcpStream::connect(target)
        .await
        .context("connect")?;
    let peer = stream.peer_addr()?;
    let payload = random_payload(bytes);
    let expected = Sha256::digest(&payload);
    let (reader, mut writer) = stream.into_split();
    let send = async {
        writer
            .write_all(&wire::encode_header(Mode::Echo, bytes))
            .await?;
        writer.write_all(&payload).await
    };
    let receive = async {
        let mut reader = tokio::io::BufReader::new(reader);
        let mut line = Vec::new();
        (&mut reader)
            .take(wire::MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        let text = String::from_utf8_lossy(&line);
        wire::parse_server_line(text.trim_end())
            .with_context(|| format!("unexpected server line {text:?}"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < bytes {
            let want = (bytes - got).min(buf.len() as u64) as usize;
            let n = reader.read(&mut buf[..want]).await?;
            if n == 0 {
                bail!("short echo: {got} of {bytes} bytes");
            }
            hasher.update(&buf[..n]);
            got += n as u64;
        }
        Ok(hasher.finalize() == expected)
    };
    let (sent, matched) = tokio::join!(send, receive);
    sent.context("sending payload")?;
    Ok((peer, matched?))
}

// ---------------------------------------------------------------------------------------
// HTTPS client: how fast eddy serves one blob, measured with a client leaner than curl.
//
// HTTP/1.1 is blocking rustls over a std socket. rustls reads its socket 4 KiB at a time,
// so the socket sits behind a 1 MiB BufReader: one recv() per MiB instead of 256. HTTP/2 is
// hyper's client connection over tokio-rustls on a current-thread runtime, with the same
// large-read buffer under the TLS layer.

/// Socket reads go through this buffer; the body is read into a buffer of the same size.
const BIG_READ: usize = 1 << 20;
/// A response header larger than this is an error.
const MAX_HEADER: usize = 64 * 1024;

struct HttpsGet {
    target: SocketAddr,
    sni: String,
    path: String,
    cacert: PathBuf,
    http2: bool,
    sha256: bool,
    cipher_suites: Vec<String>,
    timeout: Duration,
}

/// What one GET produced, besides the report's connection fields.
struct Body {
    status: u16,
    content_length: Option<u64>,
    bytes: u64,
    chunks: u64,
    /// When the response header was complete, and when the last body byte arrived.
    header_at: Instant,
    done_at: Instant,
    digest: Option<Vec<u8>>,
}

fn https_get(req: &HttpsGet) -> HttpsGetReport {
    let mut report = HttpsGetReport::default();
    let cpu_before = self_cpu_seconds();
    let start = Instant::now();
    let result = tls_config(req).and_then(|config| {
        if req.http2 {
            h2_get(req, config, &mut report)
        } else {
            h1_get(req, config, &mut report)
        }
    });
    let elapsed = start.elapsed();
    let cpu_after = self_cpu_seconds();
    report.elapsed_us = elapsed.as_micros() as u64;
    report.transfer_cpu_s = cpu_after - cpu_before;
    match result.and_then(|body| check_body(req, body, &mut report)) {
        Ok(()) => report.ok = true,
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    report.cpu_s = self_cpu_seconds();
    report
}

fn check_body(req: &HttpsGet, body: Body, r: &mut HttpsGetReport) -> Result<()> {
    r.status = body.status;
    r.content_length = body.content_length;
    r.bytes = body.bytes;
    r.chunks = body.chunks;
    r.body_us = (body.done_at - body.header_at).as_micros() as u64;
    r.gb_per_s = body.bytes as f64 / 1e3 / r.elapsed_us.max(1) as f64;
    if let Some(digest) = body.digest {
        let expected = req
            .path
            .rsplit_once("sha256:")
            .map(|(_, hex)| hex.to_ascii_lowercase())
            .context("--sha256: the path has no sha256: digest")?;
        r.sha256_match = Some(hex::encode(digest) == expected);
    }
    ensure!(body.status == 200, "HTTP {}", body.status);
    if let Some(len) = body.content_length {
        ensure!(
            body.bytes == len,
            "short body: {} of {len} bytes",
            body.bytes
        );
    }
    ensure!(r.sha256_match != Some(false), "the body's sha256 differs");
    Ok(())
}

fn tls_config(req: &HttpsGet) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem =
        std::fs::read(&req.cacert).with_context(|| format!("reading {}", req.cacert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.with_context(|| format!("bad PEM in {}", req.cacert.display()))?)
            .context("adding a root")?;
    }
    ensure!(
        !roots.is_empty(),
        "no certificate in {}",
        req.cacert.display()
    );
    let mut provider = rustls::crypto::ring::default_provider();
    if !req.cipher_suites.is_empty() {
        let all = std::mem::take(&mut provider.cipher_suites);
        for name in &req.cipher_suites {
            let suite = all
                .iter()
                .find(|s| format!("{:?}", s.suite()).eq_ignore_ascii_case(name))
                .with_context(|| {
                    let known: Vec<String> =
                        all.iter().map(|s| format!("{:?}", s.suite())).collect();
                    format!(
                        "unknown cipher suite {name:?} (known: {})",
                        known.join(", ")
                    )
                })?;
            provider.cipher_suites.push(*suite);
        }
    }
    let provider = std::sync::Arc::new(provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if req.http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(std::sync::Arc::new(config))
}

fn server_name(req: &HttpsGet) -> Result<rustls::pki_types::ServerName<'static>> {
    rustls::pki_types::ServerName::try_from(req.sni.clone())
        .with_context(|| format!("bad --sni {:?}", req.sni))
}

fn note_session(r: &mut HttpsGetReport, conn: &rustls::CommonState) {
    r.alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    r.cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()));
}

/// A socket whose reads are served from a large buffer (writes go straight through).
struct BigReads(BufReader<TcpStream>);

impl Read for BigReads {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for BigReads {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

fn h1_get(
    req: &HttpsGet,
    config: std::sync::Arc<rustls::ClientConfig>,
    r: &mut HttpsGetReport,
) -> Result<Body> {
    let deadline = Instant::now() + req.timeout;
    let socket = TcpStream::connect_timeout(&req.target, req.timeout).context("connect")?;
    r.peer = socket.peer_addr().ok();
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(req.timeout))?;
    socket.set_write_timeout(Some(req.timeout))?;
    let conn = rustls::ClientConnection::new(config, server_name(req)?)?;
    let mut tls =
        rustls::StreamOwned::new(conn, BigReads(BufReader::with_capacity(BIG_READ, socket)));
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: eddy-probe\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        req.path, req.sni
    );
    tls.write_all(request.as_bytes())
        .context("TLS handshake or request")?;
    tls.flush()?;
    note_session(r, &tls.conn);

    // The header, and whatever part of the body came with it.
    let mut buf = vec![0u8; BIG_READ];
    let mut head = Vec::new();
    let end = loop {
        let n = tls.read(&mut buf).context("reading the response header")?;
        ensure!(n > 0, "connection closed before the response header ended");
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        ensure!(
            head.len() <= MAX_HEADER,
            "response header over {MAX_HEADER} bytes"
        );
    };
    let header_at = Instant::now();
    let (status, content_length) = parse_h1_head(&head[..end])?;
    let mut hasher = req.sha256.then(Sha256::new);
    let early = &head[end..];
    let mut bytes = early.len() as u64;
    let mut chunks = u64::from(bytes > 0);
    if let Some(h) = hasher.as_mut() {
        h.update(early);
    }
    let want = content_length.unwrap_or(u64::MAX);
    while bytes < want {
        let room = (want - bytes).min(buf.len() as u64) as usize;
        let n = match tls.read(&mut buf[..room]) {
            Ok(n) => n,
            // No Content-Length: the body ends when the connection does.
            Err(e) if content_length.is_none() && e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e).context("reading the body"),
        };
        if n == 0 {
            break;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        bytes += n as u64;
        chunks += 1;
        ensure!(
            Instant::now() < deadline,
            "timed out after {:?}",
            req.timeout
        );
    }
    Ok(Body {
        status,
        content_length,
        bytes,
        chunks,
        header_at,
        done_at: Instant::now(),
        digest: hasher.map(|h| h.finalize().to_vec()),
    })
}

/// Status and Content-Length of an HTTP/1.1 response header (chunked bodies are refused).
fn parse_h1_head(head: &[u8]) -> Result<(u16, Option<u64>)> {
    let text = std::str::from_utf8(head).context("response header is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().context("bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            bail!("Transfer-Encoding {value:?} is not supported");
        }
    }
    Ok((status, content_length))
}

fn h2_get(
    req: &HttpsGet,
    config: std::sync::Arc<rustls::ClientConfig>,
    r: &mut HttpsGetReport,
) -> Result<Body> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::time::timeout(req.timeout, h2_get_inner(req, config, r))
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {:?}", req.timeout))?
    })
}

async fn h2_get_inner(
    req: &HttpsGet,
    config: std::sync::Arc<rustls::ClientConfig>,
    r: &mut HttpsGetReport,
) -> Result<Body> {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let socket = tokio::net::TcpStream::connect(req.target)
        .await
        .context("connect")?;
    r.peer = socket.peer_addr().ok();
    socket.set_nodelay(true)?;
    let socket = tokio::io::BufReader::with_capacity(BIG_READ, socket);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name(req)?, socket)
        .await
        .context("TLS handshake")?;
    note_session(r, tls.get_ref().1);
    ensure!(
        r.alpn.as_deref() == Some("h2"),
        "the server did not agree to h2 (ALPN {:?})",
        r.alpn
    );
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .handshake(TokioIo::new(tls))
        .await
        .context("HTTP/2 handshake")?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(format!("https://{}{}", req.sni, req.path))
        .header("user-agent", "eddy-probe")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("sending the request")?;
    let header_at = Instant::now();
    let status = response.status().as_u16();
    let content_length = response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .map(|v| -> Result<u64> { Ok(v.to_str()?.parse()?) })
        .transpose()
        .context("bad content-length")?;
    let mut body = response.into_body();
    let mut hasher = req.sha256.then(Sha256::new);
    let (mut bytes, mut chunks) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the body")?;
        if let Some(data) = frame.data_ref() {
            if let Some(h) = hasher.as_mut() {
                h.update(data);
            }
            bytes += data.len() as u64;
            chunks += 1;
        }
    }
    drop(sender);
    driver.abort();
    Ok(Body {
        status,
        content_length,
        bytes,
        chunks,
        header_at,
        done_at: Instant::now(),
        digest: hasher.map(|h| h.finalize().to_vec()),
    })
}

/// User + system CPU seconds of this process so far.
fn self_cpu_seconds() -> f64 {
    eddy_tests::process::rusage_cpu_seconds(libc::RUSAGE_SELF)
}
