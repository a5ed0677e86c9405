//! Optional username/password authentication of CONNECT packets.

use rumqttd::protocol::Login;

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
}
