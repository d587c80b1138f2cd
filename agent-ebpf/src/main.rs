//! eddy's kernel side.
//!
//! - `eddy_connect4` / `eddy_connect6` (cgroup/connect4|6) rewrite a TCP connect to an
//!   intercepted port so that it lands on eddy's proxy listener, and remember the original
//!   destination and the calling process (tgid, cgroup id) under the socket cookie.
//! - `eddy_sock_ops` (sock_ops, ACTIVE_ESTABLISHED) moves that record to a map keyed by the
//!   connection tuple, which is what the proxy can see after accept(): the accepted socket
//!   has a different cookie than the client's.
//!
//! Fail-open is the rule everywhere: every path returns 1 (proceed). A connect that cannot
//! be redirected safely (stale heartbeat, other netns, eddy's own socket, map error) goes
//! to its original destination untouched.
//!
//! Every decision is logged at debug level with aya-log (`eddy run --bpf-log`). The agent
//! sets aya-log's `AYA_LOG_LEVEL` global at load time: it lives in read-only data, so with
//! logs off (level 0) the verifier sees the log branches are dead and drops them. What is
//! left is one load and compare of that constant per log site.
#![no_std]
#![no_main]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use eddy_common::{
    is_v4_mapped, v4_mapped, Config, ConnKey, Counter, OrigDst, CONFIG_FLAG_IPV6, COUNTER_SLOTS,
    ORIG_DST_CAPACITY, PORTS_CAPACITY,
};

/// A cgroup sock_addr program's "let the syscall proceed" verdict. 0 would reject it.
const PROCEED: i32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[btf_map]
static EDDY_CONFIG: Array<Config, 1> = Array::new();
#[btf_map]
static EDDY_HEARTBEAT: Array<u64, 1> = Array::new();
#[btf_map]
static EDDY_PORTS: HashMap<u16, u32, { PORTS_CAPACITY as usize }> = HashMap::new();
#[btf_map]
static EDDY_SOCK_DST: LruHashMap<u64, OrigDst, { ORIG_DST_CAPACITY as usize }> = LruHashMap::new();
#[btf_map]
static EDDY_ORIG_DST: LruHashMap<ConnKey, OrigDst, { ORIG_DST_CAPACITY as usize }> =
    LruHashMap::new();
#[btf_map]
static EDDY_COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = EDDY_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn eddy_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn eddy_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET6);
    PROCEED
}

/// Where a connect should go instead, if anywhere.
enum Redirect {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// The calling process, for the decision logs (evaluated only when they are on).
#[inline(always)]
fn caller_pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, family: u32) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the program context; the verifier checks each field access.
    let (protocol, user_port) = unsafe { ((*sa).protocol, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        debug!(
            ctx,
            "skip pid {}: not TCP (protocol {})",
            caller_pid(),
            protocol
        );
        return;
    }
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(user_port as u16);
    // SAFETY: the value is not kept past this check.
    if unsafe { EDDY_PORTS.get(port) }.is_none() {
        debug!(
            ctx,
            "skip pid {}: port {} not intercepted",
            caller_pid(),
            port
        );
        return;
    }
    let Some(config) = EDDY_CONFIG.get(0) else {
        debug!(ctx, "skip pid {}: port {}, no config", caller_pid(), port);
        return;
    };
    if config.proxy_port == 0 {
        debug!(
            ctx,
            "skip pid {}: port {}, no proxy configured",
            caller_pid(),
            port
        );
        return;
    }

    // Loop guard: eddy marks its own upstream sockets.
    // SAFETY: `sk` is always a valid full socket in connect hooks.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    if mark != 0 && mark == config.own_mark {
        count(Counter::SkippedLoop);
        debug!(
            ctx,
            "skip pid {}: port {}, eddy's own socket (loop mark {:x})",
            caller_pid(),
            port,
            mark
        );
        return;
    }

    // The rewritten destination is the proxy's loopback address, which only reaches eddy
    // from eddy's own network namespace.
    // SAFETY: plain helper call on the program context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != config.netns_cookie {
        count(Counter::SkippedNetns);
        debug!(
            ctx,
            "skip pid {}: port {}, other network namespace",
            caller_pid(),
            port
        );
        return;
    }

    // A hung or stopping eddy stops refreshing the heartbeat: go direct.
    let beat = EDDY_HEARTBEAT.get(0).copied().unwrap_or(0);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if beat == 0 || now < beat || now - beat > config.heartbeat_timeout_ns {
        count(Counter::StaleHeartbeat);
        debug!(
            ctx,
            "skip pid {}: port {}, stale heartbeat (eddy not alive)",
            caller_pid(),
            port
        );
        return;
    }

    let (orig, redirect) = if family == AF_INET {
        // SAFETY: context field read.
        let ip4 = unsafe { (*sa).user_ip4 }.to_ne_bytes();
        let orig = OrigDst {
            addr: v4_mapped(ip4),
            port,
            family: 4,
            ..OrigDst::default()
        };
        (orig, Redirect::V4(config.proxy_ip4))
    } else {
        // SAFETY: context field reads, one 4-byte word at a time as the verifier requires.
        let words = unsafe {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        };
        let addr = words_to_bytes(words);
        if is_v4_mapped(&addr) {
            // Go dials IPv4 addresses from AF_INET6 sockets in this form.
            let orig = OrigDst {
                addr,
                port,
                family: 4,
                ..OrigDst::default()
            };
            (orig, Redirect::V6(v4_mapped(config.proxy_ip4)))
        } else {
            if config.flags & CONFIG_FLAG_IPV6 == 0 {
                debug!(
                    ctx,
                    "skip pid {}: [{:i}]:{}, native IPv6 and no IPv6 listener",
                    caller_pid(),
                    addr,
                    port
                );
                return;
            }
            let orig = OrigDst {
                addr,
                port,
                family: 6,
                ..OrigDst::default()
            };
            (orig, Redirect::V6(config.proxy_ip6))
        }
    };

    // The client process, for the proxy's trust gate: it terminates TLS only for a process
    // whose trust roots hold eddy's CA. connect() runs in the caller's context, so the
    // "current" task is the client.
    // SAFETY: helpers without arguments.
    let (pid_tgid, cgroup_id) =
        unsafe { (bpf_get_current_pid_tgid(), bpf_get_current_cgroup_id()) };
    let orig = OrigDst {
        tgid: (pid_tgid >> 32) as u32,
        cgroup_id,
        ..orig
    };

    // SAFETY: helper call on the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if EDDY_SOCK_DST.insert(cookie, orig, 0).is_err() {
        // Without a record the proxy could not find the destination: go direct instead.
        count(Counter::RecordFailed);
        debug!(
            ctx,
            "skip pid {}: {:i} port {}, record failed (map full)", orig.tgid, orig.addr, port
        );
        return;
    }

    let proxy_port = u32::from(config.proxy_port.to_be());
    // SAFETY: context field writes; connect hooks may rewrite user_ip4/user_ip6/user_port.
    unsafe {
        match redirect {
            Redirect::V4(ip) => (*sa).user_ip4 = u32::from_ne_bytes(ip),
            Redirect::V6(ip) => {
                let w = bytes_to_words(ip);
                (*sa).user_ip6[0] = w[0];
                (*sa).user_ip6[1] = w[1];
                (*sa).user_ip6[2] = w[2];
                (*sa).user_ip6[3] = w[3];
            }
        }
        (*sa).user_port = proxy_port;
    }
    count(Counter::Redirected);
    debug!(
        ctx,
        "redirect pid {}: {:i} port {} to eddy port {}",
        orig.tgid,
        orig.addr,
        port,
        config.proxy_port
    );
}

#[sock_ops]
pub fn eddy_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        publish_orig_dst(&ctx);
    }
    0
}

/// On the client side of a redirected connection, once it is established (before the
/// final ACK reaches the proxy, so before accept() returns there), re-key the original
/// destination by the connection tuple.
#[inline(always)]
fn publish_orig_dst(ctx: &SockOpsContext) {
    // SAFETY: helper call on the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out immediately.
    let Some(orig) = (unsafe { EDDY_SOCK_DST.get(cookie) }).copied() else {
        return;
    };
    let _ = EDDY_SOCK_DST.remove(cookie);

    // Read every field up front, unconditionally: if the compiler merges the IPv4 and IPv6
    // branches it computes a ctx pointer with an offset, which the verifier rejects.
    let ops = ctx.ops;
    // SAFETY: plain loads of context fields at constant offsets.
    let (family, local4, remote4, local6, remote6, local_port, remote_port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
        )
    };
    let (client_addr, proxy_addr) = match family {
        AF_INET => (
            v4_mapped(local4.to_ne_bytes()),
            v4_mapped(remote4.to_ne_bytes()),
        ),
        AF_INET6 => (words_to_bytes(local6), words_to_bytes(remote6)),
        _ => return,
    };
    let key = ConnKey {
        client_addr,
        proxy_addr,
        // local_port is host byte order; remote_port is the network-order port in the
        // upper 16 bits on little-endian kernels.
        client_port: local_port as u16,
        proxy_port: u16::from_be((remote_port >> 16) as u16),
        _pad: 0,
    };
    if EDDY_ORIG_DST.insert(key, orig, 0).is_ok() {
        count(Counter::OrigDstPublished);
    } else {
        count(Counter::RecordFailed);
        debug!(
            ctx,
            "skip pid {}: connection from port {} not recorded, map full",
            orig.tgid,
            key.client_port
        );
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
