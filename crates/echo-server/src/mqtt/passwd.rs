//! Password files in Mosquitto's `mosquitto_passwd` format.
//!
//! One user a line, `NAME:$7$ITERATIONS$SALT$HASH`: PBKDF2 with
//! HMAC-SHA512, the salt and the 64-byte hash in standard base64 (what
//! `mosquitto_passwd` writes since Mosquitto 2.0). The older
//! `NAME:$6$SALT$HASH` (one SHA-512 of password then salt, Mosquitto 1.x)
//! is read too. Lines starting with `#` and empty lines are skipped. A file
//! written by `mosquitto_passwd` works here, and one written by
//! `echo-server passwd` works with Mosquitto.
//!
//! PBKDF2 is slow on purpose; [`PasswordFile::verify`] is therefore run
//! off the event loop (see `auth`).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use super::acl::LineError;

/// The iterations `echo-server passwd` uses unless told otherwise: ten
/// times `mosquitto_passwd`'s 101. One verification costs about 0.55 ms of
/// one core in a release build (see docs/mqtt.md), done on a blocking
/// thread (see `auth::authenticate`).
pub const DEFAULT_ITERATIONS: u32 = 1000;

/// Salt bytes, as `mosquitto_passwd` makes them.
const SALT_LEN: usize = 12;

/// A stored password hash.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Hash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 { iterations: u32, salt: Vec<u8>, hash: Vec<u8> },
    /// `$6$`: SHA-512 of the password followed by the salt.
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hash::Pbkdf2 { iterations, .. } => write!(f, "Hash(pbkdf2-sha512, {iterations} iterations)"),
            Hash::Sha512 { .. } => write!(f, "Hash(sha512)"),
        }
    }
}

impl Hash {
    /// A new PBKDF2 hash of `password` with a fresh random salt.
    pub fn new(password: &[u8], iterations: u32) -> std::io::Result<Hash> {
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| std::io::Error::other(e.to_string()))?;
        let hash = pbkdf2(password, &salt, iterations);
        Ok(Hash::Pbkdf2 { iterations, salt, hash })
    }

    fn parse(text: &str) -> Result<Hash, String> {
        let decode = |part: &str, what: &str| {
            BASE64.decode(part).map_err(|e| format!("the {what} is not valid base64: {e}"))
        };
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{iterations:?} is not a number of iterations"))?;
                let (salt, hash) = (decode(salt, "salt")?, decode(hash, "hash")?);
                if hash.len() != 64 {
                    return Err(format!("the hash is {} bytes, not 64 (SHA-512)", hash.len()));
                }
                Ok(Hash::Pbkdf2 { iterations, salt, hash })
            }
            ["", "6", salt, hash] => {
                let (salt, hash) = (decode(salt, "salt")?, decode(hash, "hash")?);
                if hash.len() != 64 {
                    return Err(format!("the hash is {} bytes, not 64 (SHA-512)", hash.len()));
                }
                Ok(Hash::Sha512 { salt, hash })
            }
            ["", kind, ..] => {
                Err(format!("unknown hash type ${kind}$ (expected $7$, PBKDF2-SHA512, or $6$, SHA-512)"))
            }
            _ => Err("the password is not hashed (write entries with `echo-server passwd`)".to_owned()),
        }
    }

    /// Whether `password` is the one hashed. The final comparison takes the
    /// same time wherever the hashes differ.
    pub(crate) fn verify(&self, password: &[u8]) -> bool {
        let (computed, stored) = match self {
            Hash::Pbkdf2 { iterations, salt, hash } => (pbkdf2(password, salt, *iterations), hash),
            Hash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                (digest.finalize().to_vec(), hash)
            }
        };
        computed.ct_eq(stored).into()
    }

    /// The hash as written in the file.
    pub(crate) fn encode(&self) -> String {
        match self {
            Hash::Pbkdf2 { iterations, salt, hash } => {
                format!("$7${iterations}${}${}", BASE64.encode(salt), BASE64.encode(hash))
            }
            Hash::Sha512 { salt, hash } => format!("$6${}${}", BASE64.encode(salt), BASE64.encode(hash)),
        }
    }
}

fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
    out
}

/// The users of a password file and their hashes.
pub(crate) struct PasswordFile {
    users: HashMap<String, Hash>,
    /// Verified against when the user is unknown, so that an unknown user
    /// costs as long as a wrong password and the timing does not tell
    /// which names exist.
    decoy: Hash,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile").field("users", &self.users.len()).finish_non_exhaustive()
    }
}

impl PasswordFile {
    pub(crate) fn parse(text: &str) -> Result<PasswordFile, LineError> {
        let mut users = HashMap::new();
        let mut most_iterations = 0;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let error = |reason: String| LineError { line, reason };
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = entry.split_once(':') else {
                return Err(error("expected USER:HASH".to_owned()));
            };
            if user.is_empty() {
                return Err(error("empty username".to_owned()));
            }
            let hash = Hash::parse(hash).map_err(|reason| error(format!("user {user:?}: {reason}")))?;
            if let Hash::Pbkdf2 { iterations, .. } = hash {
                most_iterations = most_iterations.max(iterations);
            }
            if users.insert(user.to_owned(), hash).is_some() {
                return Err(error(format!("user {user:?} is listed twice")));
            }
        }
        let decoy =
            Hash::Pbkdf2 { iterations: most_iterations.max(1), salt: vec![0; SALT_LEN], hash: vec![0; 64] };
        Ok(PasswordFile { users, decoy })
    }

    /// Whether `user` is in the file with `password`. Slow (PBKDF2): call
    /// it off the event loop.
    pub(crate) fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                let _ = self.decoy.verify(password);
                false
            }
        }
    }
}

/// `echo-server passwd`: sets `user`'s password in the file at `path`
/// (created if missing), replacing the user's line if there is one and
/// keeping every other line as it was. The file is replaced as a whole
/// (written beside it, then renamed), readable by its owner only.
pub fn set_password(path: &Path, user: &str, password: &str, iterations: u32) -> Result<(), String> {
    if user.is_empty() || user.contains(':') || user.contains(['\n', '\r']) {
        return Err(format!("{user:?} cannot be a username here (empty, or with ':' or a line break)"));
    }
    if password.is_empty() {
        return Err("the password is empty".to_owned());
    }
    if iterations == 0 {
        return Err("iterations must be at least 1".to_owned());
    }
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    // The file must stay one the server can read.
    PasswordFile::parse(&old).map_err(|e| format!("{}:{}: {}", path.display(), e.line, e.reason))?;
    let hash = Hash::new(password.as_bytes(), iterations).map_err(|e| format!("no random salt: {e}"))?;
    let entry = format!("{user}:{}", hash.encode());
    let mut replaced = false;
    let mut lines: Vec<String> = old
        .lines()
        .map(|line| match line.trim().split_once(':') {
            Some((name, _)) if name == user && !line.trim().starts_with('#') => {
                replaced = true;
                entry.clone()
            }
            _ => line.to_owned(),
        })
        .collect();
    if !replaced {
        lines.push(entry);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| format!("{} is not a file name", path.display()))?;
    let temp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_hash_verifies_its_password_only() {
        let hash = Hash::new(b"s3cret", 101).unwrap();
        assert!(hash.verify(b"s3cret"));
        assert!(!hash.verify(b"s3cres"));
        assert!(!hash.verify(b""));
        let again = Hash::parse(&hash.encode()).unwrap();
        assert_eq!(again, hash);
        assert!(again.verify(b"s3cret"));
        assert_ne!(Hash::new(b"s3cret", 101).unwrap(), hash, "a fresh salt each time");
    }

    /// PBKDF2-HMAC-SHA512 against a published test vector (RFC 6070's
    /// inputs, SHA-512 result as listed by the pbkdf2 crate and others),
    /// and the `$6$` form by its definition: one SHA-512 of password||salt.
    #[test]
    fn hashes_are_the_known_functions() {
        let expected = "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252\
                        c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce";
        assert_eq!(hex(&pbkdf2(b"password", b"salt", 1)), expected);
        let salt = b"0123456789ab".to_vec();
        let hash = Sha512::new().chain_update(b"pw").chain_update(&salt).finalize().to_vec();
        let line = format!("$6${}${}", BASE64.encode(&salt), BASE64.encode(&hash));
        let parsed = Hash::parse(&line).unwrap();
        assert!(parsed.verify(b"pw") && !parsed.verify(b"pW"));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn files_parse_and_bad_lines_are_named() {
        let alice = Hash::new(b"wonderland", 5).unwrap().encode();
        let text = format!("# users\n\nalice:{alice}\n");
        let file = PasswordFile::parse(&text).unwrap();
        assert!(file.verify("alice", b"wonderland"));
        assert!(!file.verify("alice", b"Wonderland"));
        assert!(!file.verify("bob", b"wonderland"));
        assert!(!format!("{file:?}").contains(&alice));
        for (text, line, needle) in [
            (format!("alice:{alice}\nbob\n"), 2, "expected USER:HASH"),
            (format!("alice:{alice}\nbob:plain\n"), 2, "not hashed"),
            (format!("alice:{alice}\nalice:{alice}\n"), 2, "listed twice"),
            ("\n:$7$1$AAAA$AAAA\n".to_owned(), 2, "empty username"),
            ("a:$5$x$y\n".to_owned(), 1, "unknown hash type $5$"),
            ("a:$7$many$AAAA$AAAA\n".to_owned(), 1, "not a number of iterations"),
            ("a:$7$10$!!$AAAA\n".to_owned(), 1, "salt is not valid base64"),
            ("a:$7$10$AAAA$AAAA\n".to_owned(), 1, "not 64"),
        ] {
            let err = PasswordFile::parse(&text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.reason.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn set_password_adds_and_replaces_one_line() {
        let dir = std::env::temp_dir().join(format!("echo-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("passwd");
        let _ = std::fs::remove_file(&path);
        set_password(&path, "alice", "one", 10).unwrap();
        set_password(&path, "bob", "two", 10).unwrap();
        set_password(&path, "alice", "three", 10).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.starts_with("alice:$7$10$"), "alice keeps her place: {text}");
        let file = PasswordFile::parse(&text).unwrap();
        assert!(file.verify("alice", b"three") && !file.verify("alice", b"one"));
        assert!(file.verify("bob", b"two"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(set_password(&path, "a:b", "x", 10).is_err());
        assert!(set_password(&path, "carol", "", 10).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    /// What one verification costs at the default iterations (printed for
    /// docs/mqtt.md: run with `--release -- --nocapture`). It runs on a
    /// blocking thread either way; the bound only catches an accidental
    /// change of the default by orders of magnitude.
    #[test]
    fn the_cost_of_one_verification() {
        let hash = Hash::new(b"s3cret", DEFAULT_ITERATIONS).unwrap();
        let start = std::time::Instant::now();
        let rounds = 20;
        for _ in 0..rounds {
            assert!(hash.verify(b"s3cret"));
        }
        let each = start.elapsed() / rounds;
        println!("PBKDF2-SHA512, {DEFAULT_ITERATIONS} iterations: {each:?} per verification");
        assert!(each < std::time::Duration::from_millis(500), "{each:?}");
    }
}
