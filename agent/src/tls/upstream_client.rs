//! The client config for talking to the real registries: system roots plus `--upstream-ca` files.
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::error::TlsError;
use super::provider::provider;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ca::test_ca_pem;

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
