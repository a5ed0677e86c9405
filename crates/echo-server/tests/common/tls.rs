//! TLS for tests: a self-signed certificate made with `openssl` (skipping
//! loudly when it is missing, unless `REQUIRE_TEST_TOOLS=1`) and a rustls
//! client that trusts it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::tool_available;

/// Writes a self-signed certificate for 127.0.0.1 and its key into `dir`;
/// returns their paths, or `None` (skipping) without `openssl`.
pub fn self_signed(dir: &Path) -> Option<(String, String)> {
    if !tool_available("openssl (Debian package `openssl`)", Command::new("openssl").arg("version")) {
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-days", "2", "-subj", "/CN=echo-server test", "-addext", "subjectAltName=IP:127.0.0.1"])
        // An end-entity certificate (rustls refuses a CA certificate as one).
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl req failed");
    Some((cert.display().to_string(), key.display().to_string()))
}

/// Connects to `addr` over TLS, trusting only the certificate in `cert`.
pub async fn connect(addr: std::net::SocketAddr, cert: &str) -> TlsStream<TcpStream> {
    let pem = std::fs::read(cert).unwrap();
    let mut roots = RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(CertificateDer::from(c.unwrap().to_vec())).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake with the configured certificate")
}

/// `SECTION.tls_cert` and `SECTION.tls_key` (`mqtt` or `websocket`) given a
/// file that is no certificate: the server stops before it binds anything,
/// naming the key, exit status 1; only one of the two set: a configuration
/// error naming the other, exit status 2.
pub fn unusable_files_stop_the_start(section: &str) {
    let dir = std::env::temp_dir().join(format!("echo-{section}-badtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.display().to_string();
    let (cert_var, key_var) = (
        format!("ECHO_{}_TLS_CERT", section.to_uppercase()),
        format!("ECHO_{}_TLS_KEY", section.to_uppercase()),
    );
    let (status, _, stderr) = super::run_to_exit(
        &["--ws-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--no-admin"],
        &[(&cert_var, &junk), (&key_var, &junk)],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{section}.tls_cert")), "{stderr}");
    assert!(!stderr.contains("listening"), "nothing was bound: {stderr}");
    let (status, _, stderr) = super::run_to_exit(&["--no-admin"], &[(&cert_var, &junk)]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{section}.tls_key")), "{stderr}");
}
