//! The peer blob protocol (`/eddy/blob/1.0.0`), one request per libp2p stream:
//!
//! ```text
//! client → server:  u32 BE length, JSON Request            (at most MAX_HEADER bytes)
//! server → client:  u32 BE length, JSON Response           (at most MAX_HEADER bytes)
//!                   then, for Response::Blob, the raw bytes [offset, len)
//! ```
//!
//! The body is the stream's raw bytes with no framing of its own: yamux and noise already
//! frame it, and a second framing would cost a copy per chunk at > 1 GB/s. The end is
//! known from the header, so a short body is an error the client can detect and resume.
//!
//! A client that asks with `direct` may get `Response::Direct` instead: a ticket for the
//! node's data port (see `data`), where the same header and body follow over TLS.
use libp2p::{
    futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    StreamProtocol,
};
use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;

/// The secret that redeems one body at a data port.
pub type Token = [u8; 32];

/// What a client needs to fetch one body from the data port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub port: u16,
    pub cert_sha256: [u8; 32],
    pub token: Token,
}

pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/eddy/blob/1.0.0");

/// The largest request or response header accepted: a digest, an offset, or a tag's name.
pub const MAX_HEADER: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `digest` from byte `from`. `direct`: the client can take the body from the data port.
    Blob {
        digest: Digest,
        from: u64,
        #[serde(default)]
        direct: bool,
    },
    /// The last-seen `registry/repository:tag` → digest record.
    Tag {
        registry: String,
        repository: String,
        tag: String,
    },
    /// Who fetches `digest` from upstream for the cluster (asked of the digest's home node,
    /// see `claims`). `stale`: a fetcher (peer id) that could not serve it, to be replaced.
    Claim {
        digest: Digest,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stale: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The bytes `[offset, len)` follow.
    Blob {
        len: u64,
        offset: u64,
        media_type: Option<String>,
    },
    /// Fetch the body from the data port `port` (at the address of this swarm connection),
    /// whose certificate has SHA-256 `cert_sha256`, with `token` (both 64 hex digits).
    Direct {
        port: u16,
        cert_sha256: String,
        token: String,
    },
    /// This peer cannot serve it (now).
    NotFound,
    Tag(Option<TagRecord>),
    /// The answer to a claim: the peer id of the node that fetches the digest.
    Fetcher(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub seen_at: u64,
}

impl From<crate::sources::source::TagAnswer> for TagRecord {
    fn from(a: crate::sources::source::TagAnswer) -> Self {
        TagRecord {
            digest: a.digest,
            media_type: a.media_type,
            seen_at: a.seen_at,
        }
    }
}

impl From<TagRecord> for crate::sources::source::TagAnswer {
    fn from(r: TagRecord) -> Self {
        crate::sources::source::TagAnswer {
            digest: r.digest,
            media_type: r.media_type,
            seen_at: r.seen_at,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("header of {0} bytes is over the {MAX_HEADER}-byte limit")]
    TooLarge(usize),
    #[error("header is not valid: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes a request header's JSON (the bytes after the length prefix).
pub fn decode_request(bytes: &[u8]) -> Result<Request, ProtocolError> {
    if bytes.len() > MAX_HEADER {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Decodes a response header's JSON (the bytes after the length prefix).
pub fn decode_response(bytes: &[u8]) -> Result<Response, ProtocolError> {
    if bytes.len() > MAX_HEADER {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    let response: Response =
        serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    match &response {
        Response::Blob { len, offset, .. } if offset > len => {
            return Err(ProtocolError::Malformed(format!(
                "offset {offset} is past the length {len}"
            )));
        }
        Response::Direct { .. } => {
            ticket_of(&response)?;
        }
        _ => {}
    }
    Ok(response)
}

/// The data port ticket in a `Response::Direct` (None for other responses).
pub fn ticket_of(response: &Response) -> Result<Option<Ticket>, ProtocolError> {
    let Response::Direct {
        port,
        cert_sha256,
        token,
    } = response
    else {
        return Ok(None);
    };
    let bytes32 = |field: &str, value: &str| -> Result<[u8; 32], ProtocolError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(value, &mut out)
            .map_err(|_| ProtocolError::Malformed(format!("{field} is not 64 hex digits")))?;
        Ok(out)
    };
    if *port == 0 {
        return Err(ProtocolError::Malformed("data port 0".into()));
    }
    Ok(Some(Ticket {
        port: *port,
        cert_sha256: bytes32("cert_sha256", cert_sha256)?,
        token: bytes32("token", token)?,
    }))
}

impl From<&Ticket> for Response {
    fn from(t: &Ticket) -> Self {
        Response::Direct {
            port: t.port,
            cert_sha256: hex::encode(t.cert_sha256),
            token: hex::encode(t.token),
        }
    }
}

/// One header as it goes on the wire: u32 BE length, then the JSON.
pub fn encode_header<T: Serialize>(header: &T) -> Result<Vec<u8>, ProtocolError> {
    let json = serde_json::to_vec(header).expect("protocol headers serialize");
    if json.len() > MAX_HEADER {
        return Err(ProtocolError::TooLarge(json.len()));
    }
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}

pub async fn write_header<W, T>(w: &mut W, header: &T) -> Result<(), ProtocolError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_header(header)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one length-prefixed header; a length over [`MAX_HEADER`] is refused before
/// anything more is read.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn requests_round_trip() {
        let r = Request::Blob {
            digest: D.parse().unwrap(),
            from: 7,
            direct: true,
        };
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode_request(&json).unwrap(), r);
        // A request without `direct` (in-band only) still decodes.
        assert_eq!(
            decode_request(format!(r#"{{"blob":{{"digest":"{D}","from":7}}}}"#).as_bytes())
                .unwrap(),
            Request::Blob {
                digest: D.parse().unwrap(),
                from: 7,
                direct: false
            }
        );
        let t = Request::Tag {
            registry: "docker.io".into(),
            repository: "library/alpine".into(),
            tag: "3.20".into(),
        };
        assert_eq!(decode_request(&serde_json::to_vec(&t).unwrap()).unwrap(), t);
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(matches!(
            decode_request(br#"{"blob":{"digest":"sha256:00","from":0}}"#),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(&vec![b' '; MAX_HEADER + 1]),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            decode_response(br#"{"blob":{"len":1,"offset":2,"media_type":null}}"#),
            Err(ProtocolError::Malformed(_))
        ));
        assert_eq!(
            decode_response(br#""not_found""#).unwrap(),
            Response::NotFound
        );
    }

    #[test]
    fn direct_tickets_round_trip_and_bad_ones_are_refused() {
        let ticket = Ticket {
            port: 4002,
            cert_sha256: [1; 32],
            token: [2; 32],
        };
        let json = serde_json::to_vec(&Response::from(&ticket)).unwrap();
        let decoded = decode_response(&json).unwrap();
        assert_eq!(ticket_of(&decoded).unwrap(), Some(ticket));
        for bad in [
            r#"{"direct":{"port":4002,"cert_sha256":"01","token":"02"}}"#.to_string(),
            format!(
                r#"{{"direct":{{"port":0,"cert_sha256":"{0}","token":"{0}"}}}}"#,
                "ab".repeat(32)
            ),
            format!(
                r#"{{"direct":{{"port":1,"cert_sha256":"{0}","token":"{0}"}}}}"#,
                "zz".repeat(32)
            ),
        ] {
            assert!(
                matches!(
                    decode_response(bad.as_bytes()),
                    Err(ProtocolError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_length_prefix_is_refused_before_reading_on() {
        let mut input: &[u8] = &[0, 0, 0x10, 0x01, b'{'];
        let e = read_header(&mut input).await.unwrap_err();
        assert!(matches!(e, ProtocolError::TooLarge(4097)), "{e}");
        let mut out = Vec::new();
        write_header(&mut out, &Response::NotFound).await.unwrap();
        let mut input: &[u8] = &out;
        let header = read_header(&mut input).await.unwrap();
        assert_eq!(decode_response(&header).unwrap(), Response::NotFound);
    }
}
