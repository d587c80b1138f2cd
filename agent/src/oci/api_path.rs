//! The OCI distribution API paths eddy understands (pull side), split from the request
//! path. Pure and allocation-free, so it is fuzzed on its own (`fuzz/`); anything it does
//! not recognise is `Api::Other`, which the registry handler forwards upstream untouched.

/// The parts of the API path eddy understands.
#[derive(Debug, PartialEq, Eq)]
pub enum Api<'a> {
    Base,
    Manifest { repo: &'a str, reference: &'a str },
    Blob { repo: &'a str, digest: &'a str },
    Other,
}

pub fn parse_path(path: &str) -> Api<'_> {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return if path == "/v2" { Api::Base } else { Api::Other };
    };
    if rest.is_empty() {
        return Api::Base;
    }
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        if valid_repository(repo) && valid_reference(reference) {
            return Api::Manifest { repo, reference };
        }
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        if valid_repository(repo)
            && !digest.is_empty()
            && !digest.contains('/')
            && !repo.ends_with("/blobs")
        {
            return Api::Blob { repo, digest };
        }
    }
    Api::Other
}

/// The longest repository name the reference registry accepts.
const MAX_REPOSITORY: usize = 255;

/// The OCI distribution grammar for repository names:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
/// Anything else (`..`, `%2e`, upper case, empty components) is not a name eddy caches
/// under: such requests go upstream untouched, and upstream decides.
pub fn valid_repository(repo: &str) -> bool {
    repo.len() <= MAX_REPOSITORY && repo.split('/').all(valid_component)
}

fn valid_component(component: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        return false;
    }
    // Every run of separators between alphanumerics is ".", "_", "__" or "-"+.
    bytes
        .split(alnum)
        .filter(|run| !run.is_empty())
        .all(|run| matches!(run, b"." | b"_" | b"__") || run.iter().all(|&b| b == b'-'))
}

/// A tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`) or something digest-shaped (`alg:encoded`,
/// validated by [`crate::oci::digest::Digest`]).
fn valid_reference(reference: &str) -> bool {
    if reference.contains(':') {
        return !reference.contains('/');
    }
    let bytes = reference.as_bytes();
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    bytes.first().is_some_and(word)
        && bytes.len() <= 128
        && bytes.iter().all(|b| word(b) || matches!(b, b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_api_paths() {
        assert_eq!(parse_path("/v2/"), Api::Base);
        assert_eq!(parse_path("/v2"), Api::Base);
        assert_eq!(
            parse_path("/v2/library/busybox/manifests/latest"),
            Api::Manifest {
                repo: "library/busybox",
                reference: "latest"
            }
        );
        assert_eq!(
            parse_path("/v2/a/b/c/blobs/sha256:abc"),
            Api::Blob {
                repo: "a/b/c",
                digest: "sha256:abc"
            }
        );
        assert_eq!(parse_path("/v2/a/blobs/uploads/"), Api::Other);
        assert_eq!(parse_path("/v2/a/blobs/uploads/123"), Api::Other);
        assert_eq!(parse_path("/v2/_catalog"), Api::Other);
        assert_eq!(parse_path("/token"), Api::Other);
    }

    #[test]
    fn repository_names_follow_the_oci_grammar() {
        for ok in [
            "library/busybox",
            "a",
            "a/b/c",
            "my-org/app_1",
            "a__b",
            "a.b-c---d/e",
            "x0",
        ] {
            assert!(valid_repository(ok), "{ok}");
        }
        for bad in [
            "", "..", "a/..", "../etc", "a/../b", "a//b", "/a", "a/", "A", "a..b", "a___b", "a._b",
            "-a", "a-", "%2e%2e", "a%2fb", "a b", "a\\b",
        ] {
            assert!(!valid_repository(bad), "{bad:?}");
        }
        assert!(!valid_repository(&"a".repeat(256)));
    }

    #[test]
    fn traversal_and_odd_names_are_not_api_paths_eddy_serves() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        for path in [
            format!("/v2/../../etc/blobs/{d}"),
            format!("/v2/library/../secret/blobs/{d}"),
            format!("/v2/library/%2e%2e/secret/manifests/{d}"),
            "/v2/library/busybox/manifests/..".to_string(),
            "/v2/library/busybox/manifests/.hidden".to_string(),
            format!("/v2/Library/busybox/manifests/{d}"),
        ] {
            assert_eq!(parse_path(&path), Api::Other, "{path}");
        }
        assert_eq!(
            parse_path("/v2/library/busybox/manifests/v1.2_rc-3"),
            Api::Manifest {
                repo: "library/busybox",
                reference: "v1.2_rc-3"
            }
        );
    }
}
