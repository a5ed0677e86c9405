//! Optional TLS on the MQTT port (rustls, ring provider).
//!
//! The certificate and key are read once at start; a file that cannot be
//! used stops the server before it binds, naming the key. The handshake of
//! each client runs in that client's own task under `mqtt.connect_timeout`,
//! never in the accept loop.

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

/// Builds the acceptor from PEM files.
pub fn acceptor(cert_path: &str, key_path: &str) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(cert_path)?;
    let key = read_key(key_path)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { key: "mqtt.tls_cert", reason: e.to_string() })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError {
            key: "mqtt.tls_key",
            reason: format!("does not match mqtt.tls_cert: {e}"),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn open(key: &'static str, path: &str) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| TlsError { key, reason: format!("cannot read {path}: {e}") })
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let key = "mqtt.tls_cert";
    let certs = rustls_pemfile::certs(&mut open(key, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError { key, reason: format!("{path} is not valid PEM: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError { key, reason: format!("{path} holds no certificate") });
    }
    Ok(certs)
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key = "mqtt.tls_key";
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
        let err = acceptor(empty.to_str().unwrap(), empty.to_str().unwrap()).err().unwrap();
        assert_eq!(err.key, "mqtt.tls_cert");
        let err = acceptor("/nonexistent/cert.pem", "/nonexistent/key.pem").err().unwrap();
        assert!(err.to_string().starts_with("mqtt.tls_cert: cannot read"), "{err}");
    }
}
