//! eddy is not an open relay: its proxy listener serves only connections the BPF hook
//! redirected (it looks up their original destination), and it and the admin endpoint bind
//! loopback by default. Privileged: real cgroup, BPF programs and network namespaces.
use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use eddy_tests::{require_privileges, Ctx, EddyConfig, Netns, World};

fn setup() -> Option<Ctx> {
    require_privileges().then(|| Ctx::new(env!("CARGO_BIN_EXE_eddy-probe")))
}

/// A ClientHello captured from containerd's ctr (Go crypto/tls), SNI ghcr.io.
const GO_CLIENT_HELLO: &[u8] = include_bytes!("../../fuzz/seeds/peek_route/ctr-go");

/// Send `payload` straight to `addr` and read what comes back: eddy must hang up without a
/// byte. Returns the bytes received (empty when it hung up).
fn send_direct(addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    // eddy may close before reading, which resets the connection under our write.
    let _ = stream.write_all(payload);
    let mut got = Vec::new();
    match stream.take(64 << 10).read_to_end(&mut got) {
        Ok(_) => Ok(got),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => Ok(got),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!(
                "eddy kept a direct connection from {addr} open for 5 s (got {} bytes)",
                got.len()
            )
        }
        Err(e) => Err(e).context("read"),
    }
}

#[test]
fn direct_connections_to_the_listener_are_never_proxied() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    let eddy = ctx.start_eddy(&EddyConfig::new(world.cgroup.path()))?;
    let upstream = world.netns.v4(eddy_tests::INTERCEPTED_PORT);
    let payloads: [(&str, Vec<u8>); 5] = [
        ("a registry ClientHello", GO_CLIENT_HELLO.to_vec()),
        (
            "a plain-HTTP registry request",
            format!("GET /v2/ HTTP/1.1\r\nHost: {upstream}\r\n\r\n").into_bytes(),
        ),
        (
            "an absolute-form proxy request",
            format!("GET http://{upstream}/v2/ HTTP/1.1\r\nHost: {upstream}\r\n\r\n").into_bytes(),
        ),
        (
            "a CONNECT",
            format!("CONNECT {upstream} HTTP/1.1\r\nHost: {upstream}\r\n\r\n").into_bytes(),
        ),
        (
            "bytes of another protocol",
            b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
        ),
    ];
    let mut tried = 0;
    for listener in [eddy.listen, eddy.listen_v6()] {
        for (what, payload) in &payloads {
            let got = send_direct(listener, payload)?;
            ensure!(
                got.is_empty(),
                "{what} sent straight to {listener} got an answer: {:?}",
                String::from_utf8_lossy(&got[..got.len().min(200)])
            );
            tried += 1;
        }
    }
    // A process in the hooked cgroup dialling the listener port itself: not an intercepted
    // port, so not redirected, so not served either.
    let report = ctx.probe.echo(
        eddy.listen,
        1024,
        Duration::from_secs(3),
        Some(world.cgroup.path()),
    )?;
    ensure!(
        !report.ok,
        "an echo through eddy's listener succeeded: {report:?}"
    );
    tried += 1;

    let no_orig = eddy.wait_metric_at_least(
        r#"eddy_connections_total{route="no_orig_dst"}"#,
        tried as f64,
        Duration::from_secs(5),
    )?;
    ensure!(
        no_orig >= tried as f64,
        "{no_orig} connections counted as not redirected, {tried} made"
    );
    for route in ["passthrough", "registry_tls", "registry_http"] {
        let n = eddy.metric(&format!(r#"eddy_connections_total{{route="{route}"}}"#))?;
        ensure!(n == 0.0, "{n} direct connections were routed as {route}");
    }
    Ok(())
}

#[test]
fn listener_and_admin_bind_loopback_by_default() -> Result<()> {
    let Some(ctx) = setup() else { return Ok(()) };
    let world = World::new(&ctx.probe)?;
    // eddy runs in a namespace of its own, so its default ports cannot collide with
    // anything on the host.
    let home = Netns::new()?;
    let mut config = EddyConfig::new(world.cgroup.path());
    config.default_addresses = true;
    config.wrapper = vec![
        "nsenter".into(),
        format!("--net=/run/netns/{}", home.name()),
    ];
    let eddy = eddy_tests::Eddy::spawn(&ctx.eddy_bin, &config)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", home.name()))
            .args([
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "2",
                "-w",
                "%{http_code}",
            ])
            .arg("http://127.0.0.1:15090/readyz")
            .output()?;
        if out.stdout == b"200" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "eddy's default admin endpoint 127.0.0.1:15090 not ready after 20 s; log:\n{}",
            eddy.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let listening = listening_sockets(eddy.pid())?;
    for expected in ["127.0.0.1:15090", "127.0.0.1:15443", "[::1]:15443"] {
        let expected: SocketAddr = expected.parse()?;
        ensure!(
            listening.contains(&expected),
            "eddy does not listen on {expected}: {listening:?}"
        );
    }
    let exposed: Vec<&SocketAddr> = listening.iter().filter(|a| !a.ip().is_loopback()).collect();
    ensure!(
        exposed.is_empty(),
        "eddy listens beyond loopback: {exposed:?}"
    );
    Ok(())
}

/// The TCP sockets `pid` holds in LISTEN state, from /proc (in the process's own netns).
fn listening_sockets(pid: u32) -> Result<Vec<SocketAddr>> {
    let mut inodes = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(link) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        if let Some(inode) = link
            .to_string_lossy()
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            inodes.push(inode.to_string());
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 9)
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                out.push(parse_proc_addr(f[1]).with_context(|| format!("bad /proc line {line}"))?);
            }
        }
    }
    Ok(out)
}

/// `0100007F:3B1A` (IPv4) or 32 hex digits `:PORT` (IPv6): addresses in host-order words.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [v4] => IpAddr::V4(Ipv4Addr::from(v4.to_le_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[test]
fn proc_addresses_parse() {
    assert_eq!(
        parse_proc_addr("0100007F:3AFA"),
        Some("127.0.0.1:15098".parse().unwrap())
    );
    assert_eq!(
        parse_proc_addr("00000000000000000000000001000000:3B0B"),
        Some("[::1]:15115".parse().unwrap())
    );
}
