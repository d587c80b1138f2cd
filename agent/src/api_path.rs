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
        if !repo.is_empty() && !reference.is_empty() && !reference.contains('/') {
            return Api::Manifest { repo, reference };
        }
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        if !repo.is_empty()
            && !digest.is_empty()
            && !digest.contains('/')
            && !repo.ends_with("/blobs")
        {
            return Api::Blob { repo, digest };
        }
    }
    Api::Other
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
}
