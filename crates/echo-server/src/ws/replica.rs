//! Which replica answered (`websocket.send_server_hostname`): behind a load
//! balancer, a client can tell which of several servers it reached.
//!
//! The host's name is looked up once, at start; answers only copy it. It
//! goes into an [`HEADER`] header on every HTTP answer and on the upgrade,
//! and into a first text message on each echo session, as
//! jmalloc/echo-server's `SEND_SERVER_HOSTNAME` does. Off by default: a
//! host name says something about the infrastructure behind the port.

use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// The response header that names the host.
pub(crate) const HEADER: &str = "X-Served-By";

/// This host's name, as `gethostname(2)` gives it (in a container, the
/// container's, which Kubernetes sets to the pod's name).
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]);
    // It goes into a header: nothing but visible ASCII.
    let clean: String = name.chars().filter(|c| c.is_ascii_graphic()).collect();
    if clean.is_empty() { "unknown".to_owned() } else { clean }
}

/// The line that opens the text echo and is the first WebSocket message.
pub(crate) fn served_by(host: &str) -> String {
    format!("Request served by {host}")
}

/// The first message of an echo session, as an unmasked server frame, to
/// go out in the same write as the `101` response.
pub(crate) fn greeting_frame(host: &str) -> Vec<u8> {
    let payload = served_by(host);
    let header = FrameHeader { opcode: OpCode::Data(Data::Text), ..FrameHeader::default() };
    let mut frame = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
    header.format(payload.len() as u64, &mut frame).expect("writing to a Vec cannot fail");
    frame.extend_from_slice(payload.as_bytes());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hostname_is_a_header_value() {
        let host = hostname();
        assert!(!host.is_empty() && host.chars().all(|c| c.is_ascii_graphic()), "{host:?}");
    }

    #[test]
    fn the_greeting_is_one_final_unmasked_text_frame() {
        let frame = greeting_frame("web-1");
        let text = b"Request served by web-1";
        assert_eq!(frame[0], 0x81, "FIN, text");
        assert_eq!(frame[1] as usize, text.len(), "no mask bit, short length");
        assert_eq!(&frame[2..], text);
    }
}
