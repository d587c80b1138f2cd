//! How eddy names one repository of one registry: `<registry authority>/<repository>`. It keys
//! the catalog's tag and repository records and upstream's public/private verdicts, so that
//! `ghcr.io/acme/app` and `quay.io/acme/app` never share a record.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoKey(String);

impl RepoKey {
    /// `authority`: `host[:port]` as clients name the registry; `repository`: the path
    /// within it (`library/busybox`).
    pub fn new(authority: &str, repository: &str) -> Self {
        RepoKey(format!("{authority}/{repository}"))
    }

    /// A key as the catalog stored it (a content record's repository list).
    pub fn from_stored(stored: impl Into<String>) -> Self {
        RepoKey(stored.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_the_authority_and_the_repository() {
        let key = RepoKey::new("registry.test:5000", "library/busybox");
        assert_eq!(key.as_str(), "registry.test:5000/library/busybox");
        assert_eq!(RepoKey::from_stored(key.to_string()), key);
        assert_ne!(key, RepoKey::new("other.test:5000", "library/busybox"));
    }
}
