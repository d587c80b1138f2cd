//! The store's on-disk layout and the file operations that keep it crash-consistent: creating and
//! scanning it at open, the fill's partial file, the commit (sidecar, then blob), removal.
//!
//! Under `<data_dir>/store`:
//! - `blobs/sha256/<hex>`: committed blobs, named only by `rename` of a verified, fsync'd file.
//! - `meta/sha256/<hex>.json`: the sidecar recording the committed size ([`Meta`]).
//! - `tmp/<hex>.partial` (+ `.partial.json`): fills in progress (see `resume`); anything else in
//!   `tmp/` is cleared at open.
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use super::error::{io_err, StoreError};
use super::resume;
use crate::node::durable;
use crate::oci::digest::Digest;

/// The sidecar in `meta/`. Unknown fields are ignored, so later versions can add some.
#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    size: u64,
}

/// A committed blob found at open whose sidecar matches it.
pub(super) struct Found {
    pub digest: Digest,
    pub size: u64,
    pub accessed: SystemTime,
}

/// Where the store's files live.
pub(super) struct Layout {
    pub root: PathBuf,
    pub blobs_dir: PathBuf,
    meta_dir: PathBuf,
    pub tmp_dir: PathBuf,
}

impl Layout {
    /// Creates the directories under `<data_dir>/store` and empties `tmp/` but for resumable fills.
    pub fn open(data_dir: &Path) -> Result<Layout, StoreError> {
        let root = data_dir.join("store");
        let layout = Layout {
            blobs_dir: root.join("blobs").join("sha256"),
            meta_dir: root.join("meta").join("sha256"),
            tmp_dir: root.join("tmp"),
            root,
        };
        for dir in [&layout.blobs_dir, &layout.meta_dir, &layout.tmp_dir] {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        layout.clear_tmp()?;
        Ok(layout)
    }

    fn clear_tmp(&self) -> Result<(), StoreError> {
        let tmp_dir = &self.tmp_dir;
        for entry in fs::read_dir(tmp_dir).map_err(io_err("list", tmp_dir))? {
            let path = entry.map_err(io_err("list", tmp_dir))?.path();
            let resumable = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(resume::is_resumable_name);
            if resumable && path.is_file() {
                continue;
            }
            debug!(path = %path.display(), "removing leftover temp file");
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_err("remove", &path))?;
        }
        Ok(())
    }

    /// The blobs whose sidecar records their current size. Anything else in `blobs/` is deleted,
    /// and so are sidecars left without a blob (a crash between the two renames, or an
    /// eviction interrupted). Content is not re-hashed here, so open stays fast.
    pub fn scan(&self) -> Result<Vec<Found>, StoreError> {
        let blobs_dir = &self.blobs_dir;
        let mut found = Vec::new();
        for entry in fs::read_dir(blobs_dir).map_err(io_err("list", blobs_dir))? {
            let entry = entry.map_err(io_err("list", blobs_dir))?;
            let path = entry.path();
            let digest = entry.file_name().to_str().and_then(digest_of_hex);
            let recorded = digest.and_then(|d| self.read_meta(&d));
            let actual = entry.metadata().map_err(io_err("stat", &path))?;
            match (digest, recorded) {
                (Some(digest), Some(meta)) if actual.is_file() && actual.len() == meta.size => {
                    let accessed = actual
                        .accessed()
                        .or_else(|_| actual.modified())
                        .unwrap_or_else(|_| SystemTime::now());
                    found.push(Found {
                        digest,
                        size: meta.size,
                        accessed,
                    });
                }
                _ => {
                    warn!(path = %path.display(), "removing blob without a matching size record");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        self.remove_orphan_sidecars(&found)?;
        Ok(found)
    }

    fn remove_orphan_sidecars(&self, found: &[Found]) -> Result<(), StoreError> {
        let meta_dir = &self.meta_dir;
        let found: HashSet<Digest> = found.iter().map(|f| f.digest).collect();
        for entry in fs::read_dir(meta_dir).map_err(io_err("list", meta_dir))? {
            let path = entry.map_err(io_err("list", meta_dir))?.path();
            let digest = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(digest_of_hex);
            if !digest.is_some_and(|d| found.contains(&d)) {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir.join(digest.hex())
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.meta_dir.join(format!("{}.json", digest.hex()))
    }

    fn read_meta(&self, digest: &Digest) -> Option<Meta> {
        let raw = fs::read(self.meta_path(digest)).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// The fill's partial file, created or (after a crash) reopened as it is: a write handle
    /// for the fill, and a separate read handle shared by readers. The read handle is opened now,
    /// by path, so it follows the inode through the commit rename (and stays valid if a failed
    /// fill unlinks it): readers never race the rename. Only one fill per digest runs at a time
    /// (`inflight`), and one process owns the store, so the stable name has one writer.
    pub fn open_partial(&self, digest: &Digest) -> Result<Partial, StoreError> {
        let path = resume::partial_path(&self.tmp_dir, digest);
        let writer = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let reader = File::open(&path).map_err(io_err("open", &path))?;
        Ok(Partial {
            path,
            writer,
            reader,
        })
    }

    /// Partial files in `tmp/` (digest, path), running fills' included.
    pub fn partials(&self) -> Vec<(Digest, fs::DirEntry)> {
        let Ok(dir) = fs::read_dir(&self.tmp_dir) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let hex = name.to_str()?.strip_suffix(".partial")?;
                Some((digest_of_hex(hex)?, entry))
            })
            .collect()
    }

    /// Makes a verified partial file the committed blob. Sidecar first, then the blob: once the
    /// blob's name is durable its size record is too, and a crash in between leaves only an
    /// orphan sidecar, which open removes.
    pub fn commit(
        &self,
        digest: &Digest,
        partial: &Path,
        writer: &File,
        size: u64,
    ) -> Result<(), StoreError> {
        writer.sync_all().map_err(io_err("fsync", partial))?;
        let meta_path = self.meta_path(digest);
        let meta = serde_json::to_vec(&Meta { size }).expect("Meta serializes");
        durable::write_atomic(&meta_path, &meta, &durable::Options::new())
            .map_err(io_err("write", &meta_path))?;

        let blob_path = self.blob_path(digest);
        fs::rename(partial, &blob_path).map_err(io_err("rename", &blob_path))?;
        let _ = fs::remove_file(resume::checkpoint_path(partial));
        durable::sync_dir(&self.blobs_dir).map_err(io_err("fsync", &self.blobs_dir))
    }

    /// Unlinks a committed blob and its sidecar.
    pub fn remove(&self, digest: &Digest) {
        let _ = fs::remove_file(self.blob_path(digest));
        let _ = fs::remove_file(self.meta_path(digest));
    }
}

/// A fill's partial file: its path, the fill's write handle and the readers' read handle.
pub(super) struct Partial {
    pub path: PathBuf,
    pub writer: File,
    pub reader: File,
}

fn digest_of_hex(hex: &str) -> Option<Digest> {
    format!("sha256:{hex}").parse().ok()
}

/// sha256 of a whole file.
pub(super) fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(Digest::from_sha256(hasher.finalize().into())),
            n => hasher.update(&buf[..n]),
        }
    }
}
