//! A body that survives its source. When the stream fails mid-blob (a reset, a stall, a peer
//! that died), it continues from the byte it reached at the next source: another peer, or the
//! upstream with `Range: bytes=N-`. The fill writing it, and every client streaming from that
//! fill, never see the failure. The store still verifies the digest of the whole.
use bytes::Bytes;
use futures_util::{future::BoxFuture, StreamExt};
use tracing::warn;

use crate::{sources::source::ByteStream, store::BoxError};

/// Opens the content again from byte `pos`: a stream whose first byte is byte `pos` of the
/// blob, or `None` when there is nowhere left to resume from.
pub type Resume = Box<dyn FnMut(u64) -> BoxFuture<'static, Option<ByteStream>> + Send>;

/// How often one body may resume before its error stands.
pub const MAX_RESUMES: u32 = 3;

struct State {
    body: ByteStream,
    pos: u64,
    len: Option<u64>,
    resume: Resume,
    resumes_left: u32,
    done: bool,
}

/// `body` carries the blob from byte `start`; `len` is the blob's total length, if known (a
/// body that ends before it counts as failed, and resumes).
pub fn resuming(body: ByteStream, start: u64, len: Option<u64>, resume: Resume) -> ByteStream {
    let state = State {
        body,
        pos: start,
        len,
        resume,
        resumes_left: MAX_RESUMES,
        done: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            let failure: BoxError = match s.body.next().await {
                Some(Ok(chunk)) => {
                    s.pos += chunk.len() as u64;
                    return Some((Ok(chunk), s));
                }
                Some(Err(e)) => e,
                None => match s.len {
                    Some(len) if s.pos < len => {
                        format!("the body ended at byte {} of {len}", s.pos).into()
                    }
                    _ => return None,
                },
            };
            if s.resumes_left == 0 {
                s.done = true;
                return Some((Err(failure), s));
            }
            s.resumes_left -= 1;
            warn!(at = s.pos, error = %failure, "content source failed mid-body; resuming elsewhere");
            match (s.resume)(s.pos).await {
                Some(next) => s.body = next,
                None => {
                    s.done = true;
                    return Some((Err(failure), s));
                }
            }
        }
    })
    .boxed()
}

/// Drops the first `n` bytes of `body` (a source that ignored a Range and sent it all).
pub fn skip_prefix(body: ByteStream, n: u64) -> ByteStream {
    let mut left = n;
    body.filter_map(move |item| {
        let out = match item {
            Ok(chunk) if left > 0 => {
                let cut = left.min(chunk.len() as u64);
                left -= cut;
                let rest: Bytes = chunk.slice(cut as usize..);
                (!rest.is_empty()).then_some(Ok(rest))
            }
            other => Some(other),
        };
        std::future::ready(out)
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures_util::TryStreamExt;

    use super::*;

    fn chunks(data: &[u8], fail_after: Option<usize>) -> ByteStream {
        let mut items: Vec<Result<Bytes, BoxError>> = data
            .chunks(3)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        if let Some(n) = fail_after {
            items.truncate(n);
            items.push(Err("reset".into()));
        }
        futures_util::stream::iter(items).boxed()
    }

    async fn collect(body: ByteStream) -> Result<Vec<u8>, BoxError> {
        body.try_fold(Vec::new(), |mut v, c| async move {
            v.extend_from_slice(&c);
            Ok(v)
        })
        .await
    }

    #[tokio::test]
    async fn a_failed_body_resumes_from_the_byte_it_reached() {
        let data: Vec<u8> = (0..100u8).collect();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (d, a) = (data.clone(), asked.clone());
        let resume: Resume = Box::new(move |pos| {
            a.lock().unwrap().push(pos);
            let rest = chunks(&d[pos as usize..], None);
            Box::pin(async move { Some(rest) })
        });
        let body = resuming(chunks(&data, Some(5)), 0, Some(100), resume);
        assert_eq!(collect(body).await.unwrap(), data);
        assert_eq!(*asked.lock().unwrap(), vec![15]);
    }

    #[tokio::test]
    async fn a_short_body_counts_as_failed() {
        let data: Vec<u8> = (0..50u8).collect();
        let d = data.clone();
        let resume: Resume = Box::new(move |pos| {
            let rest = chunks(&d[pos as usize..], None);
            Box::pin(async move { Some(rest) })
        });
        let body = resuming(chunks(&data[10..30], None), 10, Some(50), resume);
        assert_eq!(collect(body).await.unwrap(), data[10..].to_vec());
    }

    #[tokio::test]
    async fn resumes_are_bounded_and_the_error_stands() {
        let data: Vec<u8> = (0..90u8).collect();
        let d = data.clone();
        let calls = Arc::new(Mutex::new(0));
        let c = calls.clone();
        let resume: Resume = Box::new(move |pos| {
            *c.lock().unwrap() += 1;
            let rest = chunks(&d[pos as usize..], Some(1));
            Box::pin(async move { Some(rest) })
        });
        let body = resuming(chunks(&data, Some(1)), 0, Some(90), resume);
        assert!(collect(body).await.is_err());
        assert_eq!(*calls.lock().unwrap(), MAX_RESUMES);
    }

    #[tokio::test]
    async fn nowhere_to_resume_passes_the_error_on() {
        let data = vec![7u8; 30];
        let resume: Resume = Box::new(|_| Box::pin(async { None }));
        let body = resuming(chunks(&data, Some(2)), 0, None, resume);
        let err = collect(body).await.unwrap_err();
        assert_eq!(err.to_string(), "reset");
    }

    #[tokio::test]
    async fn skip_prefix_drops_exactly_n_bytes() {
        let data: Vec<u8> = (0..20u8).collect();
        let body = skip_prefix(chunks(&data, None), 7);
        assert_eq!(collect(body).await.unwrap(), data[7..].to_vec());
    }
}
