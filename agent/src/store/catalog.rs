//! What eddy knows ABOUT cached content, beside the bytes in the store: the media type of
//! manifests, which repositories a digest was seen in, whether upstream served it without
//! credentials, the last digest each tag resolved to (served while upstream is down), and
//! whether upstream serves each repository to anonymous clients (its public/private verdict).
//!
//! Small JSON sidecars under `<data_dir>/catalog`, replaced atomically and durably
//! ([`crate::node::durable`]).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::node::durable;
use crate::oci::{digest::Digest, repo_key::RepoKey};

#[derive(Debug, thiserror::Error)]
#[error("catalog {path}: {source}")]
pub struct CatalogError {
    path: PathBuf,
    source: std::io::Error,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentMeta {
    /// Content-Type upstream gave a manifest; None for layers and configs.
    pub media_type: Option<String>,
    /// Upstream served it to a request without an Authorization header: anyone may have it.
    pub public: bool,
    /// `authority/repository` names upstream served (or confirmed) this digest in.
    pub repos: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub public: bool,
}

/// Whether upstream serves a repository to anonymous clients, and when that was last asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoVisibility {
    pub public: bool,
    /// Seconds since the Unix epoch (wall clock: the record outlives restarts).
    pub checked_at: u64,
}

pub struct Catalog {
    dir: PathBuf,
    /// Serialises read-modify-write of sidecars.
    write: Mutex<()>,
}

impl Catalog {
    pub fn open(data_dir: &Path) -> Result<Self, CatalogError> {
        let dir = data_dir.join("catalog");
        for sub in ["content", "tags", "repos"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| CatalogError { path, source })?;
        }
        Ok(Catalog {
            dir,
            write: Mutex::new(()),
        })
    }

    pub fn content(&self, digest: &Digest) -> Option<ContentMeta> {
        read_json(&self.content_path(digest))
    }

    /// Merge what one upstream response taught us about `digest`.
    pub fn record_content(
        &self,
        digest: &Digest,
        media_type: Option<&str>,
        repo: &RepoKey,
        public: bool,
    ) -> Result<(), CatalogError> {
        let _guard = self.write.lock().unwrap();
        let path = self.content_path(digest);
        let mut meta: ContentMeta = read_json(&path).unwrap_or_default();
        let before = meta.clone();
        meta.public |= public;
        meta.repos.insert(repo.to_string());
        if let Some(mt) = media_type {
            meta.media_type = Some(mt.to_string());
        }
        if meta == before {
            return Ok(());
        }
        self.write_json(&path, &meta)
    }

    pub fn tag(&self, repo: &RepoKey, tag: &str) -> Option<TagRecord> {
        read_json(&self.tag_path(repo, tag))
    }

    /// When the record of `repo:tag` last changed (seconds since the Unix epoch): peers that
    /// hold different records for a tag during an outage prefer the newest.
    pub fn tag_changed_at(&self, repo: &RepoKey, tag: &str) -> Option<u64> {
        let modified = std::fs::metadata(self.tag_path(repo, tag))
            .ok()?
            .modified()
            .ok()?;
        modified
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())
    }

    pub fn record_tag(
        &self,
        repo: &RepoKey,
        tag: &str,
        record: &TagRecord,
    ) -> Result<(), CatalogError> {
        let _guard = self.write.lock().unwrap();
        let path = self.tag_path(repo, tag);
        if read_json::<TagRecord>(&path).as_ref() == Some(record) {
            return Ok(());
        }
        self.write_json(&path, record)
    }

    pub fn repo_visibility(&self, repo: &RepoKey) -> Option<RepoVisibility> {
        read_json(&self.repo_path(repo))
    }

    pub fn record_repo_visibility(
        &self,
        repo: &RepoKey,
        visibility: &RepoVisibility,
    ) -> Result<(), CatalogError> {
        let _guard = self.write.lock().unwrap();
        self.write_json(&self.repo_path(repo), visibility)
    }

    /// Forgets what was known about `digest`, whose content left the store, so the catalog
    /// does not grow with every digest ever cached. Tag records stay: one small file per tag,
    /// naming what to fetch again.
    pub fn forget_content(&self, digest: &Digest) -> Result<(), CatalogError> {
        let _guard = self.write.lock().unwrap();
        let path = self.content_path(digest);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(CatalogError { path, source: e })
            }
            _ => Ok(()),
        }
    }

    fn content_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("content")
            .join(format!("{}.json", digest.hex()))
    }

    /// Tags are keyed by a hash: repository names contain slashes and may be long.
    fn tag_path(&self, repo: &RepoKey, tag: &str) -> PathBuf {
        let key = hex::encode(Sha256::digest(format!("{repo}:{tag}")));
        self.dir.join("tags").join(format!("{key}.json"))
    }

    fn repo_path(&self, repo: &RepoKey) -> PathBuf {
        let key = hex::encode(Sha256::digest(repo.as_str()));
        self.dir.join("repos").join(format!("{key}.json"))
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), CatalogError> {
        let err = |source| CatalogError {
            path: path.to_path_buf(),
            source,
        };
        let json = serde_json::to_vec(value).expect("catalog records serialise");
        durable::write_atomic(path, &json, &durable::Options::new()).map_err(err)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn content_meta_merges() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        let d = digest('a');
        assert_eq!(cat.content(&d), None);
        cat.record_content(&d, None, &RepoKey::from_stored("r.test/private"), false)
            .unwrap();
        cat.record_content(
            &d,
            Some("application/x"),
            &RepoKey::from_stored("r.test/other"),
            false,
        )
        .unwrap();
        let meta = cat.content(&d).unwrap();
        assert!(!meta.public);
        assert_eq!(meta.media_type.as_deref(), Some("application/x"));
        assert_eq!(meta.repos.len(), 2);
        cat.record_content(&d, None, &RepoKey::from_stored("r.test/pub"), true)
            .unwrap();
        assert!(cat.content(&d).unwrap().public);
    }

    #[test]
    fn tags_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let rec = TagRecord {
            digest: digest('b').to_string(),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            public: true,
        };
        Catalog::open(dir.path())
            .unwrap()
            .record_tag(&RepoKey::from_stored("r.test/a/b"), "v1", &rec)
            .unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        assert_eq!(
            cat.tag(&RepoKey::from_stored("r.test/a/b"), "v1"),
            Some(rec)
        );
        assert_eq!(cat.tag(&RepoKey::from_stored("r.test/a/b"), "v2"), None);
    }

    #[test]
    fn repo_visibility_persists() {
        let dir = tempfile::tempdir().unwrap();
        let v = RepoVisibility {
            public: true,
            checked_at: 1_700_000_000,
        };
        Catalog::open(dir.path())
            .unwrap()
            .record_repo_visibility(&RepoKey::from_stored("r.test/library/busybox"), &v)
            .unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        assert_eq!(
            cat.repo_visibility(&RepoKey::from_stored("r.test/library/busybox")),
            Some(v)
        );
        assert_eq!(
            cat.repo_visibility(&RepoKey::from_stored("r.test/library/other")),
            None
        );
    }
}
