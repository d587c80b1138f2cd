//! What the trust gate reads about a client process from procfs: its identity (pid plus
//! start time, so a reused pid is a new process), its environment, its executable and its
//! root directory. Every read is bounded.
use std::{
    ffi::OsString,
    fs::File,
    io::{self, Read},
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// /proc/PID/environ beyond this is not read (the kernel caps argv+envp near 2 MiB anyway;
/// the variables the gate needs sit among the first).
const MAX_ENVIRON: u64 = 256 * 1024;

/// A process's start, in clock ticks since boot (field 22 of /proc/PID/stat). With the
/// pid it names one process for its whole life: exec keeps it, a reused pid changes it.
pub fn start_ticks(proc_root: &Path, pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))?;
    parse_start_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// The start time from a /proc/PID/stat line. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name; starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Wall-clock start of a process, given the wall-clock boot time.
pub fn started_at(boot: SystemTime, start_ticks: u64, ticks_per_second: u64) -> SystemTime {
    let hz = ticks_per_second.max(1);
    boot + Duration::from_secs(start_ticks / hz)
        + Duration::from_nanos((start_ticks % hz) * 1_000_000_000 / hz)
}

/// When process `pid` started (wall clock), or None if it is gone.
pub fn start_time(pid: u32) -> Option<SystemTime> {
    let ticks = start_ticks(Path::new("/proc"), pid).ok()?;
    Some(started_at(
        crate::node::sys::boot_time(),
        ticks,
        crate::node::sys::clock_ticks_per_second(),
    ))
}

/// The trust-related variables of a process's environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustEnv {
    /// `SSL_CERT_FILE`: replaces the distro bundle list (Go and OpenSSL).
    pub cert_file: Option<PathBuf>,
    /// `SSL_CERT_DIR`: colon-separated; replaces the distro directory list.
    pub cert_dirs: Option<Vec<PathBuf>>,
}

pub fn trust_env(proc_root: &Path, pid: u32) -> io::Result<TrustEnv> {
    let file = File::open(proc_root.join(pid.to_string()).join("environ"))?;
    let mut raw = Vec::new();
    file.take(MAX_ENVIRON).read_to_end(&mut raw)?;
    Ok(parse_trust_env(&raw))
}

/// Parse NUL-separated `NAME=value` pairs. Empty values count as unset, as Go treats them.
pub fn parse_trust_env(raw: &[u8]) -> TrustEnv {
    let mut env = TrustEnv::default();
    for var in raw.split(|&b| b == 0) {
        let value = |name: &[u8]| {
            var.strip_prefix(name)
                .filter(|v| !v.is_empty())
                .map(|v| OsString::from_vec(v.to_vec()))
        };
        if let Some(v) = value(b"SSL_CERT_FILE=") {
            env.cert_file = Some(PathBuf::from(v));
        } else if let Some(v) = value(b"SSL_CERT_DIR=") {
            let dirs = v
                .as_encoded_bytes()
                .split(|&b| b == b':')
                .filter(|d| !d.is_empty())
                .map(|d| PathBuf::from(OsString::from_vec(d.to_vec())))
                .collect();
            env.cert_dirs = Some(dirs);
        }
    }
    env
}

/// The process's executable as it names it (`/proc/PID/exe`), for the reactive guard and
/// `eddy status`. Unknown for kernel threads and when the link cannot be read.
pub fn exe(proc_root: &Path, pid: u32) -> PathBuf {
    std::fs::read_link(proc_root.join(pid.to_string()).join("exe"))
        .unwrap_or_else(|_| PathBuf::from("?"))
}

/// Make relative paths in `env` absolute against the process's working directory (as the
/// process sees it, inside its own root), as the process itself would resolve them.
pub fn anchor_relative(env: &mut TrustEnv, proc_root: &Path, pid: u32) {
    let has_relative = env.cert_file.iter().any(|f| f.is_relative())
        || env.cert_dirs.iter().flatten().any(|d| d.is_relative());
    if !has_relative {
        return;
    }
    // Unreadable cwd: the paths are then read from the root, which can only miss the CA.
    let Ok(cwd) = std::fs::read_link(proc_root.join(pid.to_string()).join("cwd")) else {
        return;
    };
    if let Some(f) = &mut env.cert_file {
        *f = cwd.join(&*f);
    }
    for d in env.cert_dirs.iter_mut().flatten() {
        *d = cwd.join(&*d);
    }
}

/// The process's root directory, through which its files are read.
pub fn root(proc_root: &Path, pid: u32) -> io::Result<File> {
    File::open(proc_root.join(pid.to_string()).join("root"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_survive_odd_command_names() {
        let stat = "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(parse_start_ticks("4242 (x) S 1"), None);
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn start_time_is_placed_on_the_wall_clock() {
        let boot = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(
            started_at(boot, 250, 100),
            boot + Duration::from_millis(2_500)
        );
    }

    #[test]
    fn reads_ssl_cert_file_and_dirs_from_the_environment() {
        let raw = b"PATH=/bin\0SSL_CERT_FILE=/etc/b.pem\0SSL_CERT_DIR=/a::/b\0HOME=/root\0";
        assert_eq!(
            parse_trust_env(raw),
            TrustEnv {
                cert_file: Some("/etc/b.pem".into()),
                cert_dirs: Some(vec!["/a".into(), "/b".into()]),
            }
        );
        // Empty means unset; a similar name is not the variable.
        assert_eq!(
            parse_trust_env(b"SSL_CERT_FILE=\0XSSL_CERT_DIR=/x\0"),
            TrustEnv::default()
        );
    }
}
