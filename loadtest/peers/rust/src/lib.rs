//! What the peers of `loadtest/run.sh --only threads` share: reading a
//! size such as `64k` from the command line.
//!
//! The binaries are `threaded-echo` (std::net + tungstenite's blocking API,
//! one OS thread per connection) and `tokio-mt-echo` (tokio's
//! work-stealing runtime with tokio-tungstenite). Both echo every text and
//! binary message back, answer pings and close politely, like echo-server.

use tungstenite::protocol::WebSocketConfig;

/// echo-server's default `websocket.read_buffer_size`, which it also uses
/// for the write buffer.
pub const ECHO_SERVER_BUFFER: &str = "8k";

/// The codec settings echo-server uses by default, so that the peers
/// differ from it in threads and scheduling, not in buffers: tungstenite's
/// own default read buffer is 128 KiB a connection, which alone would
/// swamp the memory figures. (echo-server also shrinks an idle
/// connection's read buffer to 256 bytes; these peers do not.)
pub fn codec(buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(buffer)
        .write_buffer_size(buffer)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// A byte count with an optional `k`/`m` suffix (powers of 1024), as
/// `--stack-size 64k` takes it.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, unit) = match t.strip_suffix(['k', 'm']) {
        Some(d) => (d, if t.ends_with('k') { 1024 } else { 1024 * 1024 }),
        None => (t.as_str(), 1),
    };
    let n: usize = digits.parse().map_err(|_| format!("{s:?} is not a size such as 65536, 64k or 2m"))?;
    n.checked_mul(unit).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_follows_echo_server() {
        let c = codec(parse_size(ECHO_SERVER_BUFFER).unwrap());
        assert_eq!(c.read_buffer_size, 8192);
        assert_eq!(c.write_buffer_size, 8192);
        assert_eq!(c.max_message_size, Some(16 << 20));
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2m"), Ok(2 * 1024 * 1024));
        assert!(parse_size("64q").is_err());
        assert!(parse_size("").is_err());
    }
}
