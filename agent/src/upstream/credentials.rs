//! Node-level upstream credentials (`--upstream-auth-file`): a Docker config.json, which is
//! what a `kubernetes.io/dockerconfigjson` Secret holds.
//!
//! They mean what credentials in containerd's own config mean: any client on the node may
//! pull what they can read. eddy uses them for requests that come WITHOUT credentials of
//! their own, so anonymous pulls stop hitting anonymous rate limits and private images need
//! no imagePullSecret in every namespace. A request with its own `Authorization` is
//! untouched (and its content keeps the per-client check).
//!
//! The file is re-read when its modification time changes (a Secret update swaps the
//! mounted file), checked at most once per [`RELOAD_CHECK`]. A file that fails to parse at
//! start is an error; on a reload it is logged and the previous credentials stay.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use http::{HeaderValue, Uri};
use serde::Deserialize;
use tracing::{info, warn};

use crate::upstream::token::TokenClient;

/// How often the file's modification time is looked at.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// A config.json is small; a larger file is not one.
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("--upstream-auth-file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// `Basic base64(user:password)` per registry host (lower case, with a port if not 443).
type Entries = HashMap<String, HeaderValue>;

pub struct NodeCredentials {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    entries: Entries,
    modified: Option<SystemTime>,
    checked: Instant,
}

impl NodeCredentials {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let (entries, modified) = read(path).map_err(|reason| CredentialsError::File {
            path: path.to_path_buf(),
            reason,
        })?;
        info!(path = %path.display(), hosts = ?sorted_hosts(&entries), "loaded upstream credentials");
        Ok(NodeCredentials {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                entries,
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// The Basic credentials for `authority` (`host[:port]`), re-reading the file if it
    /// changed.
    pub fn basic_for(&self, authority: &str) -> Option<HeaderValue> {
        let mut state = self.state.lock().unwrap();
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != state.modified {
                match read(&self.path) {
                    Ok((entries, modified)) => {
                        info!(path = %self.path.display(), hosts = ?sorted_hosts(&entries), "reloaded upstream credentials");
                        state.entries = entries;
                        state.modified = modified;
                    }
                    Err(reason) => {
                        // Keep what worked; look again when the file changes once more.
                        warn!(path = %self.path.display(), %reason, "upstream credentials not reloaded; keeping the previous ones");
                        state.modified = modified;
                    }
                }
            }
        }
        state.entries.get(&authority.to_ascii_lowercase()).cloned()
    }

    /// The `Authorization` for a credential-less request to repository `name` at `probe`'s
    /// registry, if the node has credentials for it (a pull token from the registry's realm
    /// obtained with them, or Basic auth where the registry asks for that).
    pub async fn authorization(
        &self,
        tokens: &TokenClient,
        authority: &str,
        name: &str,
        probe: &Uri,
    ) -> Option<HeaderValue> {
        let basic = self.basic_for(authority)?;
        match tokens.authorization(probe, name, Some(&basic)).await {
            Ok(auth) => auth,
            Err(e) => {
                warn!(registry = authority, error = %e, "no token with the node's credentials; the request goes without");
                None
            }
        }
    }
}

fn sorted_hosts(entries: &Entries) -> Vec<&str> {
    let mut hosts: Vec<&str> = entries.keys().map(String::as_str).collect();
    hosts.sort_unstable();
    hosts
}

fn read(path: &Path) -> Result<(Entries, Option<SystemTime>), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_FILE {
        return Err(format!(
            "{} bytes is too large for a config.json",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    Ok((parse(&bytes)?, meta.modified().ok()))
}

#[derive(Deserialize)]
struct DockerConfig {
    /// In key order: keys that name one registry (`quay.io`, `https://Quay.io/v1/`) then
    /// resolve the same way every time the file is read (the last in order wins).
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Parse a Docker config.json's `auths`. Every entry must yield credentials: a Secret with a
/// broken entry is better reported than half used.
pub fn parse(bytes: &[u8]) -> Result<Entries, String> {
    let config: DockerConfig =
        serde_json::from_slice(bytes).map_err(|e| format!("not a Docker config.json: {e}"))?;
    let mut out = Entries::new();
    for (key, entry) in config.auths {
        let host =
            registry_host(&key).ok_or_else(|| format!("auths: {key:?} names no registry"))?;
        let user_pass = match (&entry.auth, &entry.username, &entry.password) {
            (Some(auth), _, _) if !auth.is_empty() => {
                let decoded = STANDARD
                    .decode(auth.trim())
                    .map_err(|_| format!("auths[{key:?}].auth: not base64"))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| format!("auths[{key:?}].auth: not UTF-8"))?;
                if !text.contains(':') {
                    return Err(format!("auths[{key:?}].auth: not user:password"));
                }
                text
            }
            (_, Some(user), Some(password)) => format!("{user}:{password}"),
            _ => {
                return Err(format!(
                    "auths[{key:?}]: neither auth nor username and password"
                ))
            }
        };
        let value = HeaderValue::try_from(format!("Basic {}", STANDARD.encode(user_pass)))
            .map_err(|_| format!("auths[{key:?}]: credentials are not a header value"))?;
        for alias in aliases(&host) {
            out.insert(alias, value.clone());
        }
    }
    Ok(out)
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `ghcr.io` → `ghcr.io`;
/// `registry.test:5000` stays; `:443` is dropped (authorities are written without it).
fn registry_host(key: &str) -> Option<String> {
    let rest = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = rest.split('/').next()?.to_ascii_lowercase();
    let host = host.strip_suffix(":443").unwrap_or(&host).to_string();
    (!host.is_empty()).then_some(host)
}

/// Docker Hub is configured as `index.docker.io` or `docker.io`, but pulled from
/// `registry-1.docker.io`.
fn aliases(host: &str) -> Vec<String> {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => vec![
            "docker.io".into(),
            "index.docker.io".into(),
            "registry-1.docker.io".into(),
        ],
        _ => vec![host.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user_pass: &str) -> HeaderValue {
        HeaderValue::try_from(format!("Basic {}", STANDARD.encode(user_pass))).unwrap()
    }

    #[test]
    fn parses_dockerconfigjson() {
        let json = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpzZWNyZXQ="},
            "ghcr.io": {"username": "bot", "password": "p:w"},
            "registry.test:5000": {"auth": "YTpi", "email": "x@y"},
            "quay.io:443": {"username": "q", "password": "r"}
        }, "credsStore": "desktop"}"#;
        let e = parse(json).unwrap();
        assert_eq!(e["registry-1.docker.io"], basic("user:secret"));
        assert_eq!(e["docker.io"], basic("user:secret"));
        assert_eq!(e["ghcr.io"], basic("bot:p:w"));
        assert_eq!(e["registry.test:5000"], basic("a:b"));
        assert_eq!(e["quay.io"], basic("q:r"));
        assert_eq!(parse(b"{}").unwrap().len(), 0);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = |json: &str| parse(json.as_bytes()).unwrap_err();
        assert!(err("not json").starts_with("not a Docker config.json"));
        assert!(err(r#"{"auths": {"r.test": {"auth": "%%%"}}}"#).contains("not base64"));
        assert!(err(r#"{"auths": {"r.test": {"auth": "dXNlcg=="}}}"#).contains("not user:password"));
        assert!(err(r#"{"auths": {"r.test": {"username": "u"}}}"#).contains("neither auth"));
        assert!(err(r#"{"auths": {"": {"auth": "YTpi"}}}"#).contains("names no registry"));
    }

    #[test]
    fn errors_stay_on_one_line_whatever_the_key() {
        // A registry key with a newline in it (JSON allows "\n") must not split the error.
        let e = parse(br#"{"auths": {"r.test\nx": {"auth": "%%%"}}}"#).unwrap_err();
        assert!(!e.contains('\n'), "{e:?}");
        assert!(e.contains(r#""r.test\nx""#), "{e}");
    }

    #[test]
    fn reloads_when_the_file_changes_and_keeps_the_old_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {"r.test": {"auth": "YTpi"}}}"#).unwrap();
        let creds = NodeCredentials::load(&path).unwrap();
        assert_eq!(creds.basic_for("R.test"), Some(basic("a:b")));
        assert_eq!(creds.basic_for("other.test"), None);

        let touch = |content: &str, secs: u64| {
            std::fs::write(&path, content).unwrap();
            let t = SystemTime::now() + Duration::from_secs(secs);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
            creds.state.lock().unwrap().checked -= RELOAD_CHECK;
        };
        touch(r#"{"auths": {"r.test": {"auth": "Yzpk"}}}"#, 10);
        assert_eq!(creds.basic_for("r.test"), Some(basic("c:d")));
        touch("{ broken", 20);
        assert_eq!(creds.basic_for("r.test"), Some(basic("c:d")), "kept");
        let missing = dir.path().join("missing.json");
        let e = NodeCredentials::load(&missing).err().unwrap().to_string();
        assert!(
            e.starts_with("--upstream-auth-file ") && e.contains("missing.json"),
            "{e}"
        );
    }

    /// Found by the docker_config fuzz target: two keys naming one registry gave whichever
    /// credentials a randomly seeded HashMap listed last.
    #[test]
    fn keys_naming_one_registry_resolve_the_same_way_every_time() {
        let config = br#"{"auths":{
            "quay.io":{"username":"first","password":"p"},
            "https://Quay.io/v1/":{"username":"second","password":"p"},
            "QUAY.IO:443":{"username":"third","password":"p"}}}"#;
        let first = parse(config).unwrap();
        for _ in 0..50 {
            assert_eq!(parse(config).unwrap(), first);
        }
    }
}
