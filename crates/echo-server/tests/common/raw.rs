//! A deliberately low-level WebSocket client over a blocking `TcpStream`,
//! for sending what well-behaved client libraries refuse to send: invalid
//! frames, bad UTF-8, unmasked frames, oversized lengths.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct RawClient {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

/// A frame as the server sent it (servers never mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawClient {
    /// Connects and completes the opening handshake.
    pub fn connect(addr: SocketAddr) -> RawClient {
        Self::connect_with(addr, "")
    }

    /// Connects offering the `mqtt` subprotocol: an MQTT session over
    /// WebSocket, its packets in binary messages.
    pub fn connect_mqtt(addr: SocketAddr) -> RawClient {
        Self::connect_with(addr, "Sec-WebSocket-Protocol: mqtt\r\n")
    }

    /// Connects with `headers` (each ending in CRLF) added to the request.
    fn connect_with(addr: SocketAddr, headers: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = format!(
            "GET / HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("handshake response");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        RawClient { stream, buffer: Vec::new() }
    }

    /// A client on a socket whose upgrade has been answered already.
    pub fn upgraded(stream: TcpStream) -> RawClient {
        RawClient { stream, buffer: Vec::new() }
    }

    /// Encodes a client frame (masked unless `masked` is false).
    pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
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
        let key = [0x37, 0xfa, 0x21, 0x3d];
        if masked {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let bytes = Self::frame(fin, opcode, payload, true);
        self.send_raw(&bytes);
    }

    /// Reads one frame; `None` when the server closed the TCP connection.
    pub fn read_frame(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some((frame, used)) = parse(&self.buffer) {
                self.buffer.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Reads frames until a close frame, skipping others; returns its code.
    pub fn read_close_code(&mut self) -> Option<u16> {
        while let Some(frame) = self.read_frame() {
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
        None
    }

    /// True if the server closes the TCP connection (EOF or reset) in time.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn parse(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, mut pos) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    assert_eq!(buf[1] & 0x80, 0, "servers must not mask frames");
    if buf.len() < pos + len {
        return None;
    }
    let payload = buf[pos..pos + len].to_vec();
    pos += len;
    Some((ServerFrame { fin: buf[0] & 0x80 != 0, opcode: buf[0] & 0x0f, payload }, pos))
}
