//! Lingering close (RFC 9112, section 9.6). A server that answers before it has read the whole
//! request (a 413 for a body over the limit, a refusal) and then closes at once leaves unread
//! bytes in the kernel, which answers them with a reset; the reset can erase the answer before
//! the client has read it, and the client sees "connection reset" instead of the 413. hyper reads
//! only what it is asked to and closes plainly, so the connection's stream does it on drop: it
//! sends its FIN first (the answer is complete), then reads and discards what the client still
//! sends, for at most `LINGER_TIME` and `LINGER_BYTES`, and only then closes.
//!
//! A stream whose client has already closed, or that has an error, is closed at once. The
//! lingering task holds no connection permit: it is bounded by time and bytes instead, and the
//! number of sockets lingering at once is bounded too (`LingerSlot`): each holds a descriptor
//! that the connection limit does not count, and a flood of refused or closing connections must
//! not take the descriptors the store keeps for its files. Past that bound a socket is closed at
//! once, and its client may see a reset.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Sockets lingering now, process-wide (descriptors are a process's resource).
static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// How many sockets may linger at once (`descriptors::lingering_within`), read once.
fn lingering_max() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| super::descriptors::lingering_within(super::descriptors::limit()))
}

/// A place among the lingering sockets, given back on drop.
struct LingerSlot;

impl LingerSlot {
    fn take() -> Option<LingerSlot> {
        let max = lingering_max();
        LINGERING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| LingerSlot)
    }
}

impl Drop for LingerSlot {
    fn drop(&mut self) {
        LINGERING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream that lingers when dropped (see the module docs).
pub struct LingeringTcp {
    /// Always `Some` until dropped.
    tcp: Option<TcpStream>,
}

impl LingeringTcp {
    pub fn new(tcp: TcpStream) -> LingeringTcp {
        LingeringTcp { tcp: Some(tcp) }
    }

    /// The socket, to be closed by its new owner (an upgraded WebSocket connection, which
    /// lingers through `linger` itself when it ends).
    pub fn into_tcp(mut self) -> Option<TcpStream> {
        self.tcp.take()
    }

    fn tcp(self: Pin<&mut Self>) -> io::Result<Pin<&mut TcpStream>> {
        match self.get_mut().tcp.as_mut() {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl AsyncRead for LingeringTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for LingeringTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl super::stall::Acked for LingeringTcp {
    fn acked(&self) -> Option<u64> {
        self.tcp
            .as_ref()
            .and_then(super::tcp::sending)
            .map(|s| s.acked)
    }
}

impl Drop for LingeringTcp {
    fn drop(&mut self) {
        let Some(tcp) = self.tcp.take() else { return };
        let mut probe = [0u8; 1];
        match tcp.try_read(&mut probe) {
            // The client closed and nothing is unread: a plain close sends no reset.
            Ok(0) => return,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
            // Unread bytes, or the client may still be sending.
            _ => {}
        }
        // Without a runtime or a free slot the socket closes here, at once.
        if let (Ok(runtime), Some(slot)) =
            (tokio::runtime::Handle::try_current(), LingerSlot::take())
        {
            runtime.spawn(async move {
                linger(tcp).await;
                drop(slot);
            });
        }
    }
}

/// Sends FIN, then discards what the client still sends, within the bounds, then closes.
async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 8192];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}
