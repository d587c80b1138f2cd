//! The node CA: created once, kept on disk, and used to mint one leaf per registry name.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
    SanType, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use super::error::TlsError;
use super::files::write_atomic;
use super::leaf_cache::Leaves;
use super::name::RegistryName;
use super::provider::provider;

const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";
const META_FILE: &str = "ca.json";
const CA_VALIDITY: Duration = Duration::days(3650);
const LEAF_VALIDITY: Duration = Duration::days(90);
/// Backdate certificates a little so that a clock a few minutes behind does not reject them.
const BACKDATE: Duration = Duration::hours(1);

/// What we need, besides the key, to sign with an existing CA: rcgen 0.13 (without its x509-parser
/// feature) cannot read a certificate back, so we keep the subject and constraints we created it with.
#[derive(Debug, Serialize, Deserialize)]
struct CaMeta {
    version: u32,
    common_name: String,
    /// None: unconstrained.
    constraints: Option<Constraints>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct Constraints {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl Constraints {
    fn from_names(names: &[RegistryName]) -> Self {
        let mut c = Constraints::default();
        for name in names {
            match name {
                RegistryName::Dns(dns) => c.dns.push(normalize_dns(dns)),
                RegistryName::Ip(ip) => c.ips.push(*ip),
            }
        }
        c.dns.sort();
        c.dns.dedup();
        c.ips.sort();
        c.ips.dedup();
        c
    }

    /// Mirrors how clients apply a DNS name constraint: the name itself and all its subdomains.
    fn permits(&self, name: &RegistryName) -> bool {
        match name {
            RegistryName::Dns(dns) => {
                let dns = normalize_dns(dns);
                self.dns.iter().any(|c| {
                    dns == *c
                        || dns
                            .strip_suffix(c.as_str())
                            .is_some_and(|rest| rest.ends_with('.'))
                })
            }
            RegistryName::Ip(ip) => self.ips.contains(ip),
        }
    }

    fn to_rcgen(&self) -> NameConstraints {
        let mut permitted: Vec<GeneralSubtree> = self
            .dns
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect();
        permitted.extend(self.ips.iter().map(|ip| {
            let full = if ip.is_ipv4() { 32 } else { 128 };
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(*ip, full))
        }));
        // A name form with no permitted subtree is unconstrained (RFC 5280, and so in Go and
        // webpki), so a CA constrained to DNS names alone could still sign for any IP address.
        // Exclude every name of a form that has nothing permitted.
        let mut excluded = Vec::new();
        if self.dns.is_empty() {
            // The empty DNS constraint matches every DNS name.
            excluded.push(GeneralSubtree::DnsName(String::new()));
        }
        if self.ips.is_empty() {
            excluded.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                0,
            )));
            excluded.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                0,
            )));
        }
        NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: excluded,
        }
    }
}

fn normalize_dns(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// rcgen signs with a `Certificate` as issuer but only reads its subject and key-identifier
    /// method; this one is rebuilt from `CaMeta` and the key, so it is not byte-identical to ca.crt
    /// (see `self_test` for why that is safe).
    issuer: rcgen::Certificate,
    key: KeyPair,
    constraints: Option<Constraints>,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) leaves: Leaves,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .field("constraints", &self.constraints)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Load the CA from `<data_dir>/ca/` (ca.crt, ca.key at mode 0600, ca.json), or create it on
    /// first start. ca.crt is written last and marks a complete CA: without it, leftovers of an
    /// interrupted creation are overwritten; with it, anything missing or damaged is an error, since
    /// a new CA would silently break trust wherever the old one is installed.
    ///
    /// `constrain_to`: Some(names) => the CA certificate carries X.509 NameConstraints permitting only
    /// those DNS names (and their subdomains) and IPs; None => unconstrained. An existing CA keeps the
    /// constraints it was created with; a differing `constrain_to` is logged.
    pub fn load_or_create(
        data_dir: &Path,
        constrain_to: Option<&[RegistryName]>,
    ) -> Result<Ca, TlsError> {
        Self::load_or_create_in(&data_dir.join("ca"), constrain_to)
    }

    /// As `load_or_create`, with the CA in `dir` itself (`--ca-dir`). An existing CA may sit on
    /// a read-only file system, such as a Kubernetes Secret that every node mounts (a cluster CA).
    pub fn load_or_create_in(
        dir: &Path,
        constrain_to: Option<&[RegistryName]>,
    ) -> Result<Ca, TlsError> {
        let dir = dir.to_path_buf();
        let wanted = constrain_to.map(Constraints::from_names);
        let cert_path = dir.join(CERT_FILE);
        let exists = fs::symlink_metadata(&cert_path).is_ok();
        match ensure_private_dir(&dir) {
            Err(TlsError::CreateDir { source, .. })
                if exists && source.kind() == io::ErrorKind::ReadOnlyFilesystem =>
            {
                tracing::debug!(dir = %dir.display(), "CA directory is read-only; using it as it is");
            }
            other => other?,
        }
        match fs::symlink_metadata(&cert_path) {
            Ok(_) => {
                let ca = Self::load(&dir)?;
                if ca.constraints != wanted {
                    tracing::warn!(
                        dir = %dir.display(),
                        ca = ?ca.constraints,
                        configured = ?wanted,
                        "the existing CA was created with other name constraints; it keeps its own, and \
                         connections to names outside them pass through; remove the CA directory and \
                         re-install the new CA to change them"
                    );
                }
                Ok(ca)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(&dir, wanted),
            Err(source) => Err(TlsError::Read {
                path: cert_path,
                source,
            }),
        }
    }

    /// The CA certificate, PEM-encoded, as written to ca.crt.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate (hex), to tell CAs apart in logs and status output.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.cert_der))
    }

    /// The names the CA is constrained to, or None if it is unconstrained.
    pub fn constrained_to(&self) -> Option<Vec<RegistryName>> {
        self.constraints.as_ref().map(|c| {
            let dns = c.dns.iter().cloned().map(RegistryName::Dns);
            dns.chain(c.ips.iter().copied().map(RegistryName::Ip))
                .collect()
        })
    }

    /// Whether a leaf for this name may be minted: with a constrained CA, names outside its
    /// constraints are not covered (the caller passes such connections through untouched instead of
    /// breaking them).
    pub fn covers(&self, name: &RegistryName) -> bool {
        self.constraints.as_ref().is_none_or(|c| c.permits(name))
    }

    fn create(dir: &Path, constraints: Option<Constraints>) -> Result<Ca, TlsError> {
        let meta = CaMeta {
            version: 1,
            // A per-node suffix tells one node's CA from another's in trust stores and logs.
            common_name: format!("eddy node CA {:08x}", rand::random::<u32>()),
            constraints,
        };
        let key = KeyPair::generate().map_err(|source| generate_err("CA key", source))?;
        let now = OffsetDateTime::now_utc();
        let mut params = ca_params(&meta);
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params
            .self_signed(&key)
            .map_err(|source| generate_err("CA certificate", source))?;
        let meta_json = serde_json::to_vec_pretty(&meta).expect("CaMeta serializes");

        // Key and metadata must be durable before ca.crt, which marks the CA as complete.
        write_atomic(
            &dir.join(KEY_FILE),
            key.serialize_pem().as_bytes(),
            0o600,
            None,
        )?;
        write_atomic(&dir.join(META_FILE), &meta_json, 0o600, None)?;
        write_atomic(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644, None)?;
        tracing::info!(dir = %dir.display(), constraints = ?meta.constraints, "created node CA");
        Ok(Ca::new(
            cert.pem(),
            cert.der().clone(),
            cert,
            key,
            meta.constraints,
        ))
    }

    fn load(dir: &Path) -> Result<Ca, TlsError> {
        let corrupt = |file: &str, reason: String| TlsError::CorruptCa {
            path: dir.join(file),
            dir: dir.to_path_buf(),
            reason,
        };
        let read = |file: &str| {
            let path = dir.join(file);
            fs::read_to_string(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => corrupt(file, "missing".into()),
                _ => TlsError::Read { path, source: e },
            })
        };
        let cert_pem = read(CERT_FILE)?;
        let key_pem = read(KEY_FILE)?;
        let meta_json = read(META_FILE)?;

        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| corrupt(CERT_FILE, format!("no PEM certificate: {e}")))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| corrupt(KEY_FILE, format!("not a PEM private key: {e}")))?;
        let meta: CaMeta = serde_json::from_str(&meta_json)
            .map_err(|e| corrupt(META_FILE, format!("not valid CA metadata: {e}")))?;
        // A DER certificate embeds its SubjectPublicKeyInfo verbatim: a cheap and exact match check.
        if !contains(&cert_der, &key.public_key_der()) {
            return Err(corrupt(
                KEY_FILE,
                format!("key does not belong to {CERT_FILE}"),
            ));
        }
        tighten_key_mode(&dir.join(KEY_FILE))?;

        let issuer = ca_params(&meta)
            .self_signed(&key)
            .map_err(|source| generate_err("CA issuer", source))?;
        let ca = Ca::new(cert_pem, cert_der, issuer, key, meta.constraints);
        ca.self_test()
            .map_err(|reason| corrupt(META_FILE, reason))?;
        tracing::info!(dir = %dir.display(), fingerprint = %ca.fingerprint(), "loaded node CA");
        Ok(ca)
    }

    fn new(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        issuer: rcgen::Certificate,
        key: KeyPair,
        constraints: Option<Constraints>,
    ) -> Ca {
        Ca {
            cert_pem,
            cert_der,
            issuer,
            key,
            constraints,
            provider: provider(),
            leaves: Leaves::default(),
        }
    }

    /// Mint a fresh leaf for `name`, without checking `covers` or caching: see `leaf.rs`.
    pub(super) fn mint(
        &self,
        name: &RegistryName,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), TlsError> {
        let generate = |source| generate_err(&format!("leaf for {name}"), source);
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        // Random serials: two leaves for one name must never share issuer and serial.
        let mut serial = rand::random::<[u8; 16]>();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // Clients verify the SAN. No CN: OpenSSL checks a CN against DNS name constraints, which an
        // IP in the CN fails. A non-empty subject keeps the non-critical SAN (rcgen) conformant.
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "eddy");
        params.subject_alt_names = vec![match name {
            RegistryName::Dns(dns) => SanType::DnsName(
                normalize_dns(dns)
                    .try_into()
                    .map_err(|e: rcgen::Error| generate(e))?,
            ),
            RegistryName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;

        let key = KeyPair::generate().map_err(generate)?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(generate)?;
        let certified = CertifiedKey::from_der(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            &self.provider,
        )
        .map_err(|source| TlsError::Config { source })?;
        Ok((Arc::new(certified), (now + LEAF_VALIDITY).into()))
    }

    /// Check that a leaf we mint verifies against ca.crt as a client would check it. The issuer we
    /// sign with is rebuilt from ca.json, so a mismatch (edited metadata, a changed subject layout in
    /// a newer eddy) would otherwise only show up as every intercepted pull failing.
    fn self_test(&self) -> Result<(), String> {
        let name = match self
            .constrained_to()
            .and_then(|names| names.into_iter().next())
        {
            Some(name) => name,
            // With nothing permitted there is nothing to mint.
            None if self.constraints.is_some() => return Ok(()),
            None => RegistryName::Dns("eddy-self-test.invalid".into()),
        };
        let (leaf, _) = self.mint(&name).map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| format!("{CERT_FILE} is not a usable root: {e}"))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        let server_name = match &name {
            RegistryName::Dns(dns) => {
                ServerName::try_from(dns.clone()).map_err(|e| e.to_string())?
            }
            RegistryName::Ip(ip) => ServerName::IpAddress((*ip).into()),
        };
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &server_name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| {
                format!("a leaf minted for {name} does not verify against {CERT_FILE}: {e}")
            })
    }
}

/// Parameters of the CA certificate, minus validity. Deterministic in `meta`, because loading
/// rebuilds the issuer from them and its subject must match ca.crt byte for byte.
fn ca_params(meta: &CaMeta) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "eddy");
    params
        .distinguished_name
        .push(DnType::CommonName, meta.common_name.clone());
    // Path length 0: the CA signs leaves only, never intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = meta.constraints.as_ref().map(Constraints::to_rcgen);
    params
}

fn generate_err(what: &str, source: rcgen::Error) -> TlsError {
    TlsError::Generate {
        what: what.to_string(),
        source,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The CA directory is private (0700), also when it already existed with a looser mode.
fn ensure_private_dir(dir: &Path) -> Result<(), TlsError> {
    let create_err = |source| TlsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(create_err)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(create_err(e)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(create_err)
}

/// A key restored from a backup may have lost its mode; fix it rather than refuse to start.
fn tighten_key_mode(path: &PathBuf) -> Result<(), TlsError> {
    let mode = fs::metadata(path)
        .map_err(|source| TlsError::Read {
            path: path.clone(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "CA key was readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            TlsError::Write {
                path: path.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// A fresh CA in `dir`, as PEM: for the tests of the files that take one.
#[cfg(test)]
pub(crate) fn test_ca_pem(dir: &Path) -> String {
    Ca::load_or_create(dir, None)
        .unwrap()
        .cert_pem()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<RegistryName> {
        list.iter()
            .map(|n| RegistryName::parse(n).unwrap())
            .collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_with_private_modes_and_persisted() {
        let data = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(data.path(), None).unwrap();
        let dir = data.path().join("ca");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            fs::read_to_string(dir.join(CERT_FILE)).unwrap(),
            ca.cert_pem()
        );
        assert!(ca.covers(&RegistryName::Dns("anything.example".into())));

        let again = Ca::load_or_create(data.path(), None).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn loose_modes_are_tightened_on_load() {
        let data = tempfile::tempdir().unwrap();
        Ca::load_or_create(data.path(), None).unwrap();
        let dir = data.path().join("ca");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        Ca::load_or_create(data.path(), None).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    }

    #[test]
    fn damaged_ca_is_an_error_not_a_new_ca() {
        let data = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(data.path(), None).unwrap();
        let dir = data.path().join("ca");
        let key_path = dir.join(KEY_FILE);
        let key = fs::read_to_string(&key_path).unwrap();

        // Half-written key.
        fs::write(&key_path, &key[..key.len() / 2]).unwrap();
        let err = Ca::load_or_create(data.path(), None).unwrap_err();
        assert!(
            matches!(&err, TlsError::CorruptCa { path, .. } if *path == key_path),
            "{err}"
        );
        assert!(err.to_string().contains("not creating a new CA"), "{err}");
        // The certificate that nodes trust is untouched.
        assert_eq!(
            fs::read_to_string(dir.join(CERT_FILE)).unwrap(),
            ca.cert_pem()
        );

        // A valid key that belongs to another CA.
        let other = tempfile::tempdir().unwrap();
        Ca::load_or_create(other.path(), None).unwrap();
        fs::copy(other.path().join("ca").join(KEY_FILE), &key_path).unwrap();
        let err = Ca::load_or_create(data.path(), None).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");

        // Missing key, and edited metadata that would make leaves unverifiable.
        fs::remove_file(&key_path).unwrap();
        let err = Ca::load_or_create(data.path(), None).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        fs::write(&key_path, &key).unwrap();
        let meta_path = dir.join(META_FILE);
        let meta = fs::read_to_string(&meta_path)
            .unwrap()
            .replace("eddy node CA", "edited CA");
        fs::write(&meta_path, meta).unwrap();
        let err = Ca::load_or_create(data.path(), None).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
    }

    #[test]
    fn interrupted_creation_is_redone() {
        // Key and metadata written, crash before ca.crt: nothing can trust this CA yet.
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("ca");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(KEY_FILE), "-----BEGIN PRIV").unwrap();
        let ca = Ca::load_or_create(data.path(), None).unwrap();
        assert_eq!(
            Ca::load_or_create(data.path(), None).unwrap().cert_pem(),
            ca.cert_pem()
        );
    }

    #[test]
    fn constrained_ca_covers_only_configured_names() {
        let data = tempfile::tempdir().unwrap();
        let configured = names(&["ghcr.io", "Registry-1.Docker.IO", "10.1.2.3"]);
        let ca = Ca::load_or_create(data.path(), Some(&configured)).unwrap();
        for yes in [
            "ghcr.io",
            "registry-1.docker.io",
            "pkg.ghcr.io",
            "GHCR.IO.",
            "10.1.2.3",
        ] {
            assert!(ca.covers(&RegistryName::parse(yes).unwrap()), "{yes}");
        }
        for no in ["example.com", "evilghcr.io", "docker.io", "10.1.2.4", "::1"] {
            assert!(!ca.covers(&RegistryName::parse(no).unwrap()), "{no}");
        }

        // Constraints persist, also when the configuration has changed since.
        let reloaded = Ca::load_or_create(data.path(), Some(&names(&["quay.io"]))).unwrap();
        assert_eq!(reloaded.cert_pem(), ca.cert_pem());
        assert!(reloaded.covers(&RegistryName::parse("ghcr.io").unwrap()));
        assert!(!reloaded.covers(&RegistryName::parse("quay.io").unwrap()));
    }

    #[test]
    fn constraint_extension_is_present_and_parsed_by_webpki() {
        let data = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(
            data.path(),
            Some(&names(&["ghcr.io", "registry-1.docker.io"])),
        )
        .unwrap();
        // webpki parses the NameConstraints extension when it makes the cert a trust anchor.
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let nc = roots.roots[0]
            .name_constraints
            .as_ref()
            .expect("name constraints present");
        assert!(contains(nc, b"ghcr.io") && contains(nc, b"registry-1.docker.io"));
        // No IP is permitted, so all are excluded: iPAddress [7] 0.0.0.0 with mask 0.0.0.0.
        assert!(contains(nc, &[0x87, 8, 0, 0, 0, 0, 0, 0, 0, 0]));

        let unconstrained = Ca::load_or_create(tempfile::tempdir().unwrap().path(), None).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(unconstrained.cert_der().clone()).unwrap();
        assert!(roots.roots[0].name_constraints.is_none());
    }
}
