//! One WebSocket session after the handshake: echo, keepalive, closing.
//!
//! A session alternates between two phases:
//!
//! - **quiet**: only the TCP stream and a few counters exist (see
//!   [`SessionIo`]); the task waits for the socket to become readable, for
//!   its keepalive timer, or for shutdown. This is where an idle connection
//!   spends its life, and why it costs so little memory.
//! - **active**: a tungstenite `WebSocketStream` is built around the socket;
//!   messages are read and their echoes queued; when there is nothing more
//!   to read, the queued echoes go out in one write (a large echo goes out
//!   on its own, see [`echo`]). That write must complete before anything
//!   more is read, which is the backpressure: a client that does not read
//!   stops being read, and is closed after `write_timeout`. When tungstenite has consumed every byte received, no
//!   message is half-read and nothing is left to write, the stream is taken
//!   apart again and the session goes back to quiet.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tracing::debug;

use super::WsServer;
use super::handshake::linger_close;
use super::io::SessionIo;
use super::stream::Stream;

type Ws = WebSocketStream<SessionIo>;

/// Read buffer of a session woken only to send a ping or a close frame.
const CONTROL_READ_BUFFER: usize = 256;

/// A timer deadline far enough away to mean "never".
const NEVER: Duration = Duration::from_secs(86_400 * 365);

/// What woke a quiet session.
#[derive(Debug, Clone, Copy)]
enum Wake {
    Readable,
    Timer,
    Shutdown,
}

/// What the active phase reacts to.
#[derive(Debug)]
enum Event {
    Message(Message),
    Failed(WsError),
    /// The stream ended after a completed closing handshake.
    Ended,
    /// tungstenite holds nothing: the session may go quiet.
    Quiet,
    /// Replies are waiting for the client to read them.
    WriteBlocked,
    Timer,
    Shutdown,
}

/// How an active phase ended.
enum Step {
    Quiet(SessionIo),
    Done,
}

/// Wraps a freshly upgraded socket for [`run`]. `leftover` holds bytes the
/// client sent right after its handshake (its first frames, if it did not
/// wait for the response).
pub fn session_io(stream: Stream, leftover: Vec<u8>, server: &WsServer) -> (SessionIo, Option<Vec<u8>>) {
    let metrics = &server.metrics;
    let mut io = SessionIo::new(
        stream,
        metrics.bytes_received.clone(),
        metrics.bytes_sent.clone(),
        server.budget.clone(),
    );
    if leftover.is_empty() {
        return (io, None);
    }
    io.observe_prefix(&leftover);
    (io, Some(leftover))
}

/// Serves a session until it closes.
///
/// Written as a function returning an `async move` block rather than as an
/// `async fn`: an `async fn` keeps its arguments and the locals they are
/// moved into side by side, and this future lives as long as the
/// connection, so every byte of it is paid per client.
#[allow(clippy::manual_async_fn)] // deliberate, see above
pub fn run(
    mut io: SessionIo,
    mut prefix: Option<Vec<u8>>,
    server: &WsServer,
) -> impl std::future::Future<Output = ()> + '_ {
    async move {
        let mut keepalive = Keepalive::new(&server.config, Instant::now());
        let timer = tokio::time::sleep_until(keepalive.deadline(Instant::now()));
        tokio::pin!(timer);
        loop {
            let wake = if prefix.is_some() {
                Wake::Readable
            } else {
                tokio::select! {
                    biased;
                    _ = server.shutdown.wait() => Wake::Shutdown,
                    _ = &mut timer => Wake::Timer,
                    // An error is seen again, and handled, by the read that follows.
                    _ = io.stream().readable() => Wake::Readable,
                }
            };
            // Boxed so the stream and its state exist only while active: the
            // quiet session's own future stays small.
            match Box::pin(active(io, prefix.take(), wake, &mut keepalive, timer.as_mut(), server)).await {
                Step::Quiet(back) => io = back,
                Step::Done => return,
            }
        }
    }
}

/// Builds the WebSocket stream around the socket and serves the client
/// until it is quiet again or the session ends.
async fn active(
    io: SessionIo,
    prefix: Option<Vec<u8>>,
    wake: Wake,
    keepalive: &mut Keepalive,
    mut timer: Pin<&mut Sleep>,
    server: &WsServer,
) -> Step {
    // Woken by its timer or by shutdown, a session only sends a ping or a
    // close and reads the short answer: a small read buffer will do, which
    // matters when every session wakes at once to be closed.
    let codec = match wake {
        Wake::Readable => server.codec,
        Wake::Timer | Wake::Shutdown => server.codec.read_buffer_size(CONTROL_READ_BUFFER),
    };
    let mut ws = match prefix {
        Some(bytes) => WebSocketStream::from_partially_read(io, bytes, Role::Server, Some(codec)).await,
        None => WebSocketStream::from_raw_socket(io, Role::Server, Some(codec)).await,
    };
    let metrics = &server.metrics;
    let mut pending = match wake {
        Wake::Readable => None,
        Wake::Timer => Some(Event::Timer),
        Wake::Shutdown => Some(Event::Shutdown),
    };
    loop {
        let event = match pending.take() {
            Some(event) => event,
            None => next_event(&mut ws, timer.as_mut(), server).await,
        };
        match event {
            Event::Message(message) => {
                keepalive.heard(Instant::now());
                match message {
                    Message::Text(text) => {
                        metrics.text_received.inc();
                        keepalive.data(Instant::now());
                        if !complete(&mut ws, |ws| echo(ws, Message::Text(text), server), server).await {
                            return Step::Done;
                        }
                        metrics.text_sent.inc();
                    }
                    Message::Binary(bytes) => {
                        metrics.binary_received.inc();
                        keepalive.data(Instant::now());
                        if !complete(&mut ws, |ws| echo(ws, Message::Binary(bytes), server), server).await {
                            return Step::Done;
                        }
                        metrics.binary_sent.inc();
                    }
                    // tungstenite queues the pong itself; it goes out with
                    // the next read or flush.
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(frame) => {
                        // tungstenite answers with the same code (1002 if the
                        // code is not one a peer may send); the next read
                        // flushes that answer and ends the stream.
                        let code = frame.as_ref().map(|f| u16::from(f.code));
                        metrics.close_received(code);
                        let answered =
                            frame.map(|f| if f.code.is_allowed() { u16::from(f.code) } else { 1002 });
                        metrics.close_sent(answered);
                        metrics.closed("client_close");
                    }
                    Message::Frame(_) => {}
                }
            }
            Event::Quiet => return Step::Quiet(ws.into_inner()),
            // Backpressure: nothing more is read from this client until it
            // has read what it was sent.
            Event::WriteBlocked => {
                if !complete(&mut ws, ws_flush, server).await {
                    return Step::Done;
                }
            }
            Event::Ended => {
                shut_down(ws, Instant::now() + server.config.close_timeout).await;
                return Step::Done;
            }
            Event::Failed(err) => return fail(ws, err, server).await,
            Event::Shutdown => {
                let deadline = server
                    .shutdown
                    .deadline()
                    .unwrap_or_else(|| Instant::now() + server.config.close_timeout);
                metrics.closed("shutdown");
                close(ws, CloseCode::Away, "server shutting down", deadline, server).await;
                return Step::Done;
            }
            Event::Timer => {
                let now = Instant::now();
                match keepalive.on_timer(now, ws.get_ref().bytes_in()) {
                    TimerAction::Wait => {}
                    TimerAction::Ping => {
                        if !complete(&mut ws, |ws| ws.send(Message::Ping(Default::default())), server).await {
                            return Step::Done;
                        }
                    }
                    TimerAction::PingTimeout => {
                        metrics.closed("ping_timeout");
                        let deadline = now + server.config.close_timeout;
                        close(ws, CloseCode::Away, "ping timeout", deadline, server).await;
                        return Step::Done;
                    }
                    TimerAction::IdleTimeout => {
                        metrics.closed("idle_timeout");
                        let deadline = now + server.config.close_timeout;
                        close(ws, CloseCode::Normal, "idle timeout", deadline, server).await;
                        return Step::Done;
                    }
                }
                timer.as_mut().reset(keepalive.deadline(now));
            }
        }
    }
}

/// Waits for the next thing to do. Shutdown and the timer come first, so a
/// client that never stops sending cannot delay them.
async fn next_event(ws: &mut Ws, mut timer: Pin<&mut Sleep>, server: &WsServer) -> Event {
    let shutdown = server.shutdown.wait();
    tokio::pin!(shutdown);
    poll_fn(|cx| {
        if shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Shutdown);
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        // Backpressure before reading: while the echo of a message could
        // not be written in full, the next message stays in the socket, so
        // a client that does not read costs one message, not two.
        if ws.get_ref().write_blocked() {
            match ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Event::Failed(err)),
                Poll::Pending => return Poll::Ready(Event::WriteBlocked),
            }
        }
        match ws.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(message))) => Poll::Ready(Event::Message(message)),
            Poll::Ready(Some(Err(err))) => Poll::Ready(Event::Failed(err)),
            Poll::Ready(None) => Poll::Ready(Event::Ended),
            // tungstenite wants more bytes. If those it has end a whole
            // message, it holds none; once anything queued (a pong) is
            // written, the session can go quiet.
            // Nothing more to read for now: write out the replies queued
            // so far (one write for all the messages that came together).
            // If tungstenite then holds no received byte either, the
            // session can go quiet.
            Poll::Pending => match ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) if ws.get_ref().at_message_boundary() => Poll::Ready(Event::Quiet),
                Poll::Ready(Ok(())) => Poll::Pending,
                Poll::Ready(Err(err)) => Poll::Ready(Event::Failed(err)),
                Poll::Pending => Poll::Ready(Event::WriteBlocked),
            },
        }
    })
    .await
}

/// Queues the echo of a data message. A small one goes into tungstenite's
/// write buffer, to go out in one write with the others that came with it.
/// One larger than that buffer is written straight from the bytes received,
/// once everything queued before it is out: tungstenite would copy it into
/// its write buffer, while its read buffer keeps the allocation the message
/// was read into, and a client that does not read would then cost the
/// server two messages instead of one.
async fn echo(ws: &mut Ws, message: Message, server: &WsServer) -> Result<(), WsError> {
    let direct_above = server.config.read_buffer_size as usize;
    let (opcode, payload) = match message {
        Message::Text(text) if text.len() > direct_above => (OpData::Text, Bytes::from(text)),
        Message::Binary(bytes) if bytes.len() > direct_above => (OpData::Binary, bytes),
        small => return ws.feed(small).await,
    };
    ws.flush().await?;
    let header = FrameHeader { opcode: OpCode::Data(opcode), ..FrameHeader::default() };
    let mut head = Vec::with_capacity(header.len(payload.len() as u64));
    header.format(payload.len() as u64, &mut head)?;
    let io = ws.get_mut();
    io.write_all(&head).await?;
    io.write_all(&payload).await?;
    Ok(())
}

/// Runs one write operation on the stream — queueing a reply (`feed`, which
/// waits only if earlier replies are still blocked), sending, or flushing —
/// and gives up on the client after `write_timeout`.
async fn complete<'a, F, Fut>(ws: &'a mut Ws, op: F, server: &WsServer) -> bool
where
    F: FnOnce(&'a mut Ws) -> Fut,
    Fut: std::future::Future<Output = Result<(), WsError>>,
{
    match tokio::time::timeout(server.config.write_timeout, op(ws)).await {
        Ok(Ok(())) => true,
        Ok(Err(err)) => {
            debug!(error = %err, "write failed");
            server.metrics.closed("reset");
            false
        }
        Err(_) => {
            debug!("client did not read for write_timeout; closing");
            server.metrics.closed("write_timeout");
            false
        }
    }
}

fn ws_flush(ws: &mut Ws) -> futures_util::sink::Flush<'_, Ws, Message> {
    ws.flush()
}

/// Ends a session whose client broke the protocol: the close code says why
/// (1002 protocol error, 1007 invalid UTF-8, 1009 too big), then the socket
/// is closed. Only this client is affected.
async fn fail(ws: Ws, err: WsError, server: &WsServer) -> Step {
    let metrics = &server.metrics;
    let (code, reason, label) = match &err {
        WsError::ConnectionClosed | WsError::AlreadyClosed => return Step::Done,
        // RFC 6455 §7.4.1 leaves 1013 (try again later) to servers that
        // are overloaded: the memory budget kept this client paused too long.
        WsError::Io(e) if crate::budget::is_paused_too_long(e) => {
            (CloseCode::Again, "the server is at its memory limit".to_owned(), "memory_limit")
        }
        WsError::Io(_)
        | WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => {
            debug!(error = %err, "client went away");
            metrics.closed("reset");
            return Step::Done;
        }
        WsError::Capacity(_) => (CloseCode::Size, "message too big".to_owned(), "message_too_big"),
        WsError::Utf8(_) => (CloseCode::Invalid, "invalid UTF-8".to_owned(), "invalid_utf8"),
        WsError::Protocol(e) => (CloseCode::Protocol, format!("protocol error: {e}"), "protocol_error"),
        other => (CloseCode::Error, format!("{other}"), "internal_error"),
    };
    debug!(error = %err, code = u16::from(code), "closing a misbehaving client");
    metrics.closed(label);
    metrics.close_sent(Some(u16::from(code)));
    let mut reason = reason;
    // A close frame's reason must fit in 123 bytes.
    while reason.len() > 123 {
        reason.pop();
    }
    let frame = CloseFrame { code, reason: reason.into() };
    let limit = server.config.close_timeout;
    let mut ws = ws;
    let _ = tokio::time::timeout(limit, ws.close(Some(frame))).await;
    // tungstenite ends its stream after a read error, so the client's answer
    // is read and dropped at the TCP level.
    let mut io = ws.into_inner();
    linger_close(io.stream_mut(), limit).await;
    Step::Done
}

/// Starts a closing handshake and waits, until `deadline`, for the client to
/// answer it.
async fn close(mut ws: Ws, code: CloseCode, reason: &'static str, deadline: Instant, server: &WsServer) {
    let metrics = &server.metrics;
    metrics.close_sent(Some(u16::from(code)));
    let frame = CloseFrame { code, reason: reason.into() };
    if !matches!(tokio::time::timeout_at(deadline, ws.close(Some(frame))).await, Ok(Ok(()))) {
        return;
    }
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                metrics.close_received(frame.map(|f| u16::from(f.code)));
            }
            // Data that was already on its way is dropped: we said goodbye.
            Ok(Some(Ok(_))) => {}
            Ok(None) => return shut_down(ws, deadline).await,
            Ok(Some(Err(_))) | Err(_) => return,
        }
    }
}

/// Ends a connection whose closing handshake is complete: the server
/// closes the TCP connection first (RFC 6455 §7.1.1), and over TLS sends a
/// close_notify before, without which a client cannot tell the end from a
/// cut (rustls reports an unexpected end of file).
async fn shut_down(ws: Ws, deadline: Instant) {
    let mut io = ws.into_inner();
    let _ = tokio::time::timeout_at(deadline, io.shutdown()).await;
}

/// What the keepalive timer asks for.
#[derive(Debug, PartialEq, Eq)]
enum TimerAction {
    Wait,
    Ping,
    PingTimeout,
    IdleTimeout,
}

/// Keepalive and idle bookkeeping for one session. Cheap on purpose: a busy
/// session reads the clock once per message and wakes its timer once per
/// `ping_interval`, however many messages it echoes.
#[derive(Debug)]
struct Keepalive {
    ping_interval: Option<Duration>,
    ping_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// When the client was last heard from.
    heard_at: Instant,
    /// `bytes_in` then: bytes arriving later also prove the client alive.
    heard_bytes: u64,
    ping_sent_at: Option<Instant>,
    last_data_at: Instant,
}

impl Keepalive {
    fn new(config: &crate::config::WebSocketConfig, now: Instant) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Keepalive {
            ping_interval: nonzero(config.ping_interval),
            ping_timeout: config.ping_timeout,
            idle_timeout: nonzero(config.idle_timeout),
            heard_at: now,
            heard_bytes: 0,
            ping_sent_at: None,
            last_data_at: now,
        }
    }

    fn heard(&mut self, now: Instant) {
        self.heard_at = now;
        self.ping_sent_at = None;
    }

    fn data(&mut self, now: Instant) {
        self.last_data_at = now;
    }

    fn on_timer(&mut self, now: Instant, bytes_in: u64) -> TimerAction {
        if bytes_in != self.heard_bytes {
            self.heard_bytes = bytes_in;
            self.heard(now);
        }
        if let Some(idle) = self.idle_timeout
            && now >= self.last_data_at + idle
        {
            return TimerAction::IdleTimeout;
        }
        if let Some(interval) = self.ping_interval {
            match self.ping_sent_at {
                Some(sent) if now >= sent + self.ping_timeout => return TimerAction::PingTimeout,
                Some(_) => {}
                None if now >= self.heard_at + interval => {
                    self.ping_sent_at = Some(now);
                    return TimerAction::Ping;
                }
                None => {}
            }
        }
        TimerAction::Wait
    }

    /// When the timer should next fire; always after `now`.
    fn deadline(&self, now: Instant) -> Instant {
        let mut deadline = now + NEVER;
        if let Some(idle) = self.idle_timeout {
            deadline = deadline.min(self.last_data_at + idle);
        }
        if let Some(interval) = self.ping_interval {
            let next = match self.ping_sent_at {
                Some(sent) => sent + self.ping_timeout,
                None => self.heard_at + interval,
            };
            deadline = deadline.min(next);
        }
        deadline.max(now + Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WebSocketConfig;

    fn config(ping: u64, timeout: u64, idle: u64) -> WebSocketConfig {
        WebSocketConfig {
            ping_interval: Duration::from_secs(ping),
            ping_timeout: Duration::from_secs(timeout),
            idle_timeout: Duration::from_secs(idle),
            ..WebSocketConfig::default()
        }
    }

    #[test]
    fn silent_client_is_pinged_then_dropped() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(&config(30, 10, 0), t0);
        assert_eq!(k.deadline(t0), t0 + 30 * s);
        assert_eq!(k.on_timer(t0 + 30 * s, 0), TimerAction::Ping);
        assert_eq!(k.deadline(t0 + 30 * s), t0 + 40 * s);
        assert_eq!(k.on_timer(t0 + 35 * s, 0), TimerAction::Wait);
        assert_eq!(k.on_timer(t0 + 40 * s, 0), TimerAction::PingTimeout);
    }

    #[test]
    fn any_bytes_count_as_an_answer() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(&config(30, 10, 0), t0);
        assert_eq!(k.on_timer(t0 + 30 * s, 0), TimerAction::Ping);
        // A large message is arriving: no pong yet, but bytes are.
        assert_eq!(k.on_timer(t0 + 40 * s, 5000), TimerAction::Wait);
        assert_eq!(k.deadline(t0 + 40 * s), t0 + 70 * s);
    }

    #[test]
    fn busy_client_is_never_pinged() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(&config(30, 10, 0), t0);
        k.heard(t0 + 29 * s);
        assert_eq!(k.on_timer(t0 + 30 * s, 0), TimerAction::Wait);
        assert_eq!(k.deadline(t0 + 30 * s), t0 + 59 * s);
    }

    #[test]
    fn idle_timeout_counts_data_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(&config(0, 10, 60), t0);
        assert_eq!(k.deadline(t0), t0 + 60 * s);
        k.data(t0 + 50 * s);
        k.heard(t0 + 100 * s);
        assert_eq!(k.on_timer(t0 + 60 * s, 0), TimerAction::Wait);
        assert_eq!(k.on_timer(t0 + 110 * s, 1), TimerAction::IdleTimeout);
    }

    #[test]
    fn everything_off_means_never() {
        let t0 = Instant::now();
        let k = Keepalive::new(&config(0, 10, 0), t0);
        assert!(k.deadline(t0) > t0 + Duration::from_secs(86_400 * 300));
    }
}
