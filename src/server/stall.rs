//! Peers that stop reading. A client that sends a request or subscribes and then never reads
//! again leaves the server's writes pending forever: its kernel keeps acknowledging window probes,
//! so TCP alone never gives up, and the connection would hold its descriptor, its connection
//! place and its answer's or queue's buffers for the life of the process (measured before this:
//! 20 HTTP readers of a 24 MB answer that never read held 20 MB and 20 descriptors for as long
//! as they stayed; a WebSocket subscriber likewise, past its idle timeout).
//!
//! `WriteStall` wraps a connection's write side: a write that makes no progress (the socket takes
//! not one byte) for `write_timeout` fails with `TimedOut`, which ends the connection like any
//! other write error. The clock runs only while a write is pending, so an idle connection, or a
//! slow one that takes some bytes now and then, is never cut; and it costs nothing on the fast
//! path (no timer exists until a write is refused).

use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct WriteStall<T> {
    inner: T,
    write_timeout: Duration,
    /// Counts the connections cut (`ivy_write_timeouts`).
    timeouts: Counter,
    /// Armed at the first pending write and dropped at the next progress.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteStall<T> {
    pub fn new(inner: T, write_timeout: Duration, timeouts: Counter) -> WriteStall<T> {
        WriteStall {
            inner,
            write_timeout,
            timeouts,
            deadline: None,
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    /// After the inner write answered: a pending one starts (or keeps) the clock, and fails once
    /// it has run out; anything else stops it.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.deadline = None;
            return polled;
        }
        let timeout = self.write_timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.timeouts.inc();
                tracing::info!(
                    seconds = timeout.as_secs_f64(),
                    "closing a connection whose peer took no bytes"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer took no bytes within the write timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
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

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
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
