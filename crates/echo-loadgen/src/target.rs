//! The server under test: a `ws://` or `mqtt://` URL.

use std::net::{SocketAddr, ToSocketAddrs};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    WebSocket,
    Mqtt,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::WebSocket => "websocket",
            Protocol::Mqtt => "mqtt",
        })
    }
}

/// A parsed and resolved target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub url: String,
    pub protocol: Protocol,
    /// `host:port` as written (the WebSocket `Host` header).
    pub authority: String,
    /// Path and query for WebSocket (`/` when empty).
    pub path: String,
    /// The address connections go to (the first the name resolves to).
    pub addr: SocketAddr,
}

impl Target {
    /// Parses and resolves `url`; every error says what to write instead.
    pub fn parse(url: &str) -> Result<Target, String> {
        let url = url.trim();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not a URL: write ws://HOST:PORT/PATH or mqtt://HOST:PORT"))?;
        let (protocol, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "ws" => (Protocol::WebSocket, 80),
            "mqtt" | "tcp" => (Protocol::Mqtt, 1883),
            "wss" | "mqtts" | "ssl" => {
                return Err(format!(
                    "{scheme}:// (TLS) is not supported: measure the server behind plain ws:// or mqtt://"
                ));
            }
            "http" | "https" => {
                return Err(format!(
                    "{url:?} is an HTTP URL: WebSocket servers are addressed as ws://HOST:PORT/PATH"
                ));
            }
            other => return Err(format!("unknown scheme {other:?}: use ws:// or mqtt://")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
        if authority.is_empty() {
            return Err(format!("{url:?} has no host: write e.g. {scheme}://127.0.0.1:{default_port}"));
        }
        if protocol == Protocol::Mqtt && path != "/" {
            return Err(format!("{url:?}: MQTT URLs have no path (topics are chosen by the scenario)"));
        }
        let has_port = match authority.rfind(':') {
            Some(i) => !authority[i..].contains(']'),
            None => false,
        };
        let hostport = if has_port { authority.to_string() } else { format!("{authority}:{default_port}") };
        let host = if has_port { &authority[..authority.rfind(':').unwrap_or(0)] } else { authority };
        let unresolved = |why: String| {
            format!(
                "cannot resolve the host {host:?} of {url} ({why}): is the name spelt right, and does this machine's \
                 resolver know it? Or give the server's IP address, e.g. {scheme}://127.0.0.1:{default_port}"
            )
        };
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| unresolved(e.to_string()))?
            .next()
            .ok_or_else(|| unresolved("no address".into()))?;
        Ok(Target { url: url.to_string(), protocol, authority: authority.to_string(), path, addr })
    }

    /// The URL handed to the WebSocket handshake.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.authority, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_websocket_and_mqtt() {
        let t = Target::parse("ws://127.0.0.1:8080/echo?x=1").unwrap();
        assert_eq!(t.protocol, Protocol::WebSocket);
        assert_eq!(t.path, "/echo?x=1");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        let t = Target::parse("ws://127.0.0.1:9").unwrap();
        assert_eq!(t.path, "/");
        let t = Target::parse("mqtt://127.0.0.1").unwrap();
        assert_eq!((t.protocol, t.addr.port()), (Protocol::Mqtt, 1883));
        let t = Target::parse("ws://[::1]:81").unwrap();
        assert_eq!(t.addr, "[::1]:81".parse().unwrap());
    }

    #[test]
    fn refuses_with_a_hint() {
        assert!(Target::parse("localhost:8080").unwrap_err().contains("ws://"));
        assert!(Target::parse("http://x:1/").unwrap_err().contains("ws://"));
        assert!(Target::parse("wss://x:1/").unwrap_err().contains("TLS"));
        assert!(Target::parse("mqtt://127.0.0.1:1883/topic").unwrap_err().contains("no path"));
        assert!(Target::parse("ws://").unwrap_err().contains("no host"));
        let e = Target::parse("ws://no-such-host.invalid:8080/").unwrap_err();
        assert!(
            e.starts_with(
                "cannot resolve the host \"no-such-host.invalid\" of ws://no-such-host.invalid:8080/"
            ),
            "{e}"
        );
        assert!(e.contains("give the server's IP address, e.g. ws://127.0.0.1:80"), "{e}");
        let e = Target::parse("mqtt://no-such-host.invalid").unwrap_err();
        assert!(e.contains("\"no-such-host.invalid\"") && e.contains("mqtt://127.0.0.1:1883"), "{e}");
    }
}
