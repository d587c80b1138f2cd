//! Types shared by eddy's eBPF programs (`agent-ebpf`) and its user-space agent.
//!
//! Every type here crosses the kernel/user boundary through a BPF map, so each one is
//! `#[repr(C)]` with explicit padding, has no `bool`, documents the byte order of every
//! field, and asserts its size at compile time. Map and program names are constants used
//! by both sides, so a rename cannot silently break the loader.
#![no_std]

use core::mem::size_of;

/// Where eddy pins its maps by default (`bpftool map dump pinned /sys/fs/bpf/eddy/<map>`).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/eddy";

/// Program names (the Rust function names in agent-ebpf, which become the ELF symbols).
pub mod program {
    pub const CONNECT4: &str = "eddy_connect4";
    pub const CONNECT6: &str = "eddy_connect6";
    pub const SOCK_OPS: &str = "eddy_sock_ops";
}

/// Map names (the statics in agent-ebpf). The kernel keeps 15 characters of a map name;
/// these all fit, so `bpftool map list` shows them whole.
pub mod map {
    /// `Array<Config, 1>`: written by the agent at startup.
    pub const CONFIG: &str = "EDDY_CONFIG";
    /// `Array<u64, 1>`: CLOCK_MONOTONIC nanoseconds of the agent's last heartbeat.
    pub const HEARTBEAT: &str = "EDDY_HEARTBEAT";
    /// `HashMap<u16, u32>`: destination ports to intercept (host byte order) → 1.
    pub const PORTS: &str = "EDDY_PORTS";
    /// `LruHashMap<u64, OrigDst>`: socket cookie → original destination, from connect4/6
    /// until sock_ops moves it into `ORIG_DST` at ACTIVE_ESTABLISHED.
    pub const SOCK_DST: &str = "EDDY_SOCK_DST";
    /// `LruHashMap<ConnKey, OrigDst>`: connection tuple → original destination, read by
    /// the proxy after accept().
    pub const ORIG_DST: &str = "EDDY_ORIG_DST";
    /// `PerCpuArray<u64, COUNTER_SLOTS>`: see [`crate::Counter`].
    pub const COUNTERS: &str = "EDDY_COUNTERS";

    /// The file name each map is pinned under, below the pin directory.
    pub const PINNED: [(&str, &str); 6] = [
        (CONFIG, "config"),
        (HEARTBEAT, "heartbeat"),
        (PORTS, "ports"),
        (SOCK_DST, "sock_dst"),
        (ORIG_DST, "orig_dst"),
        (COUNTERS, "counters"),
    ];
}

/// Capacity of the two original-destination maps. They are LRU maps, so entries the proxy
/// never collects (a client that gave up before accept) age out instead of filling up.
pub const ORIG_DST_CAPACITY: u32 = 65_536;
/// Capacity of the port set.
pub const PORTS_CAPACITY: u32 = 64;

/// `Config::flags` bit: the agent listens on `proxy_ip6` too, so native IPv6 connects may be
/// redirected. Without it, connect6 redirects only v4-mapped destinations.
pub const CONFIG_FLAG_IPV6: u32 = 1;

/// Static settings the agent writes once, before it attaches the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The proxy's IPv4 listen address, network byte order (as `bpf_sock_addr.user_ip4`).
    pub proxy_ip4: [u8; 4],
    /// The proxy's listen port, host byte order. 0 means "not configured": never redirect.
    pub proxy_port: u16,
    pub _pad0: u16,
    /// The proxy's IPv6 listen address, network byte order.
    pub proxy_ip6: [u8; 16],
    /// `CONFIG_FLAG_*` bits.
    pub flags: u32,
    /// SO_MARK the agent sets on its own upstream sockets: the loop guard.
    pub own_mark: u32,
    /// `SO_NETNS_COOKIE` of the agent's network namespace. A redirect to the proxy's
    /// loopback address only reaches the proxy from that namespace.
    pub netns_cookie: u64,
    /// A heartbeat older than this (ns) disables redirects: a hung agent is bypassed.
    pub heartbeat_timeout_ns: u64,
    /// Process id of the agent in its own pid namespace. Informational, for `eddy status`
    /// (which must then run in the same pid namespace to tell whether eddy is alive).
    pub agent_pid: u32,
    pub _pad1: u32,
    /// cgroup v2 id (inode number) of the cgroup the programs are attached to. Informational.
    pub attached_cgroup_id: u64,
}
const _: () = assert!(size_of::<Config>() == 64);

/// The destination a client asked for before connect4/6 rewrote it, and the process that
/// asked: the proxy's trust gate judges that process's trust roots before terminating TLS.
/// sock_ops copies the record as is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 address, or the v4-mapped form (`::ffff:a.b.c.d`) of an IPv4 one; network order.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// 4 if the client dialled an IPv4 address (AF_INET, or v4-mapped on AF_INET6), else 6.
    pub family: u8,
    pub _pad0: u8,
    /// Thread-group id (the process id as the initial pid namespace numbers it) of the
    /// process that called connect(), from `bpf_get_current_pid_tgid() >> 32`; host byte
    /// order. 0: unknown.
    pub tgid: u32,
    /// cgroup v2 id (inode number) of that process's cgroup, from
    /// `bpf_get_current_cgroup_id()`; host byte order. 0: unknown.
    pub cgroup_id: u64,
}
const _: () = assert!(size_of::<OrigDst>() == 32);

/// A redirected connection as both ends see it: the client's address and the proxy address
/// it was sent to. Unique per network namespace, and redirects only happen in the agent's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client (connecting side) address, IPv6 or v4-mapped, network order.
    pub client_addr: [u8; 16],
    /// Proxy (listening side) address, IPv6 or v4-mapped, network order.
    pub proxy_addr: [u8; 16],
    /// Client port, host byte order.
    pub client_port: u16,
    /// Proxy port, host byte order.
    pub proxy_port: u16,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConnKey>() == 40);

/// Slots of the per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect was redirected to the proxy.
    Redirected = 0,
    /// The agent's own socket (SO_MARK) connected to an intercepted port: left alone.
    SkippedLoop = 1,
    /// The heartbeat was stale (agent hung or stopping): the connect went direct.
    StaleHeartbeat = 2,
    /// The connect came from another network namespace, where the proxy's loopback
    /// address does not reach the agent: it went direct.
    SkippedNetns = 3,
    /// The original destination could not be recorded (map full / error): went direct.
    RecordFailed = 4,
    /// sock_ops moved an original destination into the tuple map.
    OrigDstPublished = 5,
}

pub const COUNTER_SLOTS: u32 = 6;

impl Counter {
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::Redirected,
        Counter::SkippedLoop,
        Counter::StaleHeartbeat,
        Counter::SkippedNetns,
        Counter::RecordFailed,
        Counter::OrigDstPublished,
    ];

    /// Stable snake_case name used by `eddy status` and the metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::SkippedLoop => "skipped_loop",
            Counter::StaleHeartbeat => "stale_heartbeat",
            Counter::SkippedNetns => "skipped_netns",
            Counter::RecordFailed => "record_failed",
            Counter::OrigDstPublished => "orig_dst_published",
        }
    }
}

/// The v4-mapped IPv6 form of an IPv4 address given as network-order bytes.
pub const fn v4_mapped(ip4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip4[0], ip4[1], ip4[2], ip4[3],
    ]
}

/// Whether a network-order IPv6 address is v4-mapped (`::ffff:a.b.c.d`).
pub const fn is_v4_mapped(ip6: &[u8; 16]) -> bool {
    ip6[0] == 0
        && ip6[1] == 0
        && ip6[2] == 0
        && ip6[3] == 0
        && ip6[4] == 0
        && ip6[5] == 0
        && ip6[6] == 0
        && ip6[7] == 0
        && ip6[8] == 0
        && ip6[9] == 0
        && ip6[10] == 0xff
        && ip6[11] == 0xff
}

#[cfg(feature = "user")]
// unsafe: aya reads these from BPF maps as plain bytes, which needs `unsafe impl Pod`.
#[allow(unsafe_code)]
mod user {
    // All of these are repr(C), Copy, contain only integers and explicit padding, so every
    // bit pattern is valid and there are no implicit padding bytes.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ConnKey {}
}
