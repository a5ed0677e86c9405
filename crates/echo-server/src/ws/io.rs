//! The socket a WebSocket session reads and writes through: the TCP stream,
//! byte counters, and a follower of the client's frame boundaries.
//!
//! # Why follow frame boundaries
//!
//! tungstenite keeps a read buffer (and, once a message has been echoed, a
//! write buffer) inside each `WebSocketStream`. Tens of thousands of mostly
//! idle clients would pay for those buffers all the time. So a session drops
//! its `WebSocketStream` whenever tungstenite holds nothing, keeping only this
//! struct, and builds a fresh one when the socket becomes readable again.
//!
//! That is only correct if nothing is lost in between: tungstenite must not
//! hold part of a frame, nor part of a fragmented message. tungstenite does
//! not say what it holds, but everything it holds came through `poll_read`
//! here. [`FrameBoundary`] follows the frame headers in those bytes (it does
//! not validate: tungstenite does) and tells whether the bytes handed over so
//! far end exactly at the end of a complete message. If they do, and
//! tungstenite asked for more (it returned `Pending`), it has consumed all of
//! them, because it only reads when its buffer holds no complete frame.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::future::Future;
use std::rc::Rc;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Duration, Instant, Sleep};

use super::stream::Stream;
use crate::budget::{self, MemoryBudget, PAUSE_LIMIT, PAUSE_PARTIAL};
use crate::metrics::Count;

/// Follows frame headers through a byte stream, without validating them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FrameBoundary {
    /// The header of the current frame, as far as it has arrived.
    header: [u8; 14],
    header_len: u8,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// A data frame without FIN arrived and its message has not ended.
    in_fragmented_message: bool,
    /// Bytes seen since the last message boundary: how much of the
    /// message under way the WebSocket codec holds.
    message_bytes: u64,
}

impl FrameBoundary {
    /// Takes note of bytes as they are handed to the WebSocket codec.
    pub fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= skip;
                self.message_bytes += skip;
                bytes = &bytes[skip as usize..];
            } else {
                self.header[self.header_len as usize] = bytes[0];
                self.header_len += 1;
                self.message_bytes += 1;
                bytes = &bytes[1..];
                if self.header_len >= 2 && self.header_len == header_size(self.header[1]) {
                    self.frame_header_complete();
                }
            }
            if self.at_message_boundary() {
                self.message_bytes = 0;
            }
        }
    }

    fn frame_header_complete(&mut self) {
        let h = &self.header;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let len = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        // Control frames (opcode 8 and up) may come between the fragments of
        // a message without ending it.
        if opcode < 8 {
            self.in_fragmented_message = !fin;
        }
        self.payload_left = len;
        self.header_len = 0;
    }

    /// True when the bytes seen so far end exactly where a whole message (or
    /// control frame) ends.
    pub fn at_message_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0 && !self.in_fragmented_message
    }

    /// Bytes of the message under way seen so far (0 at a boundary).
    pub fn message_bytes(&self) -> u64 {
        self.message_bytes
    }
}

/// Length of a frame header, given its second byte.
fn header_size(second: u8) -> u8 {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The byte stream of one session (TCP or TLS), as tungstenite sees it.
#[derive(Debug)]
pub struct SessionIo {
    stream: Stream,
    boundary: FrameBoundary,
    bytes_in: u64,
    /// The last write to the socket would have blocked: tungstenite holds
    /// bytes it could not write (see [`SessionIo::write_blocked`]).
    write_blocked: bool,
    received: Count,
    sent: Count,
    budget: Rc<MemoryBudget>,
    /// Set while the memory budget keeps this client from being read.
    paused: Option<Box<Paused>>,
}

/// A session the memory budget has stopped reading, half-way through a
/// large message (see `budget`).
#[derive(Debug)]
struct Paused {
    since: Instant,
    /// Wakes the session to look at the budget again.
    recheck: Pin<Box<Sleep>>,
}

/// How soon a paused session looks at the budget again.
const BUDGET_RECHECK: Duration = Duration::from_millis(10);

impl SessionIo {
    pub fn new(stream: Stream, received: Count, sent: Count, budget: Rc<MemoryBudget>) -> Self {
        SessionIo {
            stream,
            boundary: FrameBoundary::default(),
            bytes_in: 0,
            write_blocked: false,
            received,
            sent,
            budget,
            paused: None,
        }
    }

    /// `Some` when the client must not be read now: half-way through a
    /// message larger than `budget::PAUSE_PARTIAL` while the memory budget
    /// is spent. Pending while it waits for room (a timer wakes it to look
    /// again); an error once it is gone, or has waited `budget::PAUSE_LIMIT`
    /// (the session then closes with 1013, try again later).
    fn hold_back(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        if self.boundary.message_bytes() < PAUSE_PARTIAL as u64 || !self.budget.spent() {
            self.paused = None;
            return None;
        }
        if self.paused.is_none() {
            self.budget.allows("read");
            let recheck = Box::pin(tokio::time::sleep(BUDGET_RECHECK));
            self.paused = Some(Box::new(Paused { since: Instant::now(), recheck }));
        }
        let paused = self.paused.as_mut()?;
        if self.stream.peer_gone() {
            return Some(Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())));
        }
        if paused.since.elapsed() >= PAUSE_LIMIT {
            return Some(Poll::Ready(Err(io::Error::other(budget::PausedTooLong))));
        }
        while paused.recheck.as_mut().poll(cx).is_ready() {
            paused.recheck.as_mut().reset(Instant::now() + BUDGET_RECHECK);
        }
        Some(Poll::Pending)
    }

    /// Accounts for bytes that were read during the handshake, after the
    /// request head, and are handed to tungstenite as already read.
    pub fn observe_prefix(&mut self, bytes: &[u8]) {
        self.boundary.observe(bytes);
        self.bytes_in += bytes.len() as u64;
        self.received.inc_by(bytes.len() as u64);
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    pub fn at_message_boundary(&self) -> bool {
        self.boundary.at_message_boundary()
    }

    /// True when tungstenite's last attempt to write failed for want of
    /// room in the socket: it still holds those bytes (it writes until its
    /// buffer is empty or a write would block, so a write that went through
    /// was followed by another attempt or left nothing behind). The session
    /// reads nothing more until they are out; otherwise a client that does
    /// not read would have the server hold the next message beside the echo
    /// of the last one.
    pub fn write_blocked(&self) -> bool {
        self.write_blocked
    }

    /// Bytes received from the client since the handshake: a sign of life
    /// even in the middle of a long message.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(held) = this.hold_back(cx) {
            return held;
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            this.boundary.observe(new);
            this.bytes_in += new.len() as u64;
            this.received.inc_by(new.len() as u64);
        }
        result
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.write_blocked = result.is_pending();
        if let Poll::Ready(Ok(n)) = result {
            this.sent.inc_by(n as u64);
        }
        result
    }

    /// Over TLS, a write may leave bytes inside rustls that the socket
    /// did not take: until a flush gets them out, the session is as
    /// blocked as if the write itself had waited.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_flush(cx);
        this.write_blocked = result.is_pending();
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame: FIN bit, opcode, payload length, masked or not.
    #[derive(Debug, Clone)]
    struct Frame {
        fin: bool,
        opcode: u8,
        len: usize,
        masked: bool,
    }

    fn encode(frame: &Frame) -> Vec<u8> {
        let mut out = vec![(if frame.fin { 0x80 } else { 0 }) | frame.opcode];
        let mask_bit = if frame.masked { 0x80 } else { 0 };
        match frame.len {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if frame.masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(0xa5, frame.len));
        out
    }

    /// A valid message: either one frame, or fragments with control frames
    /// in between.
    fn message() -> impl Strategy<Value = Vec<Frame>> {
        let len = prop_oneof![0usize..126, 126usize..70_000, Just(65_536usize)];
        let data = (1u8..=2, len.clone(), any::<bool>());
        let control = (8u8..=10, 0usize..126, any::<bool>()).prop_map(|(opcode, len, masked)| Frame {
            fin: true,
            opcode,
            len,
            masked,
        });
        (data, prop::collection::vec((len, any::<bool>(), prop::option::of(control)), 0..4)).prop_map(
            |((opcode, len, masked), continuations)| {
                let mut frames = vec![Frame { fin: continuations.is_empty(), opcode, len, masked }];
                let count = continuations.len();
                for (i, (len, masked, control)) in continuations.into_iter().enumerate() {
                    if let Some(control) = control {
                        frames.push(control);
                    }
                    frames.push(Frame { fin: i + 1 == count, opcode: 0, len, masked });
                }
                frames
            },
        )
    }

    proptest! {
        /// Whatever the read sizes, the follower says "boundary" exactly at
        /// the ends of whole messages and nowhere else.
        #[test]
        fn boundary_only_at_message_ends(
            messages in prop::collection::vec(message(), 1..6),
            chunk in 1usize..3000,
        ) {
            let mut stream = Vec::new();
            let mut ends = std::collections::BTreeSet::new();
            for msg in &messages {
                for frame in msg {
                    stream.extend(encode(frame));
                }
                ends.insert(stream.len());
            }
            // Feed one byte at a time near the start, then in chunks, and
            // check the state after every call.
            let mut tracker = FrameBoundary::default();
            let mut pos = 0;
            while pos < stream.len() {
                let step = if pos < 64 { 1 } else { chunk.min(stream.len() - pos) };
                let next = (pos + step).min(stream.len());
                tracker.observe(&stream[pos..next]);
                pos = next;
                if ends.contains(&pos) {
                    prop_assert!(tracker.at_message_boundary(), "should be at a boundary at {}", pos);
                } else {
                    prop_assert!(!tracker.at_message_boundary(), "should not be at a boundary at {}", pos);
                }
            }
        }
    }

    #[test]
    fn control_frame_between_messages_is_a_boundary() {
        let mut tracker = FrameBoundary::default();
        tracker.observe(&encode(&Frame { fin: true, opcode: 9, len: 4, masked: true }));
        assert!(tracker.at_message_boundary());
        tracker.observe(&encode(&Frame { fin: false, opcode: 1, len: 3, masked: true }));
        assert!(!tracker.at_message_boundary());
        tracker.observe(&encode(&Frame { fin: true, opcode: 10, len: 0, masked: true }));
        assert!(!tracker.at_message_boundary(), "a pong inside a fragmented message does not end it");
        tracker.observe(&encode(&Frame { fin: true, opcode: 0, len: 0, masked: true }));
        assert!(tracker.at_message_boundary());
    }

    #[test]
    fn header_sizes() {
        assert_eq!(header_size(0x05), 2);
        assert_eq!(header_size(0x85), 6);
        assert_eq!(header_size(0xfe), 8);
        assert_eq!(header_size(0xff), 14);
        assert_eq!(header_size(0x7f), 10);
    }
}
