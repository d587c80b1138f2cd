//! Network namespaces the tests create and remove: an "upstream host" behind a veth pair to
//! the host ([`Netns::new`]), and a [`Lan`]: a bridge in a namespace of its own with one
//! port per member namespace (the nodes of a cluster, their upstream) and one for the host.
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
    /// The far end of the namespace's `eth0`: on the host, or a port of a [`Lan`]'s bridge.
    host_if: String,
    /// The namespace `host_if` lives in: None for the host's own.
    outside: Option<String>,
    pub host_v4: Ipv4Addr,
    pub ns_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
    pub ns_v6: Ipv6Addr,
}

impl Netns {
    pub fn new() -> Result<Self> {
        let n = crate::basics::next_id();
        let suffix = format!("{}-{n}", std::process::id());
        // Interface names are at most 15 bytes: "eddy-" + pid (<= 7) + "-" + n.
        let name = format!("eddy-{suffix}");
        if name.len() > 15 {
            bail!("interface name {name} is longer than 15 bytes");
        }
        let (a, b) = free_subnet(n)?;
        let mut ns = Netns {
            host_if: name.clone(),
            outside: None,
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
        configure(None, host_if, self.host_v4, self.host_v6)?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        configure(Some(name), "eth0", self.ns_v4, self.ns_v6)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The far end of `eth0` and the namespace it is in (None: the host's): where the link's
    /// other direction is shaped.
    pub fn outside_if(&self) -> (&str, Option<&str>) {
        (&self.host_if, self.outside.as_deref())
    }

    /// `program` run where the far end of `eth0` is (the host, or the LAN's switch).
    pub fn outside_command(&self, program: &str) -> Command {
        match &self.outside {
            None => Command::new(program),
            Some(outside) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", outside, program]);
                cmd
            }
        }
    }

    /// `program` run inside the namespace with only the network namespace changed
    /// (`nsenter --net`): unlike `ip netns exec`, /sys keeps the host's cgroup and bpf
    /// mounts, which eddy and the cgroup-joining clients need. Same pid: nsenter execs.
    pub fn enter_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(self.enter_arg()).arg(program);
        cmd
    }

    /// nsenter's argument that enters this namespace.
    pub fn enter_arg(&self) -> String {
        format!("--net=/run/netns/{}", self.name)
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
        // Deleting the namespace destroys eth0 and with it the far end; delete the far end
        // explicitly too in case a process still holds the namespace open.
        let _ = match &self.outside {
            None => ip(&["link", "del", &self.host_if]),
            Some(outside) => ip(&["-n", outside, "link", "del", &self.host_if]),
        };
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing netns {}: {e:#}", self.name);
        }
    }
}

/// A LAN: a bridge `br0` in a namespace of its own (the switch), with a port for the host,
/// which is 10.A.B.254 and fd00:edd:A:B::fe on it (so the test reaches every member, as it
/// reaches an upstream host), and one port per member namespace ([`Lan::member`]).
/// Members are removed when their [`Netns`] drops, the switch when the `Lan` drops.
pub struct Lan {
    switch: String,
    host_if: String,
    subnet: (u8, u8),
    pub host_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
}

impl Lan {
    pub fn new() -> Result<Self> {
        let n = crate::basics::next_id();
        let name = format!("eddy-{}-{n}", std::process::id());
        if name.len() > 15 {
            bail!("interface name {name} is longer than 15 bytes");
        }
        let (a, b) = free_subnet(n)?;
        let mut lan = Lan {
            switch: name.clone(),
            host_if: name,
            subnet: (a, b),
            host_v4: Ipv4Addr::new(10, a, b, 254),
            host_v6: Ipv6Addr::new(0xfd00, 0xedd, a.into(), b.into(), 0, 0, 0, 0xfe),
        };
        // From here on, Drop undoes whatever part of the setup succeeded.
        lan.setup().map(|()| lan)
    }

    fn setup(&mut self) -> Result<()> {
        let (switch, host_if) = (self.switch.as_str(), self.host_if.as_str());
        ip(&["netns", "add", switch])?;
        ip(&["-n", switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", switch, "link", "set", "br0", "up"])?;
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "host", "netns", switch,
        ])?;
        ip(&["-n", switch, "link", "set", "host", "master", "br0", "up"])?;
        configure(None, host_if, self.host_v4, self.host_v6)
    }

    /// A new namespace on the LAN at 10.A.B.`host` (and fd00:edd:A:B::`host`), `host` in
    /// 1..=253. Its `eth0` is plugged into the bridge through port `pHOST`.
    pub fn member(&self, host: u8) -> Result<Netns> {
        if !(1..=253).contains(&host) {
            bail!("LAN member address .{host} is outside 1..=253");
        }
        let n = crate::basics::next_id();
        let name = format!("eddy-{}-{n}", std::process::id());
        if name.len() > 15 {
            bail!("namespace name {name} is longer than 15 bytes");
        }
        let (a, b) = self.subnet;
        let mut ns = Netns {
            host_if: format!("p{host}"),
            outside: Some(self.switch.clone()),
            name,
            host_v4: self.host_v4,
            ns_v4: Ipv4Addr::new(10, a, b, host),
            host_v6: self.host_v6,
            ns_v6: Ipv6Addr::new(0xfd00, 0xedd, a.into(), b.into(), 0, 0, 0, host.into()),
        };
        ns.plug(&self.switch).map(|()| ns)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.switch]) {
            eprintln!("warning: removing netns {}: {e:#}", self.switch);
        }
    }
}

impl Netns {
    /// Create the namespace and plug its `eth0` into `switch`'s bridge.
    fn plug(&mut self, switch: &str) -> Result<()> {
        let (name, port) = (self.name.as_str(), self.host_if.as_str());
        ip(&["netns", "add", name])?;
        ip(&[
            "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
            name,
        ])?;
        ip(&["-n", switch, "link", "set", port, "master", "br0", "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        configure(Some(name), "eth0", self.ns_v4, self.ns_v6)
    }
}

/// Give `dev` (in namespace `netns`, or the host's) a /24 and a /64 and bring it up. nodad:
/// the IPv6 address is usable at once instead of after duplicate detection.
fn configure(netns: Option<&str>, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    let (v4, v6) = (format!("{v4}/24"), format!("{v6}/64"));
    let commands: [&[&str]; 3] = [
        &["addr", "add", &v4, "dev", dev],
        &["-6", "addr", "add", &v6, "dev", dev, "nodad"],
        &["link", "set", dev, "up"],
    ];
    for args in commands {
        let mut full = Vec::new();
        if let Some(netns) = netns {
            full.extend(["-n", netns]);
        }
        full.extend_from_slice(args);
        ip(&full)?;
    }
    Ok(())
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

/// The kernel's neighbour (ARP and NDP) tables are shared by every network namespace, and
/// `gc_thresh3` (1024 by default) caps them all together: a LAN of N members that all talk
/// to each other needs about N² entries, so past ~30 members new entries are refused
/// ("neighbor table overflow") and members stop being reachable. Raised for as long as the
/// guard lives, then put back.
pub struct NeighbourLimits {
    saved: Vec<(String, String)>,
}

impl NeighbourLimits {
    /// Room for `members` namespaces on one LAN (and the host), with margin.
    pub fn raise_for(members: usize) -> Result<Self> {
        let wanted = ((members + 2) * (members + 2) * 2).max(1024);
        let mut saved = Vec::new();
        for family in ["ipv4", "ipv6"] {
            for (knob, value) in [
                ("gc_thresh3", wanted),
                ("gc_thresh2", wanted / 2),
                ("gc_thresh1", wanted / 8),
            ] {
                let path = format!("/proc/sys/net/{family}/neigh/default/{knob}");
                let old = std::fs::read_to_string(&path)?.trim().to_string();
                if old.parse::<usize>().unwrap_or(0) < value {
                    std::fs::write(&path, value.to_string())?;
                    saved.push((path, old));
                }
            }
        }
        Ok(NeighbourLimits { saved })
    }
}

impl Drop for NeighbourLimits {
    fn drop(&mut self) {
        for (path, old) in &self.saved {
            if let Err(e) = std::fs::write(path, old) {
                eprintln!("warning: restoring {path} to {old}: {e}");
            }
        }
    }
}
