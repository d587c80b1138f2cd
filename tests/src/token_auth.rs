//! Bearer-token auth as Docker Hub and GHCR do it: a separate token host hands out JWTs that
//! the registry (distribution 2.8.2, `auth: token`) verifies.
//!
//! - [`SigningKey`]: a P-256 key and a self-signed certificate for it. The certificate is the
//!   registry's `rootcertbundle`; every token carries it in its `x5c` header, which is how
//!   distribution finds (and verifies) the signing key.
//! - [`serve`]: the token server itself (run as `eddy-probe token-server` inside the upstream
//!   netns): HTTPS (tokio-rustls), `GET /token?service=..&scope=..` with optional Basic auth,
//!   and containerd's OAuth `POST /token` (grant_type=password). ES256 tokens signed with ring.
//!   Every request is logged as one JSON line, so a test can count them.
//! - [`TokenServer`]: the harness side: starts it and reads its log.
//!
//! Grants: an anonymous request gets `pull` on the public repositories only; a request with
//! valid credentials gets `pull` and `push` on public and private ones; anything else asked
//! for is left out of the token (as Docker Hub does: a token with less access, and the
//! registry answers it with 401 insufficient_scope). Wrong credentials get 401.
use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context, Result};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use rcgen::{CertificateParams, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{netns::Netns, pki::Pki, process::ProcessGuard};

/// The token host's name (in the test PKI's server certificate).
pub const AUTH_HOST: &str = "auth.test";
/// The `service` (and token audience) the registry expects.
pub const TOKEN_SERVICE: &str = "registry.test";
/// The `iss` the registry trusts.
pub const TOKEN_ISSUER: &str = "eddy-test";
/// Token lifetime in seconds.
pub const EXPIRES_IN: u64 = 300;

/// The token signing key (PKCS#8 DER) and its self-signed certificate (PEM for the
/// registry's `rootcertbundle`, DER for the tokens' `x5c`).
pub struct SigningKey {
    pub cert_pem: PathBuf,
    pub cert_der: PathBuf,
    pub key_der: PathBuf,
}

impl SigningKey {
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating the token signing key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "eddy e2e token signer");
        let cert = params
            .self_signed(&key)
            .context("self-signing the token certificate")?;
        let keys = Self {
            cert_pem: dir.join("token-signer.pem"),
            cert_der: dir.join("token-signer.der"),
            key_der: dir.join("token-signer.key.der"),
        };
        fs::write(&keys.cert_pem, cert.pem())?;
        fs::write(&keys.cert_der, cert.der())?;
        fs::write(&keys.key_der, key.serialize_der())?;
        Ok(keys)
    }

    /// The registry config section for token auth with this key.
    pub fn registry_auth_config(&self, realm: &str) -> String {
        format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    \
             issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.cert_pem.display()
        )
    }
}

/// Who gets what.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Anonymous pull allowed.
    pub public: Vec<String>,
    /// Pull (and push) with valid credentials only.
    pub private: Vec<String>,
    /// `user:password` pairs.
    pub users: Vec<(String, String)>,
}

/// One line of the token server's log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    pub service: Option<String>,
    /// The scopes asked for, as sent (`repository:NAME:ACTIONS`).
    pub scopes: Vec<String>,
    /// The authenticated user; None for anonymous requests.
    pub user: Option<String>,
    /// Whether credentials were presented (valid or not).
    pub credentials: bool,
    pub status: u16,
    /// What the token grants, `repository:NAME:ACTIONS` each.
    pub granted: Vec<String>,
}

/// A token's claims, as minted.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

#[derive(Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

struct Minter {
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    x5c: String,
}

impl Minter {
    fn load(key_der: &Path, cert_der: &Path) -> Result<Self> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = fs::read(key_der).with_context(|| format!("reading {}", key_der.display()))?;
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &rng,
        )
        .map_err(|e| anyhow::anyhow!("loading the signing key: {e}"))?;
        let cert = fs::read(cert_der).with_context(|| format!("reading {}", cert_der.display()))?;
        Ok(Self {
            key,
            rng,
            x5c: STANDARD.encode(cert),
        })
    }

    fn mint(&self, subject: &str, access: Vec<Access>) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = Claims {
            iss: TOKEN_ISSUER,
            sub: subject,
            aud: TOKEN_SERVICE,
            exp: now + EXPIRES_IN,
            nbf: now.saturating_sub(5),
            iat: now,
            jti: hex::encode(rand::random::<[u8; 12]>()),
            access,
        };
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
        );
        let signature = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// What `eddy-probe token-server` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub signing_cert_der: PathBuf,
    pub signing_key_der: PathBuf,
    pub grants: Grants,
    pub log: PathBuf,
    pub max: Duration,
}

struct ServerState {
    minter: Minter,
    grants: Grants,
    log: Mutex<fs::File>,
}

/// Run the token server until `config.max` passes. Prints "ready" once listening.
pub fn serve(config: ServeConfig) -> Result<()> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&config.tls_cert)
        .with_context(|| format!("reading {}", config.tls_cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the TLS certificate")?;
    let key = PrivateKeyDer::from_pem_file(&config.tls_key)
        .with_context(|| format!("reading {}", config.tls_key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let state = Arc::new(ServerState {
        minter: Minter::load(&config.signing_key_der, &config.signing_cert_der)?,
        grants: config.grants.clone(),
        log: Mutex::new(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&config.log)
                .with_context(|| format!("opening {}", config.log.display()))?,
        ),
    });

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("bind {}", config.listen))?;
        println!("ready");
        std::io::stdout().flush()?;
        let accept = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(60), async {
                        let tls = acceptor.accept(stream).await?;
                        connection(tls, &state).await
                    })
                    .await;
                });
            }
        };
        let _ = tokio::time::timeout(config.max, accept).await;
        Ok(())
    })
}

/// HTTP/1.1 with keep-alive: one request after another until the client closes.
async fn connection<S>(mut stream: S, state: &ServerState) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        // Read the head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return Ok(());
            }
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or("").split_whitespace();
        let method = request_line.next().unwrap_or("").to_string();
        let target = request_line.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            .min(1 << 20);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);

        let (status, json, www) = answer(state, &method, &target, header("authorization"), &body);
        let mut response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            if status == 200 { "OK" } else { "Error" },
            json.len()
        );
        if let Some(www) = www {
            response.push_str(&format!("WWW-Authenticate: {www}\r\n"));
        }
        response.push_str("\r\n");
        response.push_str(&json);
        stream.write_all(response.as_bytes()).await?;
        stream.flush().await?;
    }
}

/// The status, JSON body and (for 401) the challenge for one request; logs it.
fn answer(
    state: &ServerState,
    method: &str,
    target: &str,
    authorization: Option<String>,
    body: &[u8],
) -> (u16, String, Option<String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut service = None;
    let mut scopes = Vec::new();
    let mut form_user = None;
    let mut form_password = None;
    let mut add = |k: &str, v: String| match k {
        "service" => service = Some(v),
        // The OAuth form carries space-separated scopes in one field.
        "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(String::from)),
        "username" => form_user = Some(v),
        "password" => form_password = Some(v),
        _ => {}
    };
    for (k, v) in parse_form(query) {
        add(&k, v);
    }
    if method == "POST" {
        for (k, v) in parse_form(&String::from_utf8_lossy(body)) {
            add(&k, v);
        }
    }
    let presented = match (form_user, form_password) {
        (Some(u), Some(p)) => Some((u, p)),
        _ => authorization.as_deref().and_then(basic_credentials),
    };
    let mut entry = TokenRequest {
        method: method.to_string(),
        path: path.to_string(),
        service,
        scopes: scopes.clone(),
        user: None,
        credentials: presented.is_some(),
        status: 200,
        granted: Vec::new(),
    };
    let result = if path != "/token" || !matches!(method, "GET" | "POST") {
        entry.status = 404;
        (404, r#"{"error":"not found"}"#.to_string(), None)
    } else if let Some((user, password)) = &presented {
        if state
            .grants
            .users
            .iter()
            .any(|(u, p)| u == user && p == password)
        {
            entry.user = Some(user.clone());
            mint(state, &mut entry, user, &scopes, true)
        } else {
            entry.status = 401;
            (
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"incorrect username or password"}]}"#
                    .to_string(),
                Some(format!(r#"Basic realm="{AUTH_HOST}""#)),
            )
        }
    } else {
        mint(state, &mut entry, "", &scopes, false)
    };
    if let Ok(line) = serde_json::to_string(&entry) {
        if let Ok(mut log) = state.log.lock() {
            let _ = writeln!(log, "{line}");
        }
    }
    result
}

fn mint(
    state: &ServerState,
    entry: &mut TokenRequest,
    subject: &str,
    scopes: &[String],
    authenticated: bool,
) -> (u16, String, Option<String>) {
    let mut access = Vec::new();
    for scope in scopes {
        let mut parts = scope.splitn(2, ':');
        let (Some(kind), Some(rest)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        if kind != "repository" {
            continue;
        }
        let public = state.grants.public.iter().any(|r| r == name);
        let private = state.grants.private.iter().any(|r| r == name);
        let allowed: &[&str] = match (authenticated, public || private) {
            (true, true) => &["pull", "push"],
            (false, true) if public => &["pull"],
            _ => &[],
        };
        let granted: BTreeSet<&str> = actions.split(',').filter(|a| allowed.contains(a)).collect();
        if granted.is_empty() {
            continue;
        }
        let granted: Vec<String> = granted.into_iter().map(String::from).collect();
        entry
            .granted
            .push(format!("repository:{name}:{}", granted.join(",")));
        access.push(Access {
            kind: "repository".into(),
            name: name.to_string(),
            actions: granted,
        });
    }
    match state.minter.mint(subject, access) {
        Ok(token) => (
            200,
            serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": EXPIRES_IN,
            })
            .to_string(),
            None,
        ),
        Err(e) => {
            entry.status = 500;
            (
                500,
                serde_json::json!({"error": format!("{e:#}")}).to_string(),
                None,
            )
        }
    }
}

fn basic_credentials(authorization: &str) -> Option<(String, String)> {
    let (scheme, value) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(value.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `application/x-www-form-urlencoded` pairs (also a URL query).
fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The token server running in a netns (`eddy-probe token-server`). Killed on drop.
pub struct TokenServer {
    process: ProcessGuard,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl TokenServer {
    /// Start the server (`probe_bin token-server`) inside `netns` on `ip:443`, serving the
    /// test PKI's server certificate, and wait until it listens.
    pub fn start(
        probe_bin: &Path,
        netns: &Netns,
        ip: Ipv4Addr,
        pki: &Pki,
        signing: &SigningKey,
        grants: &Grants,
        log: &Path,
    ) -> Result<Self> {
        let addr = SocketAddr::from((ip, 443));
        let mut cmd = netns.command(&probe_bin.display().to_string());
        cmd.arg("token-server")
            .args(["--listen", &addr.to_string()])
            .arg("--tls-cert")
            .arg(&pki.server_cert)
            .arg("--tls-key")
            .arg(&pki.server_key)
            .arg("--signing-cert-der")
            .arg(&signing.cert_der)
            .arg("--signing-key-der")
            .arg(&signing.key_der)
            .arg("--log")
            .arg(log);
        for repo in &grants.public {
            cmd.args(["--public", repo]);
        }
        for repo in &grants.private {
            cmd.args(["--private", repo]);
        }
        for (user, password) in &grants.users {
            cmd.args(["--user", &format!("{user}:{password}")]);
        }
        let process =
            ProcessGuard::spawn_until_ready("token server", &mut cmd, Duration::from_secs(10))?;
        ensure!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok(),
            "the token server said ready but {addr} does not accept connections"
        );
        Ok(Self {
            process,
            addr,
            log: log.to_path_buf(),
        })
    }

    /// Kill the server (an outage of the token host); its log stays readable.
    pub fn stop(&mut self) -> Result<()> {
        self.process.kill_and_wait().map(drop)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_forms_and_credentials() {
        assert_eq!(
            parse_form("scope=repository%3Apub%2Fapp%3Apull&service=registry.test&x"),
            vec![
                ("scope".into(), "repository:pub/app:pull".into()),
                ("service".into(), "registry.test".into()),
                ("x".into(), "".into()),
            ]
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(
            basic_credentials("Basic dXNlcjpzZWNyZXQ="),
            Some(("user".into(), "secret".into()))
        );
        assert_eq!(basic_credentials("Bearer x"), None);
    }

    #[test]
    fn mints_verifiable_es256_tokens() {
        use ring::signature::{KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKey::create(dir.path()).unwrap();
        let minter = Minter::load(&keys.key_der, &keys.cert_der).unwrap();
        let access = vec![Access {
            kind: "repository".into(),
            name: "pub/app".into(),
            actions: vec!["pull".into()],
        }];
        let token = minter.mint("", access).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(signature.len(), 64, "JWS ES256 is r||s");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, minter.key.public_key().as_ref())
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(
            STANDARD.decode(header["x5c"][0].as_str().unwrap()).unwrap(),
            fs::read(&keys.cert_der).unwrap()
        );
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], TOKEN_SERVICE);
        assert_eq!(claims["iss"], TOKEN_ISSUER);
        assert_eq!(claims["access"][0]["name"], "pub/app");
        assert_eq!(claims["access"][0]["actions"][0], "pull");
    }
}
