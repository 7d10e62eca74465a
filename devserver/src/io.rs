//! A TCP stream that hyper drives while the request handler keeps a handle on it.
//!
//! hyper takes ownership of a connection's IO, but the `Reset` fault has to reach the
//! socket from inside a request: set `SO_LINGER` to zero so that closing it sends RST
//! instead of FIN. Sharing the stream through an `Arc` (readiness-based reads and writes
//! only need `&TcpStream`) makes that possible without unsafe code.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub(crate) struct SharedStream(pub(crate) Arc<TcpStream>);

/// Bounds how much of hyper's (possibly large, uninitialised) read buffer is zeroed per read.
const MAX_READ: usize = 64 * 1024;

impl AsyncRead for SharedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let want = buf.remaining().min(MAX_READ);
            match self.0.try_read(buf.initialize_unfilled_to(want)) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket; there is nothing buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        shutdown_write(&self.0);
        Poll::Ready(Ok(()))
    }
}

/// Half-closes the socket (FIN) through a duplicate descriptor: `shutdown(2)` acts on
/// the socket itself, and tokio only offers it on `&mut TcpStream`. Failures (peer
/// already gone) do not matter: the socket is closed when the last handle drops anyway.
#[cfg(unix)]
fn shutdown_write(stream: &TcpStream) {
    use std::os::fd::AsFd;
    if let Ok(fd) = stream.as_fd().try_clone_to_owned() {
        let _ = std::net::TcpStream::from(fd).shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(not(unix))]
fn shutdown_write(_stream: &TcpStream) {}
