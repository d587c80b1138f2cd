//! Find eddy's CA among a process's trust roots, read the way Go's crypto/x509
//! (root_unix.go, root_linux.go) reads them, through the process's own root directory:
//! - files: `SSL_CERT_FILE` if set, else the distro bundles in Go's order; only the FIRST
//!   file that can be read counts (Go stops there);
//! - directories: `SSL_CERT_DIR` (colon-separated) if set, else `/etc/ssl/certs` and
//!   `/etc/pki/tls/certs`; every file in each counts. Go reads these even when
//!   `SSL_CERT_FILE` is set, so a CA in `/etc/ssl/certs/ca-certificates.crt` counts then too.
//!
//! OpenSSL (curl) reads the same variables and a subset of these places, so a client it
//! builds is judged the same way. Certificates are compared as DER.
use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::{pem::PemObject, CertificateDer};

use super::process::TrustEnv;
use crate::node::sys;

/// Go's `certFiles` for Linux, in its order.
pub const CERT_FILES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// Go's `certDirectories` for Linux.
pub const CERT_DIRS: [&str; 2] = ["/etc/ssl/certs", "/etc/pki/tls/certs"];

/// A file larger than this is not read (a distro bundle is ~200 KiB): it counts as holding
/// no CA, which can only make the gate pass a client through.
const MAX_FILE_BYTES: u64 = 8 << 20;
/// Entries read per directory (Debian's /etc/ssl/certs holds ~300).
const MAX_DIR_ENTRIES: usize = 4096;
/// File versions remembered; beyond this the memory is cleared.
const MAX_CACHED_FILES: usize = 16_384;

/// One version of one file: a changed file (new size, mtime or ctime) is a new key.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    changed_ns: i128,
}

/// Whether each file version holds the CA, so judging the next process that reads the same
/// bundle costs a few stat calls instead of parsing ~150 certificates again.
#[derive(Default)]
pub struct FileMemo {
    holds_ca: Mutex<HashMap<FileVersion, bool>>,
}

impl FileMemo {
    /// How many file versions are remembered.
    pub fn remembered(&self) -> usize {
        self.holds_ca.lock().unwrap().len()
    }
}

/// Where a process's roots look for certificates.
pub struct Places {
    pub files: Vec<PathBuf>,
    pub dirs: Vec<PathBuf>,
}

impl Places {
    pub fn of(env: &TrustEnv) -> Self {
        Places {
            files: match &env.cert_file {
                Some(f) => vec![f.clone()],
                None => CERT_FILES.iter().map(PathBuf::from).collect(),
            },
            dirs: match &env.cert_dirs {
                Some(d) => d.clone(),
                None => CERT_DIRS.iter().map(PathBuf::from).collect(),
            },
        }
    }
}

/// The earliest time eddy's CA (`ca_der`) became visible in any place the process reads its
/// roots from, or `None` if it is in none of them. "Visible since" is the newest of the
/// file's mtime and ctime (ctime cannot be set back, so a bundle copied into place with an
/// old mtime still counts as new), and of the same for a symlink naming it.
pub fn ca_visible_since(
    root: &File,
    places: &Places,
    ca_der: &[u8],
    memo: &FileMemo,
) -> Option<SystemTime> {
    let mut earliest: Option<SystemTime> = None;
    let mut note = |since: Option<SystemTime>| {
        if let Some(s) = since {
            earliest = Some(earliest.map_or(s, |e| e.min(s)));
        }
    };
    for file in &places.files {
        if let Ok(since) = holds_ca(root, file, ca_der, memo) {
            note(since);
            break;
        }
    }
    for dir in &places.dirs {
        let Ok(handle) = sys::open_in_root(root, dir, false) else {
            continue;
        };
        // The directory's entries, through the descriptor opened inside the root.
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", fd_of(&handle))) else {
            continue;
        };
        for entry in entries.flatten().take(MAX_DIR_ENTRIES) {
            if let Ok(since) = holds_ca(root, &dir.join(entry.file_name()), ca_der, memo) {
                note(since);
            }
        }
    }
    earliest
}

fn fd_of(file: &File) -> i32 {
    use std::os::fd::AsRawFd;
    file.as_raw_fd()
}

/// `Err`: not a readable regular file (the next bundle in Go's list is tried).
/// `Ok(None)`: read, no CA in it. `Ok(Some(t))`: holds the CA, visible since `t`.
fn holds_ca(
    root: &File,
    path: &Path,
    ca_der: &[u8],
    memo: &FileMemo,
) -> std::io::Result<Option<SystemTime>> {
    let mut file = sys::open_in_root(root, path, false)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let version = FileVersion {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        changed_ns: changed_ns(&meta),
    };
    let known = memo.holds_ca.lock().unwrap().get(&version).copied();
    let holds = match known {
        Some(h) => h,
        None => {
            let h = meta.size() <= MAX_FILE_BYTES && {
                let mut data = Vec::with_capacity(meta.size() as usize);
                (&mut file).take(MAX_FILE_BYTES).read_to_end(&mut data)?;
                pem_holds(&data, ca_der)
            };
            let mut memo = memo.holds_ca.lock().unwrap();
            if memo.len() >= MAX_CACHED_FILES {
                memo.clear();
            }
            memo.insert(version, h);
            h
        }
    };
    if !holds {
        return Ok(None);
    }
    let mut since = changed_ns(&meta);
    // A symlink put in place later (c_rehash, update-ca-certificates) makes an old file
    // visible from then on.
    if let Ok(link) = sys::open_in_root(root, path, true) {
        if let Ok(m) = link.metadata() {
            if m.file_type().is_symlink() {
                since = since.max(changed_ns(&m));
            }
        }
    }
    Ok(Some(time_of_ns(since)))
}

/// Whether PEM text holds the certificate `ca_der`. Parsing stops at the first malformed
/// block: a CA hidden behind one is not seen, which only makes the gate pass through.
fn pem_holds(pem: &[u8], ca_der: &[u8]) -> bool {
    for cert in CertificateDer::pem_slice_iter(pem) {
        match cert {
            Ok(der) if der.as_ref() == ca_der => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

fn changed_ns(meta: &std::fs::Metadata) -> i128 {
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    ns(meta.mtime(), meta.mtime_nsec()).max(ns(meta.ctime(), meta.ctime_nsec()))
}

fn time_of_ns(ns: i128) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns.min(u64::MAX as i128) as u64)
    } else {
        UNIX_EPOCH
    }
}
