//! A TCP listener that holds at most `max` connections open: past the limit it stops
//! accepting (new connections wait in the kernel's backlog) until one closes, so a flood of
//! idle connections cannot exhaust file descriptors or memory.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// [`TcpListener`] with a cap on open connections.
pub struct Limited {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl Limited {
    /// Wraps `inner`, keeping at most `max` (at least 1) connections open.
    pub fn new(inner: TcpListener, max: usize) -> Self {
        Self { inner, permits: Arc::new(Semaphore::new(max.max(1))) }
    }
}

/// A connection holding one of its listener's slots until it closes.
pub struct Conn {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl axum::serve::Listener for Limited {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, Self::Addr) {
        loop {
            // The semaphore is never closed, so acquiring only waits.
            let Ok(slot) = self.permits.clone().acquire_owned().await else { continue };
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let _ = io.set_nodelay(true);
                    return (Conn { io, _slot: slot }, addr);
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;

    #[tokio::test]
    async fn connections_past_the_limit_wait_until_one_closes() {
        let mut l = Limited::new(TcpListener::bind("127.0.0.1:0").await.unwrap(), 1);
        let addr = l.local_addr().unwrap();
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let (first, _) = l.accept().await;
        let second = tokio::time::timeout(std::time::Duration::from_millis(100), l.accept()).await;
        assert!(second.is_err(), "a second connection is not accepted while the first is open");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), l.accept()).await;
        assert!(second.is_ok(), "closing the first frees its slot");
    }
}
