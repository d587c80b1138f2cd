//! Classify a redirected connection from its first bytes, without consuming them: the
//! chosen route (TLS termination, plain HTTP, passthrough) then reads the stream from its
//! start, and a passthrough splices exactly what the client sent.
use std::time::Duration;

use tls_parser::{
    parse_tls_extensions, parse_tls_plaintext, TlsExtension, TlsMessage, TlsMessageHandshake,
};
use tokio::net::TcpStream;

/// The most we peek at. A ClientHello with post-quantum key shares is ~1.8 KiB; one TLS
/// record is at most 16 KiB plus its header.
const MAX_PEEK: usize = 16 * 1024 + 5;
/// The first peek: a plain HTTP request line, or a TLS record header and most ClientHellos.
const FIRST_PEEK: usize = 2048;
/// How long a client may take to send its first bytes before we stop waiting and pass the
/// connection through (a server-speaks-first protocol on an intercepted port).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A TLS ClientHello, with its SNI host name if it sent one.
    Tls { sni: Option<String> },
    /// A plain HTTP request for the registry API (`/v2...`).
    HttpRegistry,
    /// Anything else, or nothing in time.
    Other,
}

/// Peek at the stream until its first bytes can be classified.
pub async fn classify(stream: &TcpStream) -> Hello {
    // Start small and grow to what the record header asks for: thousands of idle clients
    // must not each pin a 16 KiB buffer while they say nothing.
    let mut buf = vec![0u8; FIRST_PEEK];
    let deadline = tokio::time::Instant::now() + FIRST_BYTES_TIMEOUT;
    let mut last_len = 0;
    // Bounded: each round needs more bytes than the last, and the deadline caps the wait.
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Hello::Other,
        };
        if n == 0 {
            return Hello::Other;
        }
        match classify_bytes(&buf[..n]) {
            Some(hello) => return hello,
            None if n == MAX_PEEK => return Hello::Other,
            None if n == buf.len() => {
                let wanted = match buf[0] {
                    0x16 if n >= 5 => 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize,
                    _ => n * 2,
                };
                buf.resize(wanted.clamp(n + 1, MAX_PEEK), 0);
                continue;
            }
            None => {}
        }
        if n == last_len {
            // peek returns what is queued at once; wait for more to arrive.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last_len = n;
        if tokio::time::Instant::now() >= deadline {
            return Hello::Other;
        }
    }
}

/// `None`: not enough bytes yet to decide.
pub fn classify_bytes(b: &[u8]) -> Option<Hello> {
    match b.first()? {
        // TLS handshake record.
        0x16 => classify_tls(b),
        b'A'..=b'Z' => classify_http(b),
        _ => Some(Hello::Other),
    }
}

fn classify_tls(b: &[u8]) -> Option<Hello> {
    if b.len() < 5 {
        return None;
    }
    let record_len = u16::from_be_bytes([b[3], b[4]]) as usize;
    if b.len() < 5 + record_len {
        return None;
    }
    let Ok((_, record)) = parse_tls_plaintext(&b[..5 + record_len]) else {
        return Some(Hello::Other);
    };
    let sni = record.msg.iter().find_map(|msg| match msg {
        TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) => Some(
            hello
                .ext
                .and_then(|ext| parse_tls_extensions(ext).ok())
                .and_then(|(_, exts)| {
                    exts.into_iter().find_map(|e| match e {
                        TlsExtension::SNI(names) => names
                            .first()
                            .and_then(|(_, name)| std::str::from_utf8(name).ok())
                            .map(|s| s.to_ascii_lowercase()),
                        _ => None,
                    })
                }),
        ),
        _ => None,
    });
    match sni {
        Some(sni) => Some(Hello::Tls { sni }),
        None => Some(Hello::Other),
    }
}

/// Methods a registry client sends.
const METHODS: [&[u8]; 6] = [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"PATCH ", b"DELETE "];

/// Decide as soon as the bytes can no longer become `<METHOD> /v2`: a client of some other
/// protocol may send a few bytes and wait for the server, and must not be held up.
fn classify_http(b: &[u8]) -> Option<Hello> {
    let Some(method) = METHODS.iter().find(|m| b.starts_with(m)) else {
        // Still a prefix of a method? Then wait for more; otherwise it is not HTTP.
        let partial = METHODS.iter().any(|m| m.starts_with(b));
        return if partial { None } else { Some(Hello::Other) };
    };
    let path = &b[method.len()..];
    if path.starts_with(b"/v2") {
        Some(Hello::HttpRegistry)
    } else if b"/v2".starts_with(path) {
        None
    } else {
        Some(Hello::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello produced by rustls for `ghcr.io`.
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = match sni {
            Some(host) => rustls::pki_types::ServerName::try_from(host.to_string()).unwrap(),
            None => rustls::pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([10, 0, 0, 1]).into(),
            ),
        };
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_sni_in_a_real_client_hello() {
        let hello = client_hello(Some("GHCR.io"));
        assert_eq!(
            classify_bytes(&hello),
            Some(Hello::Tls {
                sni: Some("ghcr.io".into())
            })
        );
        // Partial records wait for more bytes.
        assert_eq!(classify_bytes(&hello[..hello.len() - 1]), None);
        assert_eq!(classify_bytes(&hello[..3]), None);
    }

    /// ClientHellos captured from real clients (fuzz/seeds/capture-client-hellos.sh), also
    /// the fuzzer's seeds: Go's crypto/tls as containerd's ctr and skopeo send it, curl and
    /// openssl.
    #[test]
    fn captured_client_hellos() {
        // Cargo names the crate's directory at run time; a shared target dir may hold a test
        // binary built from another checkout.
        let manifest_dir =
            std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
        let seeds = format!("{manifest_dir}/../fuzz/seeds/peek_route/");
        let cases = [
            ("ctr-go", Some("ghcr.io")),
            ("skopeo-go", Some("ghcr.io")),
            ("curl", Some("ghcr.io")),
            ("curl-http2", Some("ghcr.io")),
            ("openssl-s_client", Some("ghcr.io")),
            ("openssl-tls12", Some("registry.test")),
            ("openssl-no-sni", None),
        ];
        for (name, sni) in cases {
            let hello = std::fs::read(format!("{seeds}{name}")).unwrap();
            assert_eq!(
                classify_bytes(&hello),
                Some(Hello::Tls {
                    sni: sni.map(String::from)
                }),
                "{name}"
            );
        }
    }

    #[test]
    fn a_client_dialling_an_ip_sends_no_sni() {
        assert_eq!(
            classify_bytes(&client_hello(None)),
            Some(Hello::Tls { sni: None })
        );
    }

    #[test]
    fn plain_http_registry_requests() {
        assert_eq!(
            classify_bytes(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Hello::HttpRegistry)
        );
        assert_eq!(
            classify_bytes(b"HEAD /v2/library/busybox/manifests/latest HTTP/1.1\r\n"),
            Some(Hello::HttpRegistry)
        );
        assert_eq!(
            classify_bytes(b"GET /index.html HTTP/1.1\r\n"),
            Some(Hello::Other)
        );
        assert_eq!(classify_bytes(b"GE"), None);
        assert_eq!(classify_bytes(b"GET /v"), None);
        // A short message of another protocol is decided at once, not after a timeout.
        assert_eq!(classify_bytes(b"DOWNLOAD 42"), Some(Hello::Other));
        assert_eq!(classify_bytes(b"GETX"), Some(Hello::Other));
        assert_eq!(classify_bytes(b"SSH-2.0-OpenSSH\r\n"), Some(Hello::Other));
        assert_eq!(classify_bytes(b"\x00\x01"), Some(Hello::Other));
    }
}
