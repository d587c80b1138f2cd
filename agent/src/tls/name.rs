//! The name a registry is configured, and minted a leaf, under: a DNS host name or an IP address.
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use rustls::pki_types::DnsName;

use super::error::TlsError;

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
}
