//! An upgraded WebSocket connection's TCP socket, shared by the connection's reader and writer
//! tasks and by the fan-out dispatcher, which writes a live subscriber's events straight to the
//! socket when its writer is idle (see `fanout.rs`). All three only ever borrow the socket: tokio
//! lets `try_read`/`try_write` and the readiness polls work through `&TcpStream`.
//!
//! The socket is recovered from hyper's upgrade by downcasting to the stream `ivy serve` gives
//! hyper (`TokioIo<WriteStall<LingeringTcp>>`); a server embedded in another program may hand hyper some
//! other stream, and then the connection runs on the generic path, without direct writes.

use super::linger::LingeringTcp;
use super::stall::WriteStall;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What an upgraded connection runs on.
pub enum Upgraded {
    /// `ivy serve`'s own socket, and the bytes hyper had already read past the upgrade request
    /// (a client may send its first frames without waiting for the 101).
    Tcp { tcp: TcpStream, read_ahead: Bytes },
    /// Some other stream (an embedding program's): the generic path.
    Other(TokioIo<hyper::upgrade::Upgraded>),
    /// The socket was gone already.
    Closed,
}

/// Takes the TCP socket back from an upgraded connection, or gives the stream back unchanged.
pub fn recover(io: TokioIo<hyper::upgrade::Upgraded>) -> Upgraded {
    match io
        .into_inner()
        .downcast::<TokioIo<WriteStall<LingeringTcp>>>()
    {
        Ok(parts) => match parts.io.into_inner().into_inner().into_tcp() {
            Some(tcp) => Upgraded::Tcp {
                tcp,
                // A copy: the bytes hyper read ahead are a slice of its whole read buffer, which
                // would otherwise stay for the connection's life (measured: 4.5 KiB per idle
                // connection under `ivy-bench idle`).
                read_ahead: Bytes::copy_from_slice(&parts.read_buf),
            },
            None => Upgraded::Closed,
        },
        Err(other) => Upgraded::Other(TokioIo::new(other)),
    }
}

/// One task's handle on the shared socket: reads and writes through `&TcpStream`.
pub struct SharedTcp(pub Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // On WouldBlock, `try_read_buf` clears the readiness, so the next poll registers the
            // waker again. (It fills the buffer's uninitialized part without zeroing it first.)
            match self.0.try_read_buf(buf) {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let sock = socket2::SockRef::from(&*self.0);
        Poll::Ready(sock.shutdown(std::net::Shutdown::Write))
    }
}

impl super::stall::Acked for SharedTcp {
    fn acked(&self) -> Option<u64> {
        sending(&self.0).map(|s| s.acked)
    }
}

/// Sets an upgraded connection's kernel send buffer to `bytes` (0: leaves the kernel's
/// autotuning). A subscriber that stops reading then holds at most about that much in the kernel
/// (Linux doubles the figure for its bookkeeping), and its backlog moves on to the connection's
/// queue and from there to the log, which are bounded and counted. Left to autotuning, one such
/// socket on loopback held 4 MiB (measured with `ss`: a subscriber that read nothing while 8 MB
/// was published), a cost that neither `--queue-bytes-max` nor the lag limit sees. A socket that
/// refuses the setting keeps working as before.
pub fn bound_send_buffer(tcp: &TcpStream, bytes: usize) {
    if bytes == 0 {
        return;
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_send_buffer_size(bytes) {
        tracing::debug!(error = %e, "cannot bound a WebSocket's send buffer");
    }
}

/// What the kernel tells of a socket's sending: bytes its peer has acknowledged so far, and bytes
/// written that wait unsent (the peer's window, or the network, holds them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sending {
    pub acked: u64,
    pub unsent: u32,
}

/// `tcpi_bytes_acked` and `tcpi_notsent_bytes` of `tcp` (Linux 4.6 and later); `None` elsewhere
/// or on an error.
#[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
pub fn sending(tcp: &TcpStream) -> Option<Sending> {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain integers, so all zeroes is a valid value.
    #[allow(unsafe_code)]
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: the kernel writes at most `len` bytes to `info`, which is that long, and sets
    // `len` to what it wrote; `tcp` keeps its descriptor open for the call.
    #[allow(unsafe_code)]
    let done = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    // An older kernel writes less than the struct, and leaves these fields out.
    let reaches = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + 4;
    (done == 0 && usize::try_from(len).ok()? >= reaches).then_some(Sending {
        acked: info.tcpi_bytes_acked,
        unsent: info.tcpi_notsent_bytes,
    })
}

#[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
pub fn sending(_tcp: &TcpStream) -> Option<Sending> {
    None
}

#[cfg(all(
    test,
    target_os = "linux",
    any(target_env = "gnu", target_env = "musl")
))]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// What `ws.rs` relies on: with a peer that reads nothing, bytes wait unsent and the count
    /// acknowledged stops; once the peer reads, more is acknowledged.
    #[tokio::test]
    async fn sending_shows_a_backlog_and_what_the_peer_reads_of_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let fresh = sending(&server).unwrap();
        assert_eq!(fresh.unsent, 0);

        let chunk = vec![7u8; 64 << 10];
        let mut written = 0;
        while let Ok(n) = server.try_write(&chunk) {
            written += n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stuck = sending(&server).unwrap();
        assert!(stuck.unsent > 0, "{stuck:?}");
        assert!(stuck.acked < written as u64, "{stuck:?} of {written}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sending(&server).unwrap().acked, stuck.acked);

        let mut read = vec![0u8; written.min(64 << 10)];
        client.read_exact(&mut read).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let moved = sending(&server).unwrap();
        assert!(moved.acked > stuck.acked, "{moved:?} after {stuck:?}");
    }

    /// Bytes written to a peer that reads nothing, until the socket takes no more.
    async fn backlog_taken(bound: usize) -> usize {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        bound_send_buffer(&server, bound);
        let chunk = vec![7u8; 16 << 10];
        let mut written = 0;
        // Autotuning grows the buffer as the peer's window opens: keep writing while it does.
        for _ in 0..20 {
            while let Ok(n) = server.try_write(&chunk) {
                written += n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        written
    }

    /// With the bound, a peer that reads nothing leaves far less in the kernel than autotuning
    /// lets it (the peer's own receive buffer holds some of either).
    #[tokio::test]
    async fn a_bounded_send_buffer_holds_less_of_a_stalled_peers_backlog() {
        let bounded = backlog_taken(64 << 10).await;
        let tuned = backlog_taken(0).await;
        assert!(bounded > 0);
        assert!(
            bounded < 1 << 20 && tuned > 2 * bounded,
            "bounded {bounded}, autotuned {tuned}"
        );
    }
}
