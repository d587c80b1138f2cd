//! A minimal CRI client: `runtime.v1.ImageService/PullImage` on containerd's gRPC socket,
//! the call the kubelet makes. containerd's daemon then pulls in its own process, with the
//! trust roots it loaded when it started, which is what production sees (`ctr images pull`
//! pulls in the ctr process instead).
//!
//! The request is one nested string, so it is encoded by hand in protobuf's wire format and
//! sent with hyper's HTTP/2 client: no protoc and no generated code in the test build.
use std::{path::Path, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};

const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";

/// Pull `image` through the CRI plugin of the containerd listening on `socket`; returns the
/// image ref containerd reports.
pub fn pull_image(socket: &Path, image: &str, timeout: Duration) -> Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        // The timer must be created inside the runtime.
        .block_on(async { tokio::time::timeout(timeout, call(socket, image)).await })
        .with_context(|| format!("CRI PullImage {image} took longer than {timeout:?}"))?
}

async fn call(socket: &Path, image: &str) -> Result<String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("HTTP/2 handshake with containerd")?;
    tokio::spawn(connection);
    let request = hyper::Request::post(format!("http://localhost{PULL_IMAGE}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(grpc_frame(&pull_image_request(
            image,
        )))))?;
    let response = sender.send_request(request).await?;
    let (head, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .context("reading the PullImage answer")?;
    // A failed call may answer with headers only ("trailers-only"), status in the headers.
    let trailers = body.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.headers.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let status = field("grpc-status").unwrap_or_default();
    if status != "0" {
        bail!(
            "CRI PullImage {image}: grpc-status {status:?} (HTTP {}): {}",
            head.status,
            field("grpc-message").unwrap_or_default()
        );
    }
    let data = body.to_bytes();
    ensure!(data.len() >= 5, "CRI PullImage answered without a message");
    image_ref(&data[5..]).context("unreadable PullImageResponse")
}

/// `PullImageRequest { image: ImageSpec { image: <image> } }`: field 1, length-delimited, in
/// field 1, length-delimited.
fn pull_image_request(image: &str) -> Vec<u8> {
    let spec = length_delimited(1, image.as_bytes());
    length_delimited(1, &spec)
}

fn length_delimited(field: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(field << 3) | 2];
    varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A gRPC message frame: uncompressed flag, big-endian length, message.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// `PullImageResponse.image_ref` (field 1, a string); other fields are skipped.
fn image_ref(mut msg: &[u8]) -> Option<String> {
    let read_varint = |b: &mut &[u8]| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    while !msg.is_empty() {
        let key = read_varint(&mut msg)?;
        let value = match key & 7 {
            0 => {
                read_varint(&mut msg)?;
                continue;
            }
            2 => {
                let len = read_varint(&mut msg)? as usize;
                let (v, rest) = (msg.get(..len)?, msg.get(len..)?);
                msg = rest;
                v
            }
            _ => return None,
        };
        if key >> 3 == 1 {
            return String::from_utf8(value.to_vec()).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_pull_request_and_reads_the_image_ref() {
        assert_eq!(
            pull_image_request("a/b"),
            [0x0a, 0x05, 0x0a, 0x03, b'a', b'/', b'b']
        );
        assert_eq!(grpc_frame(&[7, 8]), [0, 0, 0, 0, 2, 7, 8]);
        let long = "x".repeat(200);
        let encoded = length_delimited(1, long.as_bytes());
        assert_eq!(&encoded[..3], &[0x0a, 0xc8, 0x01]);
        assert_eq!(image_ref(&encoded).as_deref(), Some(long.as_str()));
        assert_eq!(image_ref(&[0x0a, 0x05, b'a']), None);
    }
}
