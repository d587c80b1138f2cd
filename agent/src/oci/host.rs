//! Host names as registries and peers are named: a DNS name's syntax, and `HOST[:PORT]`.
//! The one place they are parsed, for flags, chains and bootstrap addresses alike.
use std::net::IpAddr;

/// A DNS name: dot-separated labels of letters, digits and inner hyphens.
pub fn is_host_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `HOST`, `HOST:PORT`, `[V6]:PORT`, a bare IP; lower case, validated.
pub fn split_host_port(raw: &str) -> Option<(String, Option<u16>)> {
    if raw.is_empty() || raw.contains(['@', '?', '#', '/', ' ']) {
        return None;
    }
    let raw = raw.to_ascii_lowercase();
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some((ip.to_string(), None));
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip: std::net::Ipv6Addr = ip.parse().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (ip.to_string(), port)
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (raw.clone(), None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0)?),
        None => None,
    };
    let valid_host = host.parse::<IpAddr>().is_ok() || is_host_name(&host);
    valid_host.then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_dns_labels() {
        for yes in ["ghcr.io", "registry-1.docker.io", "a", "x1.y-2.z"] {
            assert!(is_host_name(yes), "{yes}");
        }
        for no in [
            "",
            "-a.io",
            "a-.io",
            "a..io",
            "a_b.io",
            "a b",
            "a:5000",
            &"a".repeat(64),
        ] {
            assert!(!is_host_name(no), "{no}");
        }
    }

    #[test]
    fn host_and_port_split_and_validate() {
        assert_eq!(split_host_port("GHCR.io"), Some(("ghcr.io".into(), None)));
        assert_eq!(
            split_host_port("anubis:32000"),
            Some(("anubis".into(), Some(32000)))
        );
        assert_eq!(
            split_host_port("[fd00::1]:5000"),
            Some(("fd00::1".into(), Some(5000)))
        );
        assert_eq!(split_host_port("10.0.0.1"), Some(("10.0.0.1".into(), None)));
        for no in ["", "a:0", "a:x", "a/b", "u@a", "[fd00::1", "bad host"] {
            assert_eq!(split_host_port(no), None, "{no}");
        }
    }
}
