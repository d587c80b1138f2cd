//! An "upstream host": a network namespace behind a veth pair, removed on drop.
//!
//! Host side 10.A.B.2/24 and fd00:edd:A:B::2/64, namespace side .1 and ::1. Addresses inside
//! a namespace the test made itself are the only non-loopback targets tests may use.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
};

use anyhow::{bail, Result};

use crate::process::run_ok;

pub struct Netns {
    name: String,
    host_if: String,
    pub host_v4: Ipv4Addr,
    pub ns_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
    pub ns_v6: Ipv6Addr,
}

impl Netns {
    pub fn new() -> Result<Self> {
        let n = crate::next_id();
        let suffix = format!("{}-{n}", std::process::id());
        // Interface names are at most 15 bytes: "eddy-" + pid (<= 7) + "-" + n.
        let name = format!("eddy-{suffix}");
        if name.len() > 15 {
            bail!("interface name {name} is longer than 15 bytes");
        }
        let (a, b) = free_subnet(n)?;
        let mut ns = Netns {
            host_if: name.clone(),
            name,
            host_v4: Ipv4Addr::new(10, a, b, 2),
            ns_v4: Ipv4Addr::new(10, a, b, 1),
            host_v6: Ipv6Addr::new(0xfd00, 0xedd, a.into(), b.into(), 0, 0, 0, 2),
            ns_v6: Ipv6Addr::new(0xfd00, 0xedd, a.into(), b.into(), 0, 0, 0, 1),
        };
        // From here on, Drop undoes whatever part of the setup succeeded.
        ns.setup().map(|()| ns)
    }

    fn setup(&mut self) -> Result<()> {
        let (name, host_if) = (&self.name, &self.host_if);
        ip(&["netns", "add", name])?;
        // The peer is created directly inside the namespace, so its name only has to be
        // unique there.
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.host_v4),
            "dev",
            host_if,
        ])?;
        // nodad: the address is usable at once instead of after duplicate detection.
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.host_v6),
            "dev",
            host_if,
            "nodad",
        ])?;
        ip(&["link", "set", host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", name, "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{}/24", self.ns_v4), "dev", "eth0"])?;
        inside(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.ns_v6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        inside(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's IPv4 address with `port`.
    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ns_v4), port)
    }

    /// The namespace's IPv6 address with `port`.
    pub fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ns_v6), port)
    }

    /// The namespace's IPv4 address in v4-mapped IPv6 form (`[::ffff:10.A.B.1]:port`).
    pub fn v4_mapped(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ns_v4.to_ipv6_mapped()), port)
    }

    /// Add another IPv4 address, `10.A.B.<host>`, to the namespace's side of the veth (a
    /// second "remote host" behind the same link); returns it.
    pub fn add_v4(&self, host: u8) -> Result<Ipv4Addr> {
        let [a, b, c, _] = self.ns_v4.octets();
        let addr = Ipv4Addr::new(a, b, c, host);
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        Ok(addr)
    }

    /// A command run inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys eth0 and with it the host side; delete the host
        // side explicitly too in case a process still holds the namespace open.
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing netns {}: {e:#}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args)).map(drop)
}

/// Pick 10.A.B.0/24 not already routed on this host, so the test never shadows a real
/// network (or another test's namespace).
fn free_subnet(n: u32) -> Result<(u8, u8)> {
    let out = run_ok(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?;
    let routes = String::from_utf8_lossy(&out.stdout).into_owned();
    let seed = std::process::id() as usize * 31 + n as usize * 7;
    for attempt in 0..200usize {
        let n = seed.wrapping_add(attempt * 97);
        // 10.200.0.0 - 10.239.255.0: away from the 10.0, 10.96 and 10.244 ranges that
        // Kubernetes clusters and container runtimes commonly use.
        let (a, b) = (200 + (n / 256 % 40) as u8, (n % 256) as u8);
        if !routes.contains(&format!("10.{a}.{b}.")) {
            return Ok((a, b));
        }
    }
    bail!("choosing a test subnet: every 10.200-239.x.0/24 tried is in use")
}
