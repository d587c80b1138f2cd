//! Content digests (`sha256:<64 lowercase hex>`), validated once at the parse boundary.
//!
//! Only sha256 is cached: the store names files by it and verifies content against it. Any other
//! well-formed algorithm (sha512, ...) parses to [`DigestError::Unsupported`], which callers treat as
//! "pass through to upstream uncached" rather than as a client error.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";

/// A sha256 content digest. Holding one means the string it came from was well formed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Well formed per the OCI grammar, but not an algorithm eddy caches.
    #[error("unsupported digest algorithm {algorithm:?} (only sha256 is cached)")]
    Unsupported { algorithm: String },
    #[error("malformed digest {input:?}: {reason}")]
    Malformed { input: String, reason: &'static str },
}

impl DigestError {
    /// True when the digest is valid but uncacheable, so the request should go upstream untouched.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, DigestError::Unsupported { .. })
    }
}

impl Digest {
    /// Wraps a raw sha256 output.
    pub fn from_sha256(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// The 64 lowercase hex characters, as used for file names.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let malformed = |reason| DigestError::Malformed {
            // Inputs come from URL paths; keep error messages (and logs) bounded.
            input: s.chars().take(100).collect(),
            reason,
        };
        let (algorithm, encoded) = s
            .split_once(':')
            .ok_or_else(|| malformed("missing algorithm prefix"))?;
        // OCI image-spec grammar: algorithm-component ([+._-] algorithm-component)*, components [a-z0-9]+.
        let valid_algorithm = algorithm.split(['+', '.', '_', '-']).all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
        if !valid_algorithm {
            return Err(malformed("invalid algorithm"));
        }
        // encoded ::= [a-zA-Z0-9=_-]+
        let valid_encoded = !encoded.is_empty()
            && encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
        if !valid_encoded {
            return Err(malformed("invalid encoded part"));
        }
        if algorithm != "sha256" {
            return Err(DigestError::Unsupported {
                algorithm: algorithm.to_string(),
            });
        }
        if encoded.len() != 64 {
            return Err(malformed("sha256 needs 64 hex characters"));
        }
        // The spec requires lowercase; accepting uppercase would let two spellings name one blob.
        if !encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(malformed("sha256 must be lowercase hex"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(encoded, &mut bytes).map_err(|_| malformed("invalid hex"))?;
        Ok(Digest(bytes))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_round_trips() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d, Digest::of(b""));
        assert_eq!(format!("{d:?}"), format!("Digest({EMPTY})"));
    }

    #[test]
    fn rejects_other_algorithms_as_unsupported() {
        let sha512 = format!("sha512:{}", "a".repeat(128));
        let err = sha512.parse::<Digest>().unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        assert!("blake3:abcd"
            .parse::<Digest>()
            .unwrap_err()
            .is_unsupported());
        assert!("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564"
            .parse::<Digest>()
            .unwrap_err()
            .is_unsupported());
    }

    #[test]
    fn rejects_malformed() {
        let cases: [&str; 12] = [
            "",
            "sha256",
            &EMPTY[7..],               // no prefix
            "sha256:",                 // empty hex
            &EMPTY[..EMPTY.len() - 1], // 63 chars
            &format!("{EMPTY}0"),      // 65 chars
            &EMPTY.to_uppercase(),     // uppercase algorithm
            &format!("sha256:{}", EMPTY[7..].to_uppercase()),
            &format!("sha256:{}", "g".repeat(64)),
            "SHA256:abc",
            "sha256:../../etc/passwd",
            ":abc",
        ];
        for case in cases {
            let err = case.parse::<Digest>().unwrap_err();
            assert!(
                !err.is_unsupported(),
                "{case:?} should be malformed, got {err}"
            );
        }
    }

    #[test]
    fn serde_as_string() {
        let d: Digest = EMPTY.parse().unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
    }
}
