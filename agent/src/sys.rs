//! Thin, safe wrappers over the few syscalls eddy needs that std and aya do not offer.
use std::{ffi::CString, io, os::fd::AsRawFd, path::Path};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
/// getsockopt(SOL_SOCKET, SO_NETNS_COOKIE), Linux 5.14+.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// CLOCK_MONOTONIC in nanoseconds: the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Effective capabilities allow loading BPF and attaching cgroup hooks.
pub fn has_bpf_privileges() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(cap_eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN)
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// `mount -t bpf bpf <dir>`.
pub fn mount_bpffs(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let src = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cookie of the current network namespace, as bpf_get_netns_cookie() reports it.
pub fn netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct; `c` is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// Raise RLIMIT_NOFILE: every proxied connection costs two descriptors, and a spliced
/// passthrough six (two sockets, two pipes), so 5,000 idle clients need 30,000. As root the
/// hard limit itself is lifted to the kernel's per-process maximum (fs.nr_open); otherwise
/// the soft limit goes up to the hard one.
pub fn raise_nofile_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(0);
    // SAFETY: getrlimit/setrlimit on structs we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if nr_open > lim.rlim_max {
            let all = libc::rlimit {
                rlim_cur: nr_open,
                rlim_max: nr_open,
            };
            // Fails without CAP_SYS_RESOURCE; then the soft limit still goes up below.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &all) == 0 {
                return;
            }
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// Attach types eddy uses, as numbered in enum bpf_attach_type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachType {
    SockOps = 3,
    Connect4 = 10,
    Connect6 = 11,
}

impl AttachType {
    pub const ALL: [AttachType; 3] = [
        AttachType::Connect4,
        AttachType::Connect6,
        AttachType::SockOps,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AttachType::SockOps => "sock_ops",
            AttachType::Connect4 => "connect4",
            AttachType::Connect6 => "connect6",
        }
    }
}

/// `bpf_attr` for BPF_PROG_QUERY (the `query` member), padded to the size the kernel
/// accepts with trailing zeroes.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
    _tail: [u64; 8],
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// Program ids attached to a cgroup for one attach type (BPF_PROG_QUERY).
pub fn query_cgroup_programs(cgroup: &Path, attach: AttachType) -> io::Result<Vec<u32>> {
    let dir = std::fs::File::open(cgroup)?;
    let mut ids = [0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type: attach as u32,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a properly laid out bpf_attr prefix with zeroed tail; prog_ids
    // points to `ids`, which has room for prog_cnt entries and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQueryAttr,
            std::mem::size_of::<ProgQueryAttr>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn free_bytes_of_tmp() {
        assert!(free_bytes(Path::new("/tmp")).unwrap() > 0);
        assert!(free_bytes(Path::new("/nonexistent/x")).is_err());
    }

    #[test]
    fn tmp_is_not_bpffs() {
        assert!(!is_bpffs(Path::new("/tmp")));
    }

    #[test]
    fn own_process_is_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(0));
    }
}
