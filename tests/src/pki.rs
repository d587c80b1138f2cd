//! A throwaway test CA and one server certificate for the fake upstream hosts.
//!
//! The server certificate names `registry.test` and `cdn.test` and carries the upstream's
//! IP address as well, so a client can dial the registry by IP (skopeo pushes that way) or
//! by name (ctr, through a private /etc/hosts).
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The files of a test PKI, all under one directory.
pub struct Pki {
    /// PEM of the test CA: what clients (and eddy's `--upstream-ca`) must trust.
    pub ca_cert: PathBuf,
    /// PEM chain and key for the upstream servers.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A directory holding only `ca.crt`: skopeo's `--dest-cert-dir`.
    pub cert_dir: PathBuf,
}

impl Pki {
    /// Create the CA and a server certificate for `names` and `ips` in `dir`.
    pub fn create(dir: &Path, names: &[&str], ips: &[IpAddr]) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate().context("generating the test CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "eddy e2e test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca
            .self_signed(&ca_key)
            .context("self-signing the test CA")?;

        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut server =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        server
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        server.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("upstream"),
        );
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let server_cert = server
            .signed_by(&server_key, &ca_cert, &ca_key)
            .context("signing the server certificate")?;

        let pki = Self {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            cert_dir: dir.join("certs.d"),
        };
        fs::write(&pki.ca_cert, ca_cert.pem())?;
        fs::write(&pki.server_cert, server_cert.pem())?;
        fs::write(&pki.server_key, server_key.serialize_pem())?;
        fs::create_dir_all(&pki.cert_dir)?;
        fs::write(pki.cert_dir.join("ca.crt"), ca_cert.pem())?;
        Ok(pki)
    }
}

/// Write a CA bundle made of the given PEM files (for `SSL_CERT_FILE`, which replaces the
/// system roots in Go programs).
pub fn write_bundle(out: &Path, pems: &[&Path]) -> Result<()> {
    let mut bundle = String::new();
    for pem in pems {
        let text = fs::read_to_string(pem).with_context(|| format!("reading {}", pem.display()))?;
        bundle.push_str(text.trim_end());
        bundle.push('\n');
    }
    fs::write(out, bundle).with_context(|| format!("writing {}", out.display()))
}
