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
