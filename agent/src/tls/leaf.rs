//! Leaf certificates on demand: a rustls cert resolver that mints one leaf per registry name with
//! the node CA, and keeps it in a bounded in-memory cache until it nears expiry.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::ca::Ca;
use super::error::TlsError;
use super::name::RegistryName;
use super::provider::alpn_protocols;
use crate::node::sync::lock;

impl Ca {
    /// A leaf for `name`, from the cache or freshly minted. Does not check `covers`.
    fn leaf(&self, name: &RegistryName) -> Result<Arc<CertifiedKey>, TlsError> {
        self.leaves
            .get_or_mint(name, SystemTime::now(), || self.mint(name))
    }
}

/// Picks the leaf for a handshake: by SNI, or by the dialled IP for clients that send no SNI
/// (a client dialling an IP literal must not send one, RFC 6066).
#[derive(Debug)]
struct LeafResolver {
    ca: Arc<Ca>,
    no_sni: Option<IpAddr>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls only reports an SNI that is a valid DNS name.
        let name = match (hello.server_name(), self.no_sni) {
            (Some(sni), _) => RegistryName::Dns(sni.trim_end_matches('.').to_ascii_lowercase()),
            (None, Some(ip)) => RegistryName::Ip(ip),
            (None, None) => {
                tracing::debug!("TLS client sent no SNI; no certificate to present");
                return None;
            }
        };
        // The caller should have passed this connection through; a leaf would not verify anyway.
        if !self.ca.covers(&name) {
            tracing::warn!(%name, "name is outside the CA's constraints; refusing the handshake");
            return None;
        }
        match self.ca.leaf(&name) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::warn!(%name, %error, "could not mint a leaf certificate");
                None
            }
        }
    }
}

/// rustls ServerConfig whose cert resolver mints a leaf per SNI, signed by the CA, cached in memory
/// (bounded) and re-minted before expiry. A handshake without SNI fails: use
/// [`server_config_for_ip`] for those. ALPN: ["h2", "http/1.1"].
pub fn server_config(ca: Arc<Ca>) -> Arc<ServerConfig> {
    build(LeafResolver { ca, no_sni: None })
}

/// For clients that dial an IP (no SNI): a ServerConfig that presents a leaf for that IP (IP SAN).
/// A client that does send SNI gets the leaf for that name, since that is what it will verify.
/// Cached per IP.
pub fn server_config_for_ip(ca: Arc<Ca>, ip: IpAddr) -> Arc<ServerConfig> {
    let mut configs = lock(&ca.leaves.ip_configs);
    if let Some(config) = configs.get(&ip) {
        return config.clone();
    }
    if configs.len() >= ca.leaves.capacity {
        // Cheap to rebuild: the leaves themselves stay cached.
        configs.clear();
    }
    let config = build(LeafResolver {
        ca: ca.clone(),
        no_sni: Some(ip),
    });
    configs.insert(ip, config.clone());
    config
}

fn build(resolver: LeafResolver) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(resolver.ca.provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn_protocols();
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::tls::leaf_cache::Leaves;

    fn ca(dir: &Path, constrain_to: Option<&[&str]>) -> Arc<Ca> {
        let names: Option<Vec<RegistryName>> =
            constrain_to.map(|n| n.iter().map(|n| RegistryName::parse(n).unwrap()).collect());
        Arc::new(Ca::load_or_create(dir, names.as_deref()).unwrap())
    }

    /// A client that trusts only `ca`, as containerd will once the CA is in the host bundle.
    fn client(ca: &Ca, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(ca.provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A real TLS handshake over an in-memory pipe, with one byte echoed to prove the session works.
    /// Returns the negotiated ALPN, or the client's error.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Option<Vec<u8>>, std::io::Error> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&byte).await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(())
        };
        let client = async move {
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            tls.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            assert_eq!(&byte, b"x");
            Ok::<_, std::io::Error>(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        };
        let (server_result, client_result) = tokio::join!(server, client);
        if client_result.is_ok() {
            server_result.unwrap();
        }
        client_result
    }

    fn dns(name: &str) -> ServerName<'static> {
        ServerName::try_from(name.to_string()).unwrap()
    }

    fn ip(addr: &str) -> ServerName<'static> {
        ServerName::IpAddress(addr.parse::<IpAddr>().unwrap().into())
    }

    /// A server that presents one leaf, minted without the `covers` check: what a thief holding the
    /// CA key could produce.
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);
    impl ResolvesServerCert for Fixed {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    fn forged(ca: &Ca, name: &str) -> Arc<ServerConfig> {
        let (key, _) = ca.mint(&RegistryName::parse(name).unwrap()).unwrap();
        let config = ServerConfig::builder_with_provider(ca.provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(key)));
        Arc::new(config)
    }

    /// How rustls reports a webpki name constraint failure.
    const NC: &str = "NameConstraintViolation";

    /// The client rejected the server's certificate, for the reason `why`.
    fn assert_rejected(result: Result<Option<Vec<u8>>, std::io::Error>, why: &str) {
        let err = result.expect_err("client must reject the certificate");
        let tls = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(tls, Some(rustls::Error::InvalidCertificate(_))),
            "{err:?}"
        );
        assert!(err.to_string().contains(why), "{err}");
    }

    #[tokio::test]
    async fn leaf_per_sni_verifies_and_negotiates_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), None);
        let server = server_config(ca.clone());
        for (offered, expected) in [
            (
                vec![b"h2".as_slice(), b"http/1.1"],
                Some(b"http/1.1".to_vec()),
            ),
            (vec![b"h2".as_slice()], Some(b"h2".to_vec())),
            (vec![b"http/1.1".as_slice()], Some(b"http/1.1".to_vec())),
            (vec![], None),
        ] {
            let alpn = handshake(server.clone(), client(&ca, &offered), dns("ghcr.io"))
                .await
                .unwrap();
            assert_eq!(alpn, expected);
        }
        // A client expecting another name rejects the ghcr.io leaf; the resolver mints per SNI,
        // so that second name gets its own, valid leaf.
        handshake(
            server.clone(),
            client(&ca, &[]),
            dns("registry-1.docker.io"),
        )
        .await
        .unwrap();
        // No SNI and no IP fallback: the handshake fails rather than presenting a wrong leaf.
        assert!(handshake(server, client(&ca, &[]), ip("10.0.0.1"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn ip_leaf_for_clients_without_sni() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), None);
        for addr in ["10.1.2.3", "fd00::5"] {
            let server = server_config_for_ip(ca.clone(), addr.parse().unwrap());
            // rustls, like Go, sends no SNI when dialling an IP.
            let alpn = handshake(server, client(&ca, &[b"h2"]), ip(addr))
                .await
                .unwrap();
            assert_eq!(alpn.as_deref(), Some(b"h2".as_slice()));
        }
        let a = server_config_for_ip(ca.clone(), "10.1.2.3".parse().unwrap());
        let b = server_config_for_ip(ca.clone(), "10.1.2.3".parse().unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        // The leaf is for the configured IP, not whatever the client dialled.
        let wrong = server_config_for_ip(ca.clone(), "10.9.9.9".parse().unwrap());
        assert_rejected(
            handshake(wrong, client(&ca, &[]), ip("10.1.2.3")).await,
            "not valid for name",
        );
    }

    #[tokio::test]
    async fn name_constraints_bite() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), Some(&["ghcr.io", "registry-1.docker.io"]));
        let server = server_config(ca.clone());
        handshake(server.clone(), client(&ca, &[]), dns("ghcr.io"))
            .await
            .unwrap();
        handshake(server.clone(), client(&ca, &[]), dns("pkg.ghcr.io"))
            .await
            .unwrap();
        // The resolver refuses names outside the constraints...
        assert!(handshake(server, client(&ca, &[]), dns("example.com"))
            .await
            .is_err());
        // ...and a leaf minted anyway is rejected by the client's webpki verification.
        assert_rejected(
            handshake(
                forged(&ca, "example.com"),
                client(&ca, &[]),
                dns("example.com"),
            )
            .await,
            NC,
        );
        // No IP was permitted, so IP leaves are excluded too (an unlisted name form would be open).
        assert_rejected(
            handshake(forged(&ca, "10.1.2.3"), client(&ca, &[]), ip("10.1.2.3")).await,
            NC,
        );
    }

    #[tokio::test]
    async fn ip_only_constraints_exclude_dns_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), Some(&["10.1.2.3"]));
        let server = server_config_for_ip(ca.clone(), "10.1.2.3".parse().unwrap());
        handshake(server, client(&ca, &[]), ip("10.1.2.3"))
            .await
            .unwrap();
        assert_rejected(
            handshake(forged(&ca, "10.1.2.4"), client(&ca, &[]), ip("10.1.2.4")).await,
            NC,
        );
        assert_rejected(
            handshake(forged(&ca, "ghcr.io"), client(&ca, &[]), dns("ghcr.io")).await,
            NC,
        );
    }

    #[test]
    fn cache_reuses_renews_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), None);
        let leaves = Leaves::with_capacity(2);
        let now = SystemTime::now();
        let name = |n: &str| RegistryName::parse(n).unwrap();
        // Expiry follows the test's clock, not the wall clock.
        let get = |n: &str, at: SystemTime| {
            let mint = || {
                Ok((
                    ca.mint(&name(n))?.0,
                    at + Duration::from_secs(90 * 24 * 3600),
                ))
            };
            leaves.get_or_mint(&name(n), at, mint).unwrap()
        };

        let first = get("ghcr.io", now);
        assert!(Arc::ptr_eq(&first, &get("ghcr.io", now)));
        // 61 days on, a 90-day leaf is within RENEW_BEFORE of expiry: re-minted.
        let later = now + Duration::from_secs(61 * 24 * 3600);
        let renewed = get("ghcr.io", later);
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert!(Arc::ptr_eq(&renewed, &get("ghcr.io", later)));

        get("quay.io", now);
        get("gcr.io", now);
        let cached = leaves.leaves.lock().unwrap();
        assert_eq!(cached.len(), 2);
        // quay.io was minted at `now`, renewed ghcr.io at `later`: quay.io went first.
        assert!(cached.contains_key(&name("ghcr.io")) && cached.contains_key(&name("gcr.io")));
    }
}
