//! TLS for the listeners that offer it (rustls, ring provider): the MQTT
//! port (`mqtt.tls_cert`, `mqtt.tls_key`) and the WebSocket/HTTP port
//! (`websocket.tls_cert`, `websocket.tls_key`).
//!
//! The certificate and key are read once at start; a file that cannot be
//! used stops the server before it binds, naming the key. Each listener
//! runs the handshake of a client in that client's own task, under its own
//! deadline, never in the accept loop.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsError {
    pub key: &'static str,
    pub reason: String,
}

/// Where a listener's PEM files are, and the configuration keys that named
/// them (an error names the key, not just the path).
#[derive(Debug, Clone, Copy)]
pub struct Files<'a> {
    pub cert_key: &'static str,
    pub cert: &'a str,
    pub key_key: &'static str,
    pub key: &'a str,
}

impl<'a> Files<'a> {
    /// The files configured under `section` (`"mqtt"`, `"websocket"`), or
    /// `None` when TLS is off there (validation makes both or neither set).
    pub fn of(section: &'static str, cert: &'a str, key: &'a str) -> Option<Self> {
        let (cert_key, key_key) = match section {
            "mqtt" => ("mqtt.tls_cert", "mqtt.tls_key"),
            _ => ("websocket.tls_cert", "websocket.tls_key"),
        };
        (!cert.is_empty() && !key.is_empty()).then_some(Files { cert_key, cert, key_key, key })
    }
}

/// Builds the acceptor from PEM files.
pub fn acceptor(files: Files<'_>) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(files.cert_key, files.cert)?;
    let key = read_key(files.key_key, files.key)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { key: files.cert_key, reason: e.to_string() })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError {
            key: files.key_key,
            reason: format!("does not match {}: {e}", files.cert_key),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn open(key: &'static str, path: &str) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| TlsError { key, reason: format!("cannot read {path}: {e}") })
}

fn read_certs(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(key, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError { key, reason: format!("{path} is not valid PEM: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError { key, reason: format!("{path} holds no certificate") });
    }
    Ok(certs)
}

fn read_key(key: &'static str, path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(key, path)?)
        .map_err(|e| TlsError { key, reason: format!("{path} is not valid PEM: {e}") })?
        .ok_or_else(|| TlsError { key, reason: format!("{path} holds no private key") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_name_their_key() {
        let dir = std::env::temp_dir().join(format!("echo-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let empty = empty.to_str().unwrap();
        let err = acceptor(Files::of("mqtt", empty, empty).unwrap()).err().unwrap();
        assert_eq!(err.key, "mqtt.tls_cert");
        let missing = Files::of("websocket", "/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap();
        let err = acceptor(missing).err().unwrap();
        assert!(err.to_string().starts_with("websocket.tls_cert: cannot read"), "{err}");
        assert!(Files::of("websocket", "", "").is_none(), "TLS off");
    }
}
