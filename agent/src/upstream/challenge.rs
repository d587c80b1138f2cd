//! `WWW-Authenticate` challenges of the Docker token flow, as registries send them:
//! `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"`.
//!
//! eddy reads them to ask a registry's token realm itself (anonymously) whether a repository
//! is public. Parsing is http-auth's (RFC 9110 grammar, quoting and escapes); this module
//! only picks out the parts of a Bearer challenge.
use http::{header, HeaderMap};

/// A Bearer challenge: where to get a token, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bearer {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// What a 401 asks the client for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer(Bearer),
    /// Basic or another scheme: anonymous clients cannot get in.
    Other,
}

/// Parse one header value. `None` when it is not a well-formed challenge list, or a Bearer
/// challenge lacks its realm.
pub fn parse(value: &str) -> Option<Challenge> {
    let challenges = http_auth::parse_challenges(value).ok()?;
    // Registries send one challenge; if several, a Bearer one is what we can answer.
    let bearer = challenges
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"));
    let Some(bearer) = bearer else {
        return (!challenges.is_empty()).then_some(Challenge::Other);
    };
    let param = |name: &str| {
        bearer
            .params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_unescaped())
    };
    let realm = param("realm").filter(|r| !r.is_empty())?;
    Some(Challenge::Bearer(Bearer {
        realm,
        service: param("service"),
        scope: param("scope"),
    }))
}

/// The challenge of a response, from its first parseable `WWW-Authenticate` header.
pub fn from_headers(headers: &HeaderMap) -> Option<Challenge> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let c = parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer(Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            }))
        );
    }

    #[test]
    fn ghcr_and_error_params() {
        // GHCR sends no scope on /v2/; distribution adds error= for a token without access.
        let c = parse(r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull",error="insufficient_scope""#).unwrap();
        let Challenge::Bearer(b) = c else {
            panic!("not bearer")
        };
        assert_eq!(b.realm, "https://ghcr.io/token");
        assert_eq!(b.scope.as_deref(), Some("repository:user/image:pull"));
        let c = parse(r#"Bearer realm="https://quay.io/v2/auth",service="quay.io""#).unwrap();
        assert!(matches!(c, Challenge::Bearer(Bearer { scope: None, .. })));
    }

    #[test]
    fn case_and_escapes() {
        let c = parse(r#"bearer Realm="https://a.test/t\"x",SERVICE=svc"#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer(Bearer {
                realm: "https://a.test/t\"x".into(),
                service: Some("svc".into()),
                scope: None,
            })
        );
    }

    #[test]
    fn basic_and_garbage() {
        assert_eq!(
            parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Other)
        );
        assert_eq!(parse(r#"Bearer service="x""#), None, "no realm");
        assert_eq!(parse(r#"Bearer realm="""#), None, "empty realm");
        assert_eq!(parse("Bearer realm=\"unterminated"), None);
        assert_eq!(parse(""), None);
    }
}
