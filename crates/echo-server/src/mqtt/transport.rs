//! The byte streams an MQTT session runs over: plain TCP, TLS, or binary
//! WebSocket messages on the WebSocket port (itself over TCP or TLS).
//!
//! One enum rather than a trait object: the session is generic over nothing,
//! and each variant keeps what it needs to read without holding a buffer
//! while the client is quiet. Plain TCP (the common case) reads into one
//! buffer the whole event loop shares and keeps only the bytes that came,
//! so an idle connection owns no read buffer at all.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rumqttd::protocol::DisconnectReasonCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::ws::stream::Stream;

/// Room reserved before each TLS read.
const READ_CHUNK: usize = 4096;

/// Bytes one plain-TCP read takes at most.
const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    /// What every plain-TCP MQTT read on this thread (the event loop) reads
    /// into, before the bytes are copied into the session's own buffer,
    /// which is then exactly as large as what came. A buffer of its own per
    /// connection would be reserved and given back around every read (an
    /// idle connection holds none): at one read per message, that large
    /// malloc and free (and glibc's consolidation of freed chunks it sets
    /// off) cost more than the copy, and each small message held a whole
    /// chunk alive for as long as any of its bytes were referenced.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

/// One read of a plain-TCP client into `buf`; `Ok(0)` when it closed.
///
/// Through `poll_read`, not readiness and `try_read`: a read that fills
/// less than the room it was given shows the socket drained, and tokio
/// then clears the readiness, so the next read waits for new bytes instead
/// of making a `recv` that finds nothing (one per message in a closed
/// loop, counted with perf).
fn poll_read_tcp(tcp: &mut TcpStream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    SCRATCH.with_borrow_mut(|scratch| {
        let mut read = ReadBuf::new(scratch);
        match Pin::new(tcp).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Waiting, a quiet connection holds no buffer.
                if buf.is_empty() {
                    *buf = BytesMut::new();
                }
                Poll::Pending
            }
        }
    })
}

/// Why the server ends a connection, as far as the byte stream can tell
/// the client: a WebSocket close code (RFC 6455 §7.4.1). TCP and TLS just
/// close; MQTT 5 clients learn the MQTT reason from the DISCONNECT or
/// CONNACK sent before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    /// 1000: the session or refusal ended the way MQTT expects.
    Normal,
    /// 1001: the server is shutting down.
    Away,
    /// 1002: the client broke MQTT (not MQTT at all, malformed, a protocol
    /// error), so that a WebSocket client sees the failure without
    /// speaking MQTT 5.
    Violation,
    /// 1009: a packet over `max_payload_size`.
    TooLarge,
}

impl Goodbye {
    /// The goodbye after a session that ends with the MQTT 5 DISCONNECT
    /// reason `code` (sent to MQTT 5 clients; `None`: the client
    /// disconnected). Shutting down comes first: the client is told the
    /// server is going.
    pub fn after_session(code: Option<DisconnectReasonCode>, shutting_down: bool) -> Goodbye {
        use DisconnectReasonCode::*;
        match code {
            _ if shutting_down => Goodbye::Away,
            Some(ServerShuttingDown) => Goodbye::Away,
            Some(PacketTooLarge) => Goodbye::TooLarge,
            Some(
                MalformedPacket
                | ProtocolError
                | TopicNameInvalid
                | TopicAliasInvalid
                | ReceiveMaximumExceeded,
            ) => Goodbye::Violation,
            _ => Goodbye::Normal,
        }
    }

    /// The goodbye for a connection refused before its session, by
    /// `reason`, the label it is counted under in `echo_mqtt_refused_total`
    /// (a refusal of a 3.1.1 CONNECT has no code to go by).
    pub fn for_refusal(reason: &str, shutting_down: bool) -> Goodbye {
        match reason {
            _ if shutting_down => Goodbye::Away,
            "shutdown" => Goodbye::Away,
            "too_large" => Goodbye::TooLarge,
            "not_connect" | "malformed" | "protocol_error" | "invalid_topic" => Goodbye::Violation,
            _ => Goodbye::Normal,
        }
    }

    fn close_code(self) -> CloseCode {
        match self {
            Goodbye::Normal => CloseCode::Normal,
            Goodbye::Away => CloseCode::Away,
            Goodbye::Violation => CloseCode::Protocol,
            Goodbye::TooLarge => CloseCode::Size,
        }
    }
}

/// A connection's byte stream.
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<WebSocketStream<Stream>>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp(_) => "Transport::Tcp",
            Transport::Tls(_) => "Transport::Tls",
            Transport::Ws(_) => "Transport::Ws",
        })
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

impl Transport {
    /// Whether the client has closed its end (see `budget::peer_gone`).
    pub fn peer_gone(&self) -> bool {
        match self {
            Transport::Tcp(tcp) => crate::budget::peer_gone(tcp),
            Transport::Tls(tls) => crate::budget::peer_gone(tls.get_ref().0),
            Transport::Ws(ws) => ws.get_ref().peer_gone(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp(_) => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws(_) => "websocket",
        }
    }

    /// Completes when the client has sent something (or closed). For TLS
    /// and WebSocket, whose layers may hold bytes already read, at once.
    pub async fn readable(&self) {
        if let Transport::Tcp(tcp) = self {
            let _ = tcp.readable().await;
        }
    }

    /// Appends what the client sent to `buf`; `Ok(0)` when it closed.
    /// Cancel-safe: nothing is lost if the future is dropped.
    ///
    /// This future is part of every idle MQTT session (it is what the
    /// session waits on), so what it holds while waiting is kept small:
    /// plain TCP is polled rather than awaited through `TcpStream::readable`
    /// (152 bytes of future), and the rare WebSocket close is boxed.
    pub async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Tcp(tcp) => std::future::poll_fn(|cx| poll_read_tcp(tcp, cx, buf)).await,
            Transport::Tls(tls) => {
                reserve(buf);
                tls.read_buf(buf).await
            }
            Transport::Ws(ws) => {
                let (code, error) = loop {
                    match ws.next().await {
                        Some(Ok(Message::Binary(bytes))) if bytes.is_empty() => continue,
                        Some(Ok(Message::Binary(bytes))) => {
                            buf.extend_from_slice(&bytes);
                            return Ok(bytes.len());
                        }
                        // tungstenite queues the pong and sends it with the
                        // next read or write.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        // RFC 6455 §7.4.1: 1003, a type of data this
                        // endpoint cannot accept.
                        Some(Ok(Message::Text(_))) => {
                            let why = "MQTT over WebSocket uses binary messages, not text";
                            break (
                                Some((CloseCode::Unsupported, why)),
                                io::Error::new(io::ErrorKind::InvalidData, why),
                            );
                        }
                        Some(Ok(Message::Close(_))) => {
                            // tungstenite has queued the answer, the
                            // client's own code (RFC 6455 §5.5.1); it only
                            // goes out with a later read or write, and the
                            // session ends here.
                            let _ = Box::pin(ws.flush()).await;
                            return Ok(0);
                        }
                        None => return Ok(0),
                        // Said with a close code, as to an echo client.
                        Some(Err(e)) => {
                            let code = match &e {
                                WsError::Capacity(_) => Some((CloseCode::Size, "")),
                                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
                                WsError::Protocol(_) => Some((CloseCode::Protocol, "")),
                                _ => None,
                            };
                            break (code, io::Error::other(e));
                        }
                    }
                };
                if let Some((code, why)) = code {
                    Box::pin(close_ws(ws, code, why)).await;
                }
                Err(error)
            }
        }
    }

    /// Writes every byte (as one binary message on WebSocket).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Tcp(tcp) => tcp.write_all(bytes).await,
            Transport::Tls(tls) => {
                tls.write_all(bytes).await?;
                tls.flush().await
            }
            Transport::Ws(ws) => {
                ws.send(Message::Binary(Bytes::copy_from_slice(bytes))).await.map_err(io::Error::other)
            }
        }
    }

    /// Ends the connection politely: FIN (TLS: close_notify; WebSocket: a
    /// close frame whose code says why, see [`Goodbye`]).
    pub async fn close(&mut self, why: Goodbye) {
        match self {
            Transport::Tcp(tcp) => {
                let _ = tcp.shutdown().await;
            }
            Transport::Tls(tls) => {
                let _ = tls.shutdown().await;
            }
            Transport::Ws(ws) => close_ws(ws, why.close_code(), "").await,
        }
    }

    /// After [`close`](Self::close): reads and drops whatever the client
    /// still sends until it closes too, so our last packet is not lost to a
    /// reset caused by unread input.
    pub async fn drain(&mut self) {
        let mut sink = BytesMut::new();
        loop {
            sink.clear();
            match self.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Sends a close frame, then ends our side of the stream (over TLS, a
/// close_notify, without which a client cannot tell the end from a cut);
/// the client's answer is read by whoever reads next.
async fn close_ws(ws: &mut WebSocketStream<Stream>, code: CloseCode, reason: &'static str) {
    if ws.close(Some(CloseFrame { code, reason: reason.into() })).await.is_ok() {
        let _ = ws.get_mut().shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A quiet TCP connection waits for its client without a read buffer,
    /// also after a read left the socket's readiness set.
    #[tokio::test]
    async fn a_quiet_connection_holds_no_read_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let mut transport = Transport::Tcp(listener.accept().await.unwrap().0);
        client.write_all(b"x").await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(transport.read(&mut buf).await.unwrap(), 1);
        // Consumed, as a session does: empty, its room still there.
        buf.clear();
        let waiting = tokio::time::timeout(Duration::from_millis(50), transport.read(&mut buf)).await;
        assert!(waiting.is_err(), "nothing was sent");
        assert_eq!(buf.capacity(), 0, "a waiting read holds no buffer");
        client.write_all(b"yz").await.unwrap();
        assert_eq!(transport.read(&mut buf).await.unwrap(), 2);
        assert_eq!(&buf[..], b"yz");
    }

    /// A client that sent data nobody read and then closed is seen gone
    /// without reading.
    #[tokio::test]
    async fn a_departed_client_is_seen_without_reading() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let transport = Transport::Tcp(listener.accept().await.unwrap().0);
        client.write_all(&[7; 10_000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!transport.peer_gone(), "connected, with unread data");
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(transport.peer_gone(), "closed, with unread data");
    }
}
