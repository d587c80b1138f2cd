//! The host trust bundle (e.g. /etc/ssl/certs/ca-certificates.crt): `eddy ca install` puts
//! eddy's CA into it, idempotently, and `eddy ca uninstall` takes it back out, leaving every
//! other byte of the bundle as it was, so that uninstalling eddy leaves no trace. Both write
//! through the distro's symlink rather than over it.
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::error::TlsError;
use super::files::write_atomic;

/// Add the CA's PEM to a trust bundle file (e.g. /etc/ssl/certs/ca-certificates.crt) idempotently:
/// if the exact cert is already present, do nothing and return Ok(false); else append (atomic write:
/// temp + fsync + rename, preserving mode and owner) and return Ok(true). A missing bundle is created.
pub fn install_into_bundle(bundle: &Path, ca_pem: &str) -> Result<bool, TlsError> {
    let ca_der = parse_ca(ca_pem)?;
    let target = resolve_bundle(bundle)?.unwrap_or_else(|| bundle.to_path_buf());
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

/// The certificate in `ca_pem`.
fn parse_ca(ca_pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::InvalidCaPem {
        reason: e.to_string(),
    })
}

/// The file `bundle` stands for, through symlinks (RHEL's ca-bundle.crt points into
/// /etc/pki/ca-trust/extracted), so that the distro's link stays a link instead of being
/// replaced by our regular file. None when there is no bundle at all; a dangling link is an
/// error, since the real bundle is elsewhere ("nothing there" would be wrong).
fn resolve_bundle(bundle: &Path) -> Result<Option<PathBuf>, TlsError> {
    match fs::canonicalize(bundle) {
        Ok(target) => Ok(Some(target)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::read_link(bundle) {
            Ok(target) => Err(TlsError::DanglingBundleLink {
                path: bundle.to_path_buf(),
                target,
            }),
            Err(_) => Ok(None),
        },
        Err(source) => Err(TlsError::Read {
            path: bundle.to_path_buf(),
            source,
        }),
    }
}

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Remove every copy of the certificate in `ca_pem` from `bundle`. Returns Ok(false) when it
/// was not there (or the bundle does not exist): nothing is written then.
pub fn remove_from_bundle(bundle: &Path, ca_pem: &str) -> Result<bool, TlsError> {
    let ca = parse_ca(ca_pem)?;
    let Some(target) = resolve_bundle(bundle)? else {
        return Ok(false);
    };
    let read_err = |source| TlsError::Read {
        path: target.clone(),
        source,
    };
    let text = fs::read_to_string(&target).map_err(read_err)?;
    let meta = fs::metadata(&target).map_err(read_err)?;
    let Some(kept) = without_cert(&text, &ca) else {
        return Ok(false);
    };
    write_atomic(
        &target,
        kept.as_bytes(),
        meta.permissions().mode() & 0o7777,
        Some((meta.uid(), meta.gid())),
    )?;
    Ok(true)
}

/// `text` without the PEM blocks that hold `ca` (and the line break after each); None if
/// there is none.
fn without_cert(text: &str, ca: &CertificateDer<'_>) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut removed = false;
    while let Some(start) = rest.find(BEGIN) {
        let Some(end_rel) = rest[start..].find(END) else {
            break;
        };
        let mut end = start + end_rel + END.len();
        let block = &rest[start..end];
        if CertificateDer::from_pem_slice(block.as_bytes()).is_ok_and(|c| c == *ca) {
            out.push_str(&rest[..start]);
            // Drop the block's own line break too.
            if rest[end..].starts_with("\r\n") {
                end += 2;
            } else if rest[end..].starts_with('\n') {
                end += 1;
            }
            removed = true;
        } else {
            out.push_str(&rest[..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    removed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ca::{test_ca_pem, Ca};

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
    fn install_then_uninstall_restores_the_bundle_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create_in(&dir.path().join("ca"), None).unwrap();
        let other = Ca::load_or_create_in(&dir.path().join("other"), None).unwrap();
        let bundle = dir.path().join("bundle.crt");
        let original = format!("# a comment\n{}", other.cert_pem());
        fs::write(&bundle, &original).unwrap();
        fs::set_permissions(&bundle, fs::Permissions::from_mode(0o644)).unwrap();

        assert!(install_into_bundle(&bundle, ca.cert_pem()).unwrap());
        assert!(remove_from_bundle(&bundle, ca.cert_pem()).unwrap());
        assert_eq!(fs::read_to_string(&bundle).unwrap(), original);
        assert_eq!(
            fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // Again: nothing to remove, nothing written.
        assert!(!remove_from_bundle(&bundle, ca.cert_pem()).unwrap());
        assert!(!remove_from_bundle(&dir.path().join("missing"), ca.cert_pem()).unwrap());
    }

    #[test]
    fn removes_every_copy_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create_in(&dir.path().join("ca"), None).unwrap();
        let other = Ca::load_or_create_in(&dir.path().join("other"), None).unwrap();
        let crlf = ca.cert_pem().replace('\n', "\r\n");
        let text = format!("{}{}{crlf}", ca.cert_pem(), other.cert_pem());
        let der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        assert_eq!(without_cert(&text, &der).unwrap(), other.cert_pem());
        assert_eq!(without_cert(other.cert_pem(), &der), None);
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = remove_from_bundle(&dir.path().join("b"), "nope").unwrap_err();
        assert!(err.to_string().contains("not PEM"), "{err}");
    }
}
