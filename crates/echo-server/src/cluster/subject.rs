//! MQTT topics and filters as NATS subjects.
//!
//! A topic's levels become a subject's tokens (`a/b` → `a.b`), under the
//! cluster's prefix and a kind (`m` for live messages, `r` for retained
//! ones): `echo.mqtt.m.a.b`. MQTT's wildcards map to NATS's: `+` → `*`,
//! `#` → `>`. NATS cannot carry every level as a token: tokens are
//! separated by `.`, may not be empty, contain no white space, and `*` and
//! `>` are its own wildcards. So a level is written as it is only when it
//! is made of printable ASCII other than `. * > ~ # +`; otherwise each
//! other byte becomes `~` and two hex digits (`a b` → `a~20b`, `é` →
//! `~C3~A9`), and an empty level is the token `~` alone. The encoding is
//! reversible ([`topic_of`]) and keeps matching exact: a filter's subjects
//! match exactly the subjects of the topics the filter matches
//! (`tests::wildcards_match_as_in_mqtt`), since one level is always one
//! token and `*` matches any one token.
//!
//! Two differences between MQTT and NATS wildcards are made up for here:
//! MQTT's `a/#` also matches `a` itself, where NATS's `a.>` needs at least
//! one more token, so `a/#` is subscribed as both `a.>` and `a`
//! ([`filter_subjects`]); and a topic starting with `$` is not matched by a
//! filter starting with a wildcard (MQTT §4.7.2), which needs nothing here
//! because `$` topics (`$SYS`) never leave their node.

use std::fmt::Write;

/// The kind of subject: live messages are forwarded where someone
/// subscribes; retained ones go to every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Message,
    Retained,
}

impl Kind {
    fn token(self) -> &'static str {
        match self {
            Kind::Message => "m",
            Kind::Retained => "r",
        }
    }
}

/// The escape byte of the encoding.
const ESCAPE: u8 = b'~';

/// Whether a byte of a topic level is written as it is.
fn plain(byte: u8) -> bool {
    byte.is_ascii_graphic() && !matches!(byte, b'.' | b'*' | b'>' | b'~' | b'#' | b'+')
}

/// Appends one topic level as one subject token.
fn push_level(out: &mut String, level: &[u8]) {
    if level.is_empty() {
        out.push(ESCAPE as char);
        return;
    }
    for &byte in level {
        if plain(byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "~{byte:02X}");
        }
    }
}

/// The subject a publish to `topic` goes to.
pub(crate) fn subject(prefix: &str, kind: Kind, topic: &[u8]) -> String {
    let mut out = String::with_capacity(prefix.len() + 3 + topic.len() + topic.len() / 4);
    out.push_str(prefix);
    out.push('.');
    out.push_str(kind.token());
    for level in topic.split(|&b| b == b'/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The subjects that carry what `filter` matches (live messages): one, or
/// two for a filter ending in `#` after other levels. None for a filter
/// starting with `$` (the server's own topics stay on their node).
pub(crate) fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    if filter.starts_with('$') {
        return Vec::new();
    }
    let mut out = String::with_capacity(prefix.len() + 3 + filter.len());
    out.push_str(prefix);
    out.push('.');
    out.push_str(Kind::Message.token());
    let mut parent = None;
    for level in filter.split('/') {
        match level {
            "+" => out.push_str(".*"),
            "#" => {
                // `a/#` matches `a` too; `#` alone matches every topic,
                // each of which has a first level.
                if out.len() > prefix.len() + 2 {
                    parent = Some(out.clone());
                }
                out.push_str(".>");
            }
            level => {
                out.push('.');
                push_level(&mut out, level.as_bytes());
            }
        }
    }
    let mut subjects = vec![out];
    subjects.extend(parent);
    subjects
}

/// Why a subject is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SubjectError {
    #[error("not under the prefix and kind")]
    Elsewhere,
    #[error("a token that is not an encoded topic level")]
    BadToken,
}

/// The topic a subject of `kind` under `prefix` carries: [`subject`]
/// undone.
pub(crate) fn topic_of(prefix: &str, kind: Kind, subject: &str) -> Result<Vec<u8>, SubjectError> {
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_prefix(kind.token()))
        .and_then(|rest| rest.strip_prefix('.'))
        .ok_or(SubjectError::Elsewhere)?;
    let mut topic = Vec::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            topic.push(b'/');
        }
        if token == "~" {
            continue;
        }
        let bytes = token.as_bytes();
        if bytes.is_empty() {
            return Err(SubjectError::BadToken);
        }
        let mut at = 0;
        while at < bytes.len() {
            let byte = bytes[at];
            if byte == ESCAPE {
                let hex = bytes.get(at + 1..at + 3).ok_or(SubjectError::BadToken)?;
                let hex = std::str::from_utf8(hex).map_err(|_| SubjectError::BadToken)?;
                let decoded = u8::from_str_radix(hex, 16).map_err(|_| SubjectError::BadToken)?;
                // Only what the encoder escapes, so that a subject has one
                // reading.
                if plain(decoded) || hex.bytes().any(|b| b.is_ascii_lowercase()) {
                    return Err(SubjectError::BadToken);
                }
                topic.push(decoded);
                at += 3;
            } else if plain(byte) {
                topic.push(byte);
                at += 1;
            } else {
                return Err(SubjectError::BadToken);
            }
        }
    }
    Ok(topic)
}

/// Whether `prefix` can stand before our subjects: tokens of ASCII
/// letters, digits, `-` and `_`, separated by single dots.
pub(crate) fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "echo.mqtt";

    /// NATS's matching of a subject by a subscription subject.
    fn nats_matches(filter: &str, subject: &str) -> bool {
        let mut subject = subject.split('.');
        for token in filter.split('.') {
            match token {
                ">" => return subject.next().is_some(),
                "*" => {
                    if subject.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if subject.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        subject.next().is_none()
    }

    /// What NATS allows in a token of a published subject.
    fn valid_token(token: &str) -> bool {
        !token.is_empty()
            && token != "*"
            && token != ">"
            && token.bytes().all(|b| b.is_ascii_graphic() && b != b'.' && b != b'*' && b != b'>')
    }

    #[test]
    fn examples() {
        assert_eq!(subject(P, Kind::Message, b"a/b"), "echo.mqtt.m.a.b");
        assert_eq!(subject(P, Kind::Retained, b"a/b"), "echo.mqtt.r.a.b");
        assert_eq!(subject(P, Kind::Message, b"a b/c.d"), "echo.mqtt.m.a~20b.c~2Ed");
        assert_eq!(subject(P, Kind::Message, b"/x//"), "echo.mqtt.m.~.x.~.~");
        assert_eq!(subject(P, Kind::Message, "é/*/>/~".as_bytes()), "echo.mqtt.m.~C3~A9.~2A.~3E.~7E");
        assert_eq!(filter_subjects(P, "a/+/c"), ["echo.mqtt.m.a.*.c"]);
        assert_eq!(filter_subjects(P, "a/#"), ["echo.mqtt.m.a.>", "echo.mqtt.m.a"]);
        assert_eq!(filter_subjects(P, "#"), ["echo.mqtt.m.>"]);
        assert_eq!(filter_subjects(P, "+/#"), ["echo.mqtt.m.*.>", "echo.mqtt.m.*"]);
        assert_eq!(filter_subjects(P, "a b/x.y"), ["echo.mqtt.m.a~20b.x~2Ey"]);
        assert!(filter_subjects(P, "$SYS/#").is_empty());
        assert_eq!(topic_of(P, Kind::Message, "echo.mqtt.m.~.x.~.~").unwrap(), b"/x//");
        assert_eq!(topic_of(P, Kind::Retained, "echo.mqtt.m.a"), Err(SubjectError::Elsewhere));
        for bad in
            ["echo.mqtt.m.~2", "echo.mqtt.m.~41", "echo.mqtt.m.~c3", "echo.mqtt.m.a..b", "echo.mqtt.m.a b"]
        {
            assert_eq!(topic_of(P, Kind::Message, bad), Err(SubjectError::BadToken), "{bad}");
        }
        assert!(valid_prefix("echo.mqtt") && valid_prefix("a-b_c"));
        for bad in ["", ".", "a..b", "a.", "a b", "a.*", "a.>", "é"] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }

    /// A level made of the characters that need care, and plain ones.
    fn level() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just('a'),
                Just('b'),
                Just('.'),
                Just('*'),
                Just('>'),
                Just('~'),
                Just(' '),
                Just('\t'),
                Just('$'),
                Just('é'),
                Just('🦀'),
                any::<char>().prop_filter("no / + # NUL", |c| !matches!(c, '/' | '+' | '#' | '\0')),
            ],
            0..5,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5).prop_map(|levels| levels.join("/"))
    }

    proptest! {
        /// Every topic comes back from its subject, and its subject is one
        /// NATS takes: non-empty tokens, no white space, no wildcard.
        #[test]
        fn topics_round_trip(topic in topic()) {
            for kind in [Kind::Message, Kind::Retained] {
                let subject = subject(P, kind, topic.as_bytes());
                let tokens: Vec<&str> = subject.split('.').collect();
                prop_assert_eq!(tokens.len(), 3 + topic.split('/').count());
                prop_assert!(tokens.iter().all(|t| valid_token(t)), "{}", subject);
                prop_assert_eq!(topic_of(P, kind, &subject).unwrap(), topic.as_bytes());
            }
        }

        /// A filter's subjects match a topic's subject exactly when the
        /// filter matches the topic (`$` topics aside: they never leave).
        #[test]
        fn wildcards_match_as_in_mqtt(
            topic in proptest::collection::vec(prop_oneof![Just(""), Just("a"), Just("b"), Just("a.b"), Just("*")], 1..4),
            filter in proptest::collection::vec(prop_oneof![Just(""), Just("a"), Just("b"), Just("+"), Just("a.b"), Just("*")], 0..4),
            hash in any::<bool>(),
        ) {
            let topic = topic.join("/");
            prop_assume!(!topic.is_empty());
            let mut filter = filter.join("/");
            if hash {
                filter = if filter.is_empty() { "#".to_owned() } else { format!("{filter}/#") };
            }
            prop_assume!(!filter.is_empty());
            let subject = subject(P, Kind::Message, topic.as_bytes());
            let nats = filter_subjects(P, &filter).iter().any(|f| nats_matches(f, &subject));
            prop_assert_eq!(nats, rumqttd::protocol::matches(&topic, &filter), "{} {} {}", topic, filter, subject);
        }
    }
}
