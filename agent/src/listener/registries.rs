//! The registries whose connections eddy terminates (`--registry`, and the registries of
//! `--mirror` and `--fallback`): host names matched against the TLS SNI, and addresses for
//! registries dialled by IP.
use std::net::{IpAddr, SocketAddr};

use crate::{oci::host, tls::RegistryName};

#[derive(Debug, thiserror::Error)]
#[error("--registry {value:?}: not a host name or IP[:PORT]")]
pub struct BadRegistry {
    pub value: String,
}

/// The registries whose connections eddy terminates, as configured with `--registry`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    /// Lower-case host names, matched exactly against the TLS SNI.
    pub hosts: Vec<String>,
    /// Registries dialled by address (no SNI); port None matches any intercepted port.
    pub addrs: Vec<(IpAddr, Option<u16>)>,
}

impl Registries {
    pub fn parse(values: &[String]) -> Result<Self, BadRegistry> {
        let mut out = Registries::default();
        for raw in values {
            let v = raw.trim().to_ascii_lowercase();
            if v.is_empty() {
                continue;
            }
            if let Ok(sa) = v.parse::<SocketAddr>() {
                out.addrs.push((sa.ip(), Some(sa.port())));
            } else if let Ok(ip) = v
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                out.addrs.push((ip, None));
            } else if host::is_host_name(&v) {
                out.hosts.push(v);
            } else {
                return Err(BadRegistry { value: raw.clone() });
            }
        }
        out.hosts.sort();
        out.hosts.dedup();
        Ok(out)
    }

    pub fn has_host(&self, sni: &str) -> bool {
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(sni))
    }

    pub fn has_addr(&self, dst: SocketAddr) -> bool {
        self.addrs
            .iter()
            .any(|(ip, port)| *ip == dst.ip() && port.is_none_or(|p| p == dst.port()))
    }

    /// The names a constrained CA must be able to sign for.
    pub fn names(&self) -> Vec<RegistryName> {
        let mut names: Vec<_> = self.hosts.iter().cloned().map(RegistryName::Dns).collect();
        names.extend(self.addrs.iter().map(|(ip, _)| RegistryName::Ip(*ip)));
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_parse_hosts_and_addresses() {
        let r = Registries::parse(&[
            "GHCR.io".into(),
            "10.0.0.1:32000".into(),
            "10.0.0.2".into(),
            "[fd00::1]:5000".into(),
        ])
        .unwrap();
        assert!(r.has_host("ghcr.io"));
        assert!(!r.has_host("evil.io"));
        assert!(r.has_addr("10.0.0.1:32000".parse().unwrap()));
        assert!(!r.has_addr("10.0.0.1:443".parse().unwrap()));
        assert!(r.has_addr("10.0.0.2:443".parse().unwrap()));
        assert!(r.has_addr("[fd00::1]:5000".parse().unwrap()));
        assert!(matches!(
            Registries::parse(&["not a host".into()]),
            Err(BadRegistry { .. })
        ));
    }
}
