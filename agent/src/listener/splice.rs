//! Zero-copy splicing of a passthrough connection with splice(2) through a pipe: the bytes
//! never enter user space, which keeps the passthrough close to a direct connection's
//! throughput.
// unsafe: pipe2, fcntl and splice(2) have no safe wrapper in std or tokio. Each block says why it is sound.
#![allow(unsafe_code)]
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{io::Interest, net::TcpStream};

/// Bytes moved per splice call, and the pipe size requested for it.
const CHUNK: usize = 1 << 20;

/// Splice both directions until both ends have closed their sending side, or either fails
/// (then the other direction is dropped too). Returns the bytes moved (client → upstream,
/// upstream → client).
pub async fn bidirectional(client: &TcpStream, upstream: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(client, upstream), one_way(upstream, client))
}

/// Move bytes from `from` to `to` until EOF, then shut down `to`'s sending side so the peer
/// sees the same half-close it would have seen without eddy.
async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    // The pipe is made once the first bytes (or EOF) arrive: an idle connection then costs
    // its two sockets only, not four pipe descriptors more (5,000 idle clients would need
    // 30,000 descriptors instead of 10,000).
    from.readable().await?;
    let (pipe_r, pipe_w) = pipe()?;
    let mut total = 0u64;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
            })
            .await?;
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            let m = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_r.as_raw_fd(), to.as_raw_fd(), left)
                })
                .await?;
            left -= m;
        }
        total += n as u64;
    }
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
    Ok(total)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A bigger pipe means fewer round trips; the default 64 KiB still works if refused.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok((r, w))
}

/// One non-blocking splice(2). WouldBlock makes tokio wait for readiness and retry.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors the caller keeps open; null offsets (streams).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// client ⇄ [proxy a | proxy b] ⇄ server, spliced in the middle.
    #[tokio::test]
    async fn splices_both_ways_and_propagates_half_close() {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (front_addr, back_addr) = (front.local_addr().unwrap(), back.local_addr().unwrap());

        let proxy = tokio::spawn(async move {
            let (a, _) = front.accept().await.unwrap();
            let b = TcpStream::connect(back_addr).await.unwrap();
            bidirectional(&a, &b).await.unwrap()
        });
        // The server echoes everything, then closes after the client's half-close.
        let server = tokio::spawn(async move {
            let (mut s, _) = back.accept().await.unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            buf.len()
        });

        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7) as u8).collect();
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        let writer = {
            let payload = payload.clone();
            let (mut r, mut w) = c.split();
            let write = async move {
                w.write_all(&payload).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let read = async move {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(write, read).1
        };
        assert_eq!(writer.len(), payload.len());
        assert!(writer == payload, "bytes changed in transit");
        assert_eq!(server.await.unwrap(), payload.len());
        let (up, down) = proxy.await.unwrap();
        assert_eq!((up, down), (payload.len() as u64, payload.len() as u64));
        drop(c);
    }
}
