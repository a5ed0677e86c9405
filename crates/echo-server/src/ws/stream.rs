//! The byte stream of one connection on the WebSocket/HTTP port: plain TCP,
//! or TLS over it when `websocket.tls_cert` and `websocket.tls_key` are set.
//!
//! One enum rather than a generic parameter: the HTTP requests, the echo
//! session, Server-Sent Events and MQTT over WebSocket are the same code
//! over either, and a plain connection pays one branch per call, not a
//! second copy of every future.
//!
//! Besides reading and writing, the connection's code waits for the client
//! to send something before it allocates anything to read into (that is how
//! an idle connection holds no buffer), and offers events to the socket
//! without waiting. For TLS, "readable" means the TCP socket is readable or
//! rustls already holds decrypted bytes; "without waiting" means handing
//! bytes to rustls, which writes what the socket takes at once and keeps
//! the rest (bounded by rustls's 64 KiB limit on unsent data) for the next
//! write or flush.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A connection's byte stream.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: rustls's state is large, and a plain connection should not
    /// pay for it.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Ready when a read may bring something: the socket is readable, or
    /// rustls holds decrypted bytes (or the client's close) not yet read.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tls(tls) if !tls.get_ref().1.wants_read() => Poll::Ready(Ok(())),
            _ => self.tcp().poll_read_ready(cx),
        }
    }

    /// Completes when a read may bring something (see [`Self::poll_read_ready`]).
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_read_ready(cx)).await
    }

    /// Reads what is there without waiting: `WouldBlock` when nothing is.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_read(buf),
            Stream::Tls(tls) => {
                let mut buf = ReadBuf::new(buf);
                match Pin::new(&mut **tls).poll_read(&mut no_wait(), &mut buf) {
                    Poll::Ready(Ok(())) => Ok(buf.filled().len()),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Writes what can be written without waiting: `WouldBlock` when
    /// nothing can. Over TLS, bytes rustls accepted but the socket did not
    /// take yet go out with the next write or flush.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_write(buf),
            Stream::Tls(tls) => match Pin::new(&mut **tls).poll_write(&mut no_wait(), buf) {
                Poll::Ready(result) => result,
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            },
        }
    }

    /// Whether the client has closed its end (see `budget::peer_gone`).
    pub fn peer_gone(&self) -> bool {
        crate::budget::peer_gone(self.tcp())
    }
}

/// A context for a poll that must not wait: a `Pending` answer is taken as
/// "would block", and whoever waits on the socket afterwards registers its
/// own waker then.
fn no_wait() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}
