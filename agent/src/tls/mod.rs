//! Trust: the node CA, the leaves it mints per registry name, the host trust bundle, and the
//! client config for talking to the real registries.
//!
//! containerd must trust eddy's CA for interception to work, so the CA is created once per node and
//! kept ([`Ca::load_or_create`]); it can be name-constrained so that a leaked key cannot impersonate
//! hosts other than the configured registries.

mod ca;
mod leaf;
pub mod talos;
mod uninstall;

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};
use rustls::{ClientConfig, RootCertStore};

use crate::node::durable;

pub use ca::Ca;
pub use leaf::{server_config, server_config_for_ip};
pub use uninstall::remove_from_bundle;

/// ALPN offered to clients, most preferred first (rustls servers pick by their own order).
/// containerd's Go client offers both; HTTP/1.1 is preferred because eddy serves a layer over
/// it faster (measured by `cargo xtask bench`: 1.5-1.8 GB/s against about 1.0 GB/s over
/// HTTP/2), and containerd opens a connection per layer anyway.
const ALPN: [&[u8]; 2] = [b"http/1.1", b"h2"];

fn alpn_protocols() -> Vec<Vec<u8>> {
    ALPN.iter().map(|p| p.to_vec()).collect()
}

/// Our one crypto provider, passed explicitly so that nothing depends on a process-global default.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("create directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// The CA directory exists but is damaged. We never silently re-create the CA: a new one would
    /// invalidate the old one everywhere it is already trusted.
    #[error(
        "CA {path} is unusable: {reason}; not creating a new CA, since that would break trust on this node \
         (restore the file, or remove {dir} and re-install the new CA into the trust bundle)"
    )]
    CorruptCa {
        path: PathBuf,
        dir: PathBuf,
        reason: String,
    },
    #[error("generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("invalid registry name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("the CA certificate to install is not PEM: {reason}")]
    InvalidCaPem { reason: String },
    #[error("{path}: {reason}")]
    InvalidPem { path: PathBuf, reason: String },
    #[error("{path} contains no PEM certificates")]
    NoCerts { path: PathBuf },
    #[error("{path}: certificate not usable as a trust root: {source}")]
    BadRoot {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("no trust roots for upstream connections (system roots: {errors})")]
    NoRoots { errors: String },
    #[error("build TLS config: {source}")]
    Config { source: rustls::Error },
    /// Writing a file in place of the link would leave the node's containerd with eddy's
    /// CA as its only root.
    #[error(
        "{path} is a symlink to {target}, which does not exist here (a host path mounted without \
         its target?); not writing through it: pass the link's target as --bundle"
    )]
    DanglingBundleLink { path: PathBuf, target: PathBuf },
}

/// A registry as configured: a DNS host name ("ghcr.io", "registry-1.docker.io") or an IP address
/// (v4/v6). Ports are not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegistryName {
    Dns(String),
    Ip(IpAddr),
}

impl RegistryName {
    /// Parse a configured registry host. DNS names are lowercased and lose a trailing dot, so that
    /// comparisons with SNI are exact; "[::1]" is accepted for IPv6.
    pub fn parse(s: &str) -> Result<Self, TlsError> {
        let invalid = |reason| TlsError::InvalidName {
            name: s.to_string(),
            reason,
        };
        let bare = s
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(RegistryName::Ip(ip));
        }
        let name = s.trim_end_matches('.').to_ascii_lowercase();
        if name.contains(':') {
            return Err(invalid("ports are not part of a registry name"));
        }
        if name.contains('*') {
            return Err(invalid(
                "wildcards are not supported; list each registry host",
            ));
        }
        if name.is_empty() || DnsName::try_from(name.as_str()).is_err() {
            return Err(invalid("not a DNS name or IP address"));
        }
        Ok(RegistryName::Dns(name))
    }
}

impl FromStr for RegistryName {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        Self::parse(s)
    }
}

impl fmt::Display for RegistryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryName::Dns(name) => f.write_str(name),
            RegistryName::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Add the CA's PEM to a trust bundle file (e.g. /etc/ssl/certs/ca-certificates.crt) idempotently:
/// if the exact cert is already present, do nothing and return Ok(false); else append (atomic write:
/// temp + fsync + rename, preserving mode and owner) and return Ok(true). A missing bundle is created.
pub fn install_into_bundle(bundle: &Path, ca_pem: &str) -> Result<bool, TlsError> {
    let ca_der =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::InvalidCaPem {
            reason: e.to_string(),
        })?;
    // Write through symlinks (RHEL's ca-bundle.crt points into /etc/pki/ca-trust/extracted), so the
    // distro's link stays a link instead of being replaced by our regular file.
    let target = match fs::canonicalize(bundle) {
        Ok(target) => target,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Ok(link) = fs::read_link(bundle) {
                return Err(TlsError::DanglingBundleLink {
                    path: bundle.to_path_buf(),
                    target: link,
                });
            }
            bundle.to_path_buf()
        }
        Err(source) => {
            return Err(TlsError::Read {
                path: bundle.to_path_buf(),
                source,
            })
        }
    };
    let (mut contents, mode, owner) = match fs::read(&target) {
        Ok(contents) => {
            let meta = fs::metadata(&target).map_err(|source| TlsError::Read {
                path: target.clone(),
                source,
            })?;
            (
                contents,
                meta.permissions().mode() & 0o7777,
                Some((meta.uid(), meta.gid())),
            )
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), 0o644, None),
        Err(source) => {
            return Err(TlsError::Read {
                path: target,
                source,
            })
        }
    };
    // Compare certificates, not text: the bundle may hold our cert with other line endings.
    // Unparsable sections are skipped; the iterator always moves past them.
    let present = CertificateDer::pem_slice_iter(&contents)
        .filter_map(Result::ok)
        .any(|c| c == ca_der);
    if present {
        return Ok(false);
    }
    if !contents.is_empty() && !contents.ends_with(b"\n") {
        contents.push(b'\n');
    }
    contents.extend_from_slice(ca_pem.trim_end().as_bytes());
    contents.push(b'\n');
    write_atomic(&target, &contents, mode, owner)?;
    Ok(true)
}

/// rustls ClientConfig for talking to upstream registries: system roots (rustls-native-certs; it
/// honours SSL_CERT_FILE / SSL_CERT_DIR) plus optional extra CA files (PEM, may hold several certs).
pub fn upstream_client_config(extra_ca_files: &[PathBuf]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    // Extra files first: a typo in --upstream-ca is the likelier mistake, and it should be reported
    // before anything else.
    for path in extra_ca_files {
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|source| TlsError::BadRoot {
                path: path.clone(),
                source,
            })?;
        }
    }
    let native = rustls_native_certs::load_native_certs();
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    let errors = native
        .errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if !native.errors.is_empty() {
        tracing::warn!(errors = %errors, "some system trust roots could not be loaded");
    }
    tracing::debug!(
        system = added,
        ignored,
        extra = extra_ca_files.len(),
        "upstream trust roots loaded"
    );
    if roots.is_empty() {
        return Err(TlsError::NoRoots {
            errors: if errors.is_empty() {
                "none found".into()
            } else {
                errors
            },
        });
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config { source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/1.1 only upstream: layer downloads then get one TCP connection each, as
    // containerd's own do, instead of sharing one HTTP/2 connection's flow-control window
    // (measured here: distribution over HTTP/2 runs at half its HTTP/1.1 speed).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// All certificates in a PEM file; an unreadable file, bad PEM or no certificate at all is an error.
fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Replace `path` with `contents` so that a crash leaves the old file or the new one, never a torn
/// one, created with `mode` (and `owner`) from the start (see [`crate::node::durable`]).
fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), TlsError> {
    let options = durable::Options::new().mode(mode).owner(owner);
    durable::write_atomic(path, contents, &options).map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_name_parse() {
        assert_eq!(
            RegistryName::parse("GHCR.io.").unwrap(),
            RegistryName::Dns("ghcr.io".into())
        );
        assert_eq!(
            RegistryName::parse("10.0.0.1").unwrap(),
            RegistryName::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            RegistryName::parse("[fd00::1]").unwrap(),
            RegistryName::Ip("fd00::1".parse().unwrap())
        );
        assert!(RegistryName::parse("ghcr.io:443").is_err());
        assert!(RegistryName::parse("*.ghcr.io").is_err());
        assert!(RegistryName::parse("").is_err());
        assert!(RegistryName::parse("a b").is_err());
        assert_eq!(
            RegistryName::parse("fd00::1").unwrap().to_string(),
            "fd00::1"
        );
    }

    fn test_ca_pem(dir: &Path) -> String {
        Ca::load_or_create(dir, None)
            .unwrap()
            .cert_pem()
            .to_string()
    }

    #[test]
    fn a_bundle_link_whose_target_is_missing_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pem = test_ca_pem(dir.path());
        // RHEL's ca-bundle.crt is an absolute link, dangling when only the link is mounted.
        let bundle = dir.path().join("ca-bundle.crt");
        let target = dir.path().join("extracted/tls-ca-bundle.pem");
        std::os::unix::fs::symlink(&target, &bundle).unwrap();
        let err = install_into_bundle(&bundle, &pem).unwrap_err();
        assert!(matches!(err, TlsError::DanglingBundleLink { .. }), "{err}");
        assert!(err.to_string().contains("pass the link's target"), "{err}");
        assert_eq!(
            fs::read_link(&bundle).unwrap(),
            target,
            "the link is untouched"
        );
        assert!(!target.exists());
    }

    #[test]
    fn install_into_bundle_is_idempotent_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let pem = test_ca_pem(dir.path());
        let bundle = dir.path().join("bundle.crt");
        // An existing bundle without a trailing newline, and a mode that is not the default.
        fs::write(
            &bundle,
            "# system roots\n-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----",
        )
        .unwrap();
        fs::set_permissions(&bundle, fs::Permissions::from_mode(0o640)).unwrap();

        assert!(install_into_bundle(&bundle, &pem).unwrap());
        let after_first = fs::read_to_string(&bundle).unwrap();
        assert!(after_first.starts_with("# system roots\n"));
        assert!(after_first.contains("-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----"));
        assert!(after_first.ends_with("-----END CERTIFICATE-----\n"));
        assert_eq!(
            fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
            0o640
        );

        assert!(!install_into_bundle(&bundle, &pem).unwrap());
        assert_eq!(fs::read_to_string(&bundle).unwrap(), after_first);
        let err = install_into_bundle(&bundle, "not a certificate").unwrap_err();
        assert!(matches!(err, TlsError::InvalidCaPem { .. }), "{err}");

        // The same cert with CRLF line endings counts as present.
        let crlf = dir.path().join("crlf.crt");
        fs::write(&crlf, pem.replace('\n', "\r\n")).unwrap();
        assert!(!install_into_bundle(&crlf, &pem).unwrap());
        // No temp files left behind.
        let leftovers = fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp.")
        });
        assert_eq!(leftovers.count(), 0);
    }

    #[test]
    fn install_into_bundle_follows_symlinks_and_creates_missing() {
        let dir = tempfile::tempdir().unwrap();
        let pem = test_ca_pem(dir.path());
        let real = dir.path().join("real.pem");
        fs::write(&real, "").unwrap();
        let link = dir.path().join("link.crt");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(install_into_bundle(&link, &pem).unwrap());
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::read_to_string(&real).unwrap(),
            format!("{}\n", pem.trim_end())
        );

        let fresh = dir.path().join("fresh.crt");
        assert!(install_into_bundle(&fresh, &pem).unwrap());
        assert_eq!(
            fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn upstream_client_config_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = upstream_client_config(std::slice::from_ref(&missing)).unwrap_err();
        assert!(
            matches!(&err, TlsError::Read { path, .. } if *path == missing),
            "{err}"
        );
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "just some text, no PEM here\n").unwrap();
        let err = upstream_client_config(std::slice::from_ref(&empty)).unwrap_err();
        assert!(
            matches!(&err, TlsError::NoCerts { path } if *path == empty),
            "{err}"
        );
        assert!(err.to_string().contains("no PEM certificates"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = upstream_client_config(&[garbage]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidPem { .. }), "{err}");
    }

    #[test]
    fn upstream_client_config_accepts_extra_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pem = test_ca_pem(dir.path());
        let file = dir.path().join("extra.pem");
        // Two certs in one file, as --upstream-ca allows.
        fs::write(&file, format!("{pem}{pem}")).unwrap();
        let config = upstream_client_config(&[file]).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
