//! Who may connect, and what they may do.
//!
//! Authentication: the one pair `mqtt.username`/`mqtt.password`
//! ([`Credentials`]), and/or the users of `mqtt.password_file`
//! ([`passwd`](super::passwd)); either one accepting a login lets the
//! client in. With neither set, every client is let in.
//!
//! Authorization: `mqtt.acl_file` ([`acl`](super::acl)), when set.
//!
//! Both files are read once, at start ([`Access::load`]), before anything
//! is bound: a bad line stops the server with the file and the line.

use std::sync::Arc;

use rumqttd::protocol::Login;

use super::acl::{Acl, LineError};
use super::passwd::PasswordFile;
use crate::config::{ConfigError, MqttConfig};

/// The password and ACL files, parsed.
#[derive(Debug, Default)]
pub struct Access {
    pub(crate) passwords: Option<Arc<PasswordFile>>,
    pub(crate) acl: Option<Acl>,
}

impl Access {
    /// Reads `mqtt.password_file` and `mqtt.acl_file` ("" is off). An error
    /// names the key, the file and the line.
    pub fn load(config: &MqttConfig) -> Result<Access, ConfigError> {
        let passwords = read("mqtt.password_file", &config.password_file, PasswordFile::parse)?.map(Arc::new);
        let acl = read("mqtt.acl_file", &config.acl_file, Acl::parse)?;
        Ok(Access { passwords, acl })
    }
}

fn read<T>(
    key: &'static str,
    path: &str,
    parse: impl Fn(&str) -> Result<T, LineError>,
) -> Result<Option<T>, ConfigError> {
    if path.is_empty() {
        return Ok(None);
    }
    let invalid = |reason| ConfigError::Invalid { key, reason };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read {path}: {e}")))?;
    parse(&text).map(Some).map_err(|e| invalid(format!("{path}:{}: {}", e.line, e.reason)))
}

/// Whether a CONNECT's login lets the client in: with no authentication
/// configured, any; otherwise the configured pair or a user of the
/// password file. The password file's hashes are slow on purpose (PBKDF2,
/// about 0.55 ms at `echo-server passwd`'s iterations in a release build,
/// and as many as another tool wrote): that runs on tokio's blocking
/// threads, never on the event loop. A CONNECT is checked on a turn, so
/// at most `mqtt.connect_concurrency` run at once while each takes less
/// than the turn's patience (50 ms).
pub(crate) async fn authenticate(
    credentials: Option<&Credentials>,
    passwords: Option<&Arc<PasswordFile>>,
    login: Option<&Login>,
) -> bool {
    if credentials.is_none() && passwords.is_none() {
        return true;
    }
    let Some(login) = login else {
        return false;
    };
    if credentials.is_some_and(|c| c.check(Some(login))) {
        return true;
    }
    let Some(file) = passwords else {
        return false;
    };
    let (file, user, password) = (file.clone(), login.username.clone(), login.password.clone());
    tokio::task::spawn_blocking(move || file.verify(&user, password.as_bytes())).await.unwrap_or(false)
}

/// The one username/password pair clients must present.
#[derive(Clone)]
pub struct Credentials {
    username: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Credentials {
    /// `None` when authentication is off (both settings empty).
    pub fn new(username: &str, password: &str) -> Option<Credentials> {
        (!username.is_empty())
            .then(|| Credentials { username: username.to_owned(), password: password.to_owned() })
    }

    /// Whether the CONNECT's login matches. Both fields are compared in
    /// time that does not depend on where they differ, so the answer's
    /// timing tells an attacker nothing about the password.
    pub fn check(&self, login: Option<&Login>) -> bool {
        let Some(login) = login else {
            return false;
        };
        let user = constant_time_eq(login.username.as_bytes(), self.username.as_bytes());
        let pass = constant_time_eq(login.password.as_bytes(), self.password.as_bytes());
        user & pass
    }
}

/// Compares two byte strings without an early exit on the first difference.
/// The length is not secret (it is compared first).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(u: &str, p: &str) -> Login {
        Login { username: u.to_owned(), password: p.to_owned() }
    }

    #[test]
    fn only_the_configured_pair_passes() {
        assert!(Credentials::new("", "").is_none(), "empty means off");
        let creds = Credentials::new("alice", "s3cret").unwrap();
        assert!(creds.check(Some(&login("alice", "s3cret"))));
        assert!(!creds.check(Some(&login("alice", "s3cres"))));
        assert!(!creds.check(Some(&login("alice", "s3cret!"))));
        assert!(!creds.check(Some(&login("bob", "s3cret"))));
        assert!(!creds.check(Some(&login("", ""))));
        assert!(!creds.check(None));
        assert!(!format!("{creds:?}").contains("s3cret"), "the password is never logged");
    }

    /// Either the pair or the file lets a client in; the file's check runs
    /// on a blocking thread (this runtime has no other worker to run it).
    #[tokio::test(flavor = "current_thread")]
    async fn the_pair_or_the_password_file() {
        let hash = crate::mqtt::passwd::Hash::new(b"pw-bob", 50).unwrap().encode();
        let file = Arc::new(PasswordFile::parse(&format!("bob:{hash}\n")).unwrap());
        let pair = Credentials::new("alice", "pw-alice").unwrap();
        assert!(authenticate(None, None, None).await, "nothing configured: anyone");
        for (user, password, expected) in [
            ("alice", "pw-alice", true),
            ("bob", "pw-bob", true),
            ("bob", "pw-alice", false),
            ("alice", "pw-bob", false),
            ("carol", "pw-bob", false),
        ] {
            let l = login(user, password);
            assert_eq!(authenticate(Some(&pair), Some(&file), Some(&l)).await, expected, "{user}/{password}");
        }
        assert!(!authenticate(Some(&pair), Some(&file), None).await);
        let file = Arc::new(PasswordFile::parse(&format!("bob:{hash}\n")).unwrap());
        assert!(authenticate(None, Some(&file), Some(&login("bob", "pw-bob"))).await);
        assert!(!authenticate(None, Some(&file), Some(&login("alice", "pw-alice"))).await);
    }

    #[test]
    fn a_bad_file_is_named_with_its_key_and_line() {
        let dir = std::env::temp_dir().join(format!("echo-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let acl = dir.join("acl");
        std::fs::write(&acl, "topic read a\nuser\n").unwrap();
        let config = MqttConfig { acl_file: acl.display().to_string(), ..MqttConfig::default() };
        let err = Access::load(&config).unwrap_err().to_string();
        assert_eq!(err, format!("mqtt.acl_file: {}:2: `user` without a name", acl.display()));
        let config = MqttConfig { password_file: "/nonexistent/passwd".to_owned(), ..MqttConfig::default() };
        let err = Access::load(&config).unwrap_err().to_string();
        assert!(err.starts_with("mqtt.password_file: cannot read /nonexistent/passwd: "), "{err}");
        let access = Access::load(&MqttConfig::default()).unwrap();
        assert!(access.passwords.is_none() && access.acl.is_none());
        std::fs::remove_dir_all(&dir).ok();
    }
}
