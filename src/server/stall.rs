//! Peers that stop reading. A client that sends a request or subscribes and then never reads
//! again leaves the server's writes pending forever: its kernel keeps acknowledging window probes,
//! so TCP alone never gives up, and the connection would hold its descriptor, its connection
//! place and its answer's or queue's buffers for the life of the process (measured before this:
//! 20 HTTP readers of a 24 MB answer that never read held 20 MB and 20 descriptors for as long
//! as they stayed; a WebSocket subscriber likewise, past its idle timeout).
//!
//! `WriteStall` wraps a connection's write side: a write that makes no progress for
//! `write_timeout` fails with `TimedOut`, which ends the connection like any other write error.
//! The clock runs only while a write is pending, so an idle connection, or a slow one that takes
//! some bytes now and then, is never cut; and it costs nothing on the fast path (no timer exists
//! until a write is refused).
//!
//! Progress is the socket taking a byte, or, where the kernel tells (`Acked`, `tcp::sending`),
//! the peer acknowledging more of what the socket holds. The second matters for a peer that
//! reads steadily but slowly: the kernel lets a write through only once a third of the send
//! buffer (autotuned up to 4 MiB) has drained, which at 20 KB/s takes longer than a minute. A
//! test client with a 4 KiB receive window, whose window updates waited for the sender's 200 ms
//! probes, was cut that way while it was reading.

use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A write side that can tell how much its peer has acknowledged (`tcp::sending`), or `None`
/// where that is unknown; then only bytes the socket takes count as progress.
pub trait Acked {
    fn acked(&self) -> Option<u64>;
}

pub struct WriteStall<T> {
    inner: T,
    write_timeout: Duration,
    /// Counts the connections cut (`ivy_write_timeouts`).
    timeouts: Counter,
    /// Armed at the first pending write and dropped at the next progress.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// What the peer had acknowledged when the clock was (re)started.
    acked_at_start: Option<u64>,
}

impl<T> WriteStall<T> {
    pub fn new(inner: T, write_timeout: Duration, timeouts: Counter) -> WriteStall<T> {
        WriteStall {
            inner,
            write_timeout,
            timeouts,
            deadline: None,
            acked_at_start: None,
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    /// After the inner write answered: a pending one starts (or keeps) the clock, and fails once
    /// it has run out with nothing acknowledged meanwhile; anything else stops it.
    fn watch<R>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>>
    where
        T: Acked,
    {
        if polled.is_ready() {
            self.deadline = None;
            return polled;
        }
        let timeout = self.write_timeout;
        if self.deadline.is_none() {
            // One system call per stall, not per write.
            self.acked_at_start = self.inner.acked();
            self.deadline = Some(Box::pin(tokio::time::sleep(timeout)));
        }
        let Some(deadline) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        while deadline.as_mut().poll(cx).is_ready() {
            let acked = self.inner.acked();
            if acked.is_some() && acked > self.acked_at_start {
                // Reading, slower than the send buffer lets writes through: a new period.
                self.acked_at_start = acked;
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + timeout);
                continue;
            }
            self.timeouts.inc();
            tracing::info!(
                seconds = timeout.as_secs_f64(),
                "closing a connection whose peer took no bytes"
            );
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took no bytes within the write timeout",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Acked + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A pipe tells nothing of what its far end acknowledged.
    impl Acked for tokio::io::DuplexStream {
        fn acked(&self) -> Option<u64> {
            None
        }
    }

    /// A socket whose send buffer stays full while its peer acknowledges `acked` bytes: the
    /// kernel lets no write through until a third of the buffer has drained.
    struct FullSendBuffer {
        acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl Acked for FullSendBuffer {
        fn acked(&self) -> Option<u64> {
            Some(self.acked.load(std::sync::atomic::Ordering::Relaxed))
        }
    }

    impl AsyncWrite for FullSendBuffer {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_acknowledges_what_the_socket_holds_is_reading() {
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut w = WriteStall::new(
            FullSendBuffer {
                acked: std::sync::Arc::clone(&acked),
            },
            TIMEOUT,
            Counter::default(),
        );
        // The peer acknowledges 4 KiB every 4 s for 40 s, then nothing more.
        let peer = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                acked.fetch_add(4096, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let started = tokio::time::Instant::now();
        let e = w.write_all(b"waits").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Cut within two timeouts of its last acknowledgement, not before.
        let cut = started.elapsed();
        assert!(cut > Duration::from_secs(40) + TIMEOUT, "{cut:?}");
        assert!(cut <= Duration::from_secs(40) + 2 * TIMEOUT, "{cut:?}");
        peer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails_after_the_timeout() {
        // A pipe that holds 64 bytes, and a far end that is kept open but never read.
        let (near, _far) = tokio::io::duplex(64);
        let mut w = WriteStall::new(near, TIMEOUT, Counter::default());
        let started = tokio::time::Instant::now();
        let e = w.write_all(&[1u8; 1000]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), TIMEOUT);
        assert_eq!(w.timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_peer_that_takes_bytes_within_each_timeout_is_not_cut() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut w = WriteStall::new(near, TIMEOUT, Counter::default());
        // 64 bytes every 4 s: the whole write takes far longer than the timeout, but no wait
        // for the peer lasts a whole one.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 1000 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                got += far.read(&mut buf).await.unwrap();
            }
            got
        });
        let started = tokio::time::Instant::now();
        w.write_all(&[2u8; 1000]).await.unwrap();
        assert!(started.elapsed() > TIMEOUT * 5);
        assert_eq!(reader.await.unwrap(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_has_no_clock() {
        let (near, _far) = tokio::io::duplex(64);
        let mut w = WriteStall::new(near, TIMEOUT, Counter::default());
        tokio::time::sleep(TIMEOUT * 12).await;
        w.write_all(b"still here").await.unwrap();
        assert!(w.deadline.is_none());
    }
}
