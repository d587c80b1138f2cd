//! `eddy ca uninstall`: take eddy's CA back out of a host trust bundle, leaving every other
//! byte of the bundle as it was, so that uninstalling eddy leaves no trace.
use std::{
    fs, io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use rustls::pki_types::{pem::PemObject, CertificateDer};

use super::{write_atomic, TlsError};

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// Remove every copy of the certificate in `ca_pem` from `bundle`. Returns Ok(false) when it
/// was not there (or the bundle does not exist): nothing is written then.
pub fn remove_from_bundle(bundle: &Path, ca_pem: &str) -> Result<bool, TlsError> {
    let ca =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::InvalidCaPem {
            reason: e.to_string(),
        })?;
    // As install does: write through the distro's symlink, not over it.
    let target = match fs::canonicalize(bundle) {
        Ok(t) => t,
        // A dangling link: the real bundle is elsewhere, so "nothing to remove" would be wrong.
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::read_link(bundle) {
            Ok(target) => {
                return Err(TlsError::DanglingBundleLink {
                    path: bundle.to_path_buf(),
                    target,
                })
            }
            Err(_) => return Ok(false),
        },
        Err(source) => {
            return Err(TlsError::Read {
                path: bundle.to_path_buf(),
                source,
            })
        }
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
    use crate::tls::{install_into_bundle, Ca};

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
