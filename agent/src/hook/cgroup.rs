//! Finding the cgroup v2 directory to attach to.
//!
//! Nodes run cgroup v2 either unified at /sys/fs/cgroup or, on hybrid hosts, at
//! /sys/fs/cgroup/unified. `auto` finds containerd's process and uses its cgroup.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 filesystem is mounted (looked for type cgroup2 in /proc/mounts)")]
    NoCgroupV2,
    #[error("cgroup path {path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is not a directory on a cgroup v2 filesystem")]
    NotCgroupV2 { path: PathBuf },
    #[error("--cgroup auto: no containerd process found in /proc")]
    NoContainerd,
    #[error("--cgroup auto: containerd (pid {pid}) has no cgroup v2 entry in /proc/{pid}/cgroup")]
    ContainerdNotInV2 { pid: u32 },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A resolved cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub path: PathBuf,
    /// The kernel's cgroup id: the inode number of the directory on cgroup2.
    pub id: u64,
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = read("/proc/mounts")?;
    parse_cgroup2_mount(&mounts).ok_or(CgroupError::NoCgroupV2)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts escapes spaces and a few other bytes as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolve `--cgroup`: `auto` or a directory path.
pub fn resolve(spec: &str) -> Result<Cgroup, CgroupError> {
    let path = if spec == "auto" {
        containerd_cgroup()?
    } else {
        PathBuf::from(spec)
    };
    open(&path)
}

/// Check that `path` is a cgroup v2 directory and read its id.
pub fn open(path: &Path) -> Result<Cgroup, CgroupError> {
    let meta = fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CgroupError::Missing {
            path: path.to_path_buf(),
        },
        _ => CgroupError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    if !meta.is_dir() || !is_cgroup2(path) {
        return Err(CgroupError::NotCgroupV2 {
            path: path.to_path_buf(),
        });
    }
    Ok(Cgroup {
        path: path.to_path_buf(),
        id: meta.ino(),
    })
}

fn is_cgroup2(path: &Path) -> bool {
    crate::node::sys::is_fs_type(path, CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 directory of the node's containerd (see `distro::detect`: the oldest
/// containerd process, never Talos' system containerd).
fn containerd_cgroup() -> Result<PathBuf, CgroupError> {
    let containerd = crate::node::distro::detect(Path::new("/proc")).map_err(|e| match e {
        crate::node::distro::DistroError::Io { path, source } => CgroupError::Io { path, source },
        _ => CgroupError::NoContainerd,
    })?;
    if containerd.cgroup.is_empty() {
        return Err(CgroupError::ContainerdNotInV2 {
            pid: containerd.pid,
        });
    }
    Ok(cgroup2_mount()?.join(containerd.cgroup.trim_start_matches('/')))
}

/// Find the path of the cgroup with `id` below the cgroup2 mount (for `eddy status`).
pub fn path_of_id(id: u64) -> Option<PathBuf> {
    let root = cgroup2_mount().ok()?;
    // Bounded breadth-first walk: cgroup trees are shallow but can be wide.
    let mut queue = std::collections::VecDeque::from([root]);
    let mut visited = 0usize;
    while let Some(dir) = queue.pop_front() {
        visited += 1;
        if visited > 100_000 {
            return None;
        }
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    queue.push_back(e.path());
                }
            }
        }
    }
    None
}

fn read(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_and_hybrid_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_mount_paths() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn missing_path_is_a_clear_error() {
        let err = open(Path::new("/nonexistent/eddy-cgroup")).unwrap_err();
        assert!(matches!(err, CgroupError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroupV2 { .. }), "{err}");
    }
}
