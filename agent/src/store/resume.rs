//! Crash-resume of fills: a fill's partial file lives at a stable, digest-named path with a
//! checkpoint beside it, so a restarted eddy continues from the bytes it already has instead of
//! fetching the whole blob again.
//!
//! Design:
//! - `store/tmp/<hex>.partial` holds the bytes written so far, `<hex>.partial.json` a
//!   checkpoint `{len, prefix_sha256}`: the length of a prefix and the sha256 of exactly those
//!   bytes, written every [`CHECKPOINT_EVERY`] bytes from the fill's own running hash.
//! - sha2 has no serialisable state, so resuming re-hashes the prefix from disk. That re-hash
//!   also checks it: the prefix is trusted only if its sha256 equals the checkpoint's. Content
//!   past the checkpoint is cut off (it was written but never checkpointed). So a prefix that
//!   bit-rotted, was truncated, or was never made durable before a power loss (zeros or stale
//!   blocks where data should be) is discarded before any reader sees it, and the fill starts
//!   from zero: a corrupt prefix never reaches a client and never fails a pull.
//! - Because the prefix is verified on its own, a final digest mismatch after a resume cannot
//!   come from the prefix; it is upstream's doing, exactly as in a fresh fill. The fill then fails
//!   as any mismatching fill does (its clients fall back to upstream), and the partial is deleted,
//!   so the next attempt starts from zero. Restarting inside the same fill is not done: readers may
//!   already have streamed bytes past the prefix, and rewriting them under a reader would corrupt
//!   that client's body.
//! - Checkpoints are not fsync'd: a kill -9 leaves the page cache intact, and after a power loss
//!   the hash comparison above rejects whatever did not reach the disk.
use std::{
    fs::{self, File},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

use crate::node::durable;
use crate::oci::digest::Digest;

/// How often a running fill records a checkpoint. After a crash at most this much (plus what
/// arrived since) is fetched again; each checkpoint costs one small file write.
pub const CHECKPOINT_EVERY: u64 = 4 << 20;

const PARTIAL_SUFFIX: &str = ".partial";
const CHECKPOINT_SUFFIX: &str = ".partial.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    len: u64,
    prefix_sha256: String,
}

/// The partial file of a fill of `digest`.
pub fn partial_path(tmp_dir: &Path, digest: &Digest) -> PathBuf {
    tmp_dir.join(format!("{}{PARTIAL_SUFFIX}", digest.hex()))
}

pub fn checkpoint_path(partial: &Path) -> PathBuf {
    let mut name = partial.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// Whether a file name in `tmp/` belongs to a resumable fill (kept at open).
pub fn is_resumable_name(name: &str) -> bool {
    let hex = name
        .strip_suffix(CHECKPOINT_SUFFIX)
        .or_else(|| name.strip_suffix(PARTIAL_SUFFIX));
    hex.is_some_and(|hex| format!("sha256:{hex}").parse::<Digest>().is_ok())
}

/// Records that the first `len` bytes of `partial` hash to `prefix` (the fill's running hash,
/// which is cloned, not consumed). Replaced atomically, so a reader never sees half a record.
pub fn write_checkpoint(partial: &Path, len: u64, prefix: &Sha256) -> io::Result<()> {
    let record = Checkpoint {
        len,
        prefix_sha256: hex::encode(prefix.clone().finalize()),
    };
    let record = serde_json::to_vec(&record).expect("Checkpoint serializes");
    // Not fsync'd (see the module doc): the prefix hash is re-checked on resume anyway.
    let options = durable::Options::new().without_fsync();
    durable::write_atomic(&checkpoint_path(partial), &record, &options)
}

/// Removes a fill's partial file and its checkpoint.
pub fn discard(partial: &Path) {
    let _ = fs::remove_file(partial);
    let _ = fs::remove_file(checkpoint_path(partial));
}

/// What a fill can start from: the length of a verified prefix and the hash state after it.
pub struct Prefix {
    pub len: u64,
    pub hasher: Sha256,
}

/// Finds the verified prefix of `file` (the open partial at `partial`), truncating the file to
/// it. Anything that does not check out is cut away: the result is then an empty prefix.
pub fn recover(partial: &Path, file: &File) -> io::Result<Prefix> {
    let empty = || Prefix {
        len: 0,
        hasher: Sha256::new(),
    };
    let on_disk = file.metadata()?.len();
    let checkpoint: Option<Checkpoint> = fs::read(checkpoint_path(partial))
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok());
    let prefix = match checkpoint {
        Some(cp) if cp.len > 0 && cp.len <= on_disk => match hash_prefix(file, cp.len)? {
            Some(hasher) if hex::encode(hasher.clone().finalize()) == cp.prefix_sha256 => Prefix {
                len: cp.len,
                hasher,
            },
            _ => {
                tracing::warn!(path = %partial.display(), len = cp.len, "partial fill does not match its checkpoint; starting over");
                empty()
            }
        },
        Some(cp) if cp.len > on_disk => {
            tracing::warn!(path = %partial.display(), len = cp.len, on_disk, "partial fill shorter than its checkpoint; starting over");
            empty()
        }
        _ => empty(),
    };
    file.set_len(prefix.len)?;
    if prefix.len == 0 {
        let _ = fs::remove_file(checkpoint_path(partial));
    }
    Ok(prefix)
}

/// sha256 over the first `len` bytes of `file` (None if it turns out shorter).
fn hash_prefix(file: &File, len: u64) -> io::Result<Option<Sha256>> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let want = (len - pos).min(buf.len() as u64) as usize;
        let n = file.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Ok(None);
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(Some(hasher))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(data: &[u8]) -> (tempfile::TempDir, PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::of(b"whatever");
        let path = partial_path(dir.path(), &digest);
        fs::write(&path, data).unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, path, file)
    }

    #[test]
    fn a_checkpointed_prefix_is_resumed_and_the_tail_cut() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (_dir, path, file) = setup(&data);
        write_checkpoint(&path, 6_000, &Sha256::new().chain_update(&data[..6_000])).unwrap();
        let prefix = recover(&path, &file).unwrap();
        assert_eq!(prefix.len, 6_000);
        assert_eq!(
            prefix.hasher.finalize()[..],
            Sha256::digest(&data[..6_000])[..]
        );
        assert_eq!(fs::read(&path).unwrap(), &data[..6_000]);
    }

    #[test]
    fn a_corrupt_short_or_unrecorded_prefix_is_discarded() {
        let data = vec![7u8; 10_000];
        // Corrupt: one flipped byte inside the checkpointed prefix.
        let (_dir, path, file) = setup(&data);
        write_checkpoint(&path, 8_000, &Sha256::new().chain_update(&data[..8_000])).unwrap();
        file.write_at(&[8], 100).unwrap();
        assert_eq!(recover(&path, &file).unwrap().len, 0);
        assert_eq!(file.metadata().unwrap().len(), 0);
        assert!(!checkpoint_path(&path).exists());
        // Shorter than the checkpoint says.
        let (_dir, path, file) = setup(&data[..1_000]);
        write_checkpoint(&path, 8_000, &Sha256::new().chain_update(&data[..8_000])).unwrap();
        assert_eq!(recover(&path, &file).unwrap().len, 0);
        // No checkpoint, or an unreadable one.
        let (_dir, path, file) = setup(&data);
        assert_eq!(recover(&path, &file).unwrap().len, 0);
        let (_dir, path, file) = setup(&data);
        fs::write(checkpoint_path(&path), b"{not json").unwrap();
        assert_eq!(recover(&path, &file).unwrap().len, 0);
        assert_eq!(file.metadata().unwrap().len(), 0);
    }

    #[test]
    fn only_digest_named_partials_are_resumable() {
        let d = Digest::of(b"x");
        assert!(is_resumable_name(&format!("{}.partial", d.hex())));
        assert!(is_resumable_name(&format!("{}.partial.json", d.hex())));
        assert!(!is_resumable_name(&format!("{}.partial.json.tmp", d.hex())));
        assert!(!is_resumable_name(&format!("{}.0123", d.hex())));
        assert!(!is_resumable_name("junk.partial"));
    }
}
