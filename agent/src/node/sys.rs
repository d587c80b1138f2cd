//! Thin, safe wrappers over the few syscalls eddy needs that std and aya do not offer.
// This is where the crate's syscalls live: each `unsafe` block says why it is sound.
#![allow(unsafe_code)]
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
    is_fs_type(path, BPF_FS_MAGIC)
}

/// Whether the file system at `path` has the statfs(2) magic `magic`; false when statfs fails.
pub fn is_fs_type(path: &Path, magic: i64) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == magic
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
    let st = statvfs(path)?;
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// statvfs(3) of the filesystem holding `path`.
fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct; `c` is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

/// Takes an exclusive `flock` on `file` without waiting: Ok(false) if another open file
/// description holds it. Released when the file is closed (or the process dies).
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor `file` keeps open for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Size of the filesystem holding `path`.
pub fn total_bytes(path: &Path) -> io::Result<u64> {
    let st = statvfs(path)?;
    Ok(st.f_blocks as u64 * st.f_frsize as u64)
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

/// Open `path` below the directory `root` as if `root` were `/`: absolute symlinks and `..`
/// stay inside it (openat2 with RESOLVE_IN_ROOT, Linux 5.6+). The trust gate reads a client's
/// trust bundles through `/proc/PID/root` this way, so a client in another mount namespace
/// is judged by its own files even when they are symlinks such as Debian's
/// `/etc/ssl/certs/*.pem -> /usr/share/ca-certificates/...`.
/// `no_follow`: open a final symlink itself (O_PATH), to read its own mtime.
pub fn open_in_root(
    root: &std::fs::File,
    path: &Path,
    no_follow: bool,
) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let relative = path.strip_prefix("/").unwrap_or(path);
    let c = CString::new(relative.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let flags = if no_follow {
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC
    } else {
        libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK
    };
    // SAFETY: open_how is plain integers; all-zero is its documented "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `c` is a NUL-terminated string and `how` a properly initialised open_how,
    // both alive for the call; the kernel copies them and returns a new descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor nobody else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as libc::c_int) })
}

/// Wall-clock time of boot, to place a process's start (clock ticks since boot, from
/// /proc/PID/stat) on the same clock as file mtimes. Computed now, so it follows clock steps.
pub fn boot_time() -> std::time::SystemTime {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let since_boot = read(libc::CLOCK_BOOTTIME);
    let now = read(libc::CLOCK_REALTIME);
    std::time::UNIX_EPOCH + now.saturating_sub(since_boot)
}

/// USER_HZ: the unit of the start time in /proc/PID/stat.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// The inode number of the initial pid namespace (PROC_PID_INIT_INO).
const INITIAL_PID_NS_INODE: u64 = 0xEFFF_FFFC;

/// Whether eddy sees the host's process ids: the connect hook records ids as the initial pid
/// namespace numbers them, and only there do they name the same process in /proc.
pub fn in_initial_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == INITIAL_PID_NS_INODE)
}

/// The bpf(2) syscall works here: create (and drop) a one-entry array map. Fails with
/// EPERM without privileges and ENOSYS on kernels built without BPF.
pub fn bpf_syscall_works() -> io::Result<()> {
    // The first fields of union bpf_attr for BPF_MAP_CREATE; the kernel zero-checks the rest
    // of the size we pass.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: `attr` is a valid, fully initialised prefix of bpf_attr, and the size passed
    // is its size; the kernel reads no further.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
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
