//! Who may publish and subscribe where: Mosquitto's `acl_file` format.
//!
//! ```text
//! # Rules before any `user` line are for clients without a username.
//! topic read public/#
//!
//! user alice
//! topic readwrite alice/#
//! topic deny alice/secret/#
//!
//! # Patterns are for every client, wherever they stand in the file:
//! # %u is the client's username, %c its client id.
//! pattern write devices/%c/status
//! ```
//!
//! A line is `user NAME`, `topic [read|write|readwrite|deny] FILTER` or
//! `pattern [read|write|readwrite|deny] FILTER` (no access word means
//! `readwrite`; the filter is the rest of the line, spaces included); `#`
//! starts a comment line. When the file is in use, what no rule allows is
//! denied, and a `deny` rule wins over any rule that allows.
//!
//! The rules that apply to one client are resolved once, at CONNECT
//! ([`Acl::for_client`]): its `user` section (or the anonymous one), then
//! every pattern with `%u` and `%c` replaced. Checks are then a walk over
//! those rules' levels, without allocating.
//!
//! **Publish** (and a will): the topic must match an allowing rule with
//! write access and no `deny` rule.
//!
//! **Subscribe**: Mosquitto lets a filter through when a read rule
//! *covers* it (every topic the filter can match is matched by the rule),
//! and then checks every message against the rules again as it is
//! delivered. rumqttd's router delivers messages straight to the session
//! and only takes acknowledgements in the order it sent the messages, so
//! holding one back is not a local change. This broker therefore decides
//! everything at SUBSCRIBE, more strictly: a filter is allowed only if a
//! read rule covers it *and* no `deny` rule can match any topic it can
//! match (they overlap). With `topic read #` and `topic deny secret/#`,
//! `#` and `+/x` are refused (Mosquitto grants them and withholds
//! `secret/...` messages), `news/#` is granted. Every message a granted
//! filter can bring is then readable, retained ones included. A kept
//! session (3.1.1 without clean session, MQTT 5 with a session expiry)
//! holds filters granted to the user it was connected with; a connection
//! of another user (or of none) with the same client id starts a new
//! session instead of resuming it (see `caps::Kept::owner`).

use std::collections::HashMap;

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn reads(self) -> bool {
        matches!(self, Grant::Read | Grant::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Grant::Write | Grant::ReadWrite)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    grant: Grant,
    filter: String,
}

/// A line of the file that is not a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LineError {
    pub(crate) line: usize,
    pub(crate) reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// The whole file, parsed.
#[derive(Debug, Default)]
pub(crate) struct Acl {
    /// `topic` rules before the first `user` line.
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    /// `pattern` rules, wherever they are: for every client.
    patterns: Vec<Rule>,
}

impl Acl {
    pub(crate) fn parse(text: &str) -> Result<Acl, LineError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let error = |reason: String| LineError { line, reason };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (word, rest) = split_word(trimmed);
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(error("`user` without a name".to_owned()));
                    }
                    acl.users.entry(rest.to_owned()).or_default();
                    user = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let rule = parse_rule(word, rest).map_err(error)?;
                    if word == "pattern" {
                        acl.patterns.push(rule);
                    } else {
                        match &user {
                            Some(name) => acl.users.entry(name.clone()).or_default().push(rule),
                            None => acl.anonymous.push(rule),
                        }
                    }
                }
                other => {
                    return Err(error(format!("unknown {other:?}: expected `user`, `topic` or `pattern`")));
                }
            }
        }
        Ok(acl)
    }

    /// The rules for one client: `username` is `None` for a client that
    /// sent none (the anonymous section applies).
    pub(crate) fn for_client(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        let mut rules = match username {
            Some(name) => self.users.get(name).cloned().unwrap_or_default(),
            None => self.anonymous.clone(),
        };
        for pattern in &self.patterns {
            let needs_user = pattern.filter.contains("%u");
            if needs_user && username.is_none() {
                // Mosquitto: a pattern with %u is not for anonymous clients.
                continue;
            }
            let user = username.unwrap_or("");
            // A username or client id with wildcards or a `/` would make a
            // pattern grant more than its author wrote (`%u` = `#`): such a
            // client gets nothing at all rather than that.
            let unsafe_value = |value: &str| value.contains(['+', '#', '/']);
            if (needs_user && unsafe_value(user))
                || (pattern.filter.contains("%c") && unsafe_value(client_id))
            {
                return ClientAcl { rules: Vec::new() };
            }
            let filter = pattern.filter.replace("%u", user).replace("%c", client_id);
            rules.push(Rule { grant: pattern.grant, filter });
        }
        ClientAcl { rules }
    }
}

/// The rules that apply to one client, resolved at CONNECT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientAcl {
    rules: Vec<Rule>,
}

impl ClientAcl {
    /// Whether the client may publish to `topic` (a topic name, no
    /// wildcards): a rule with write access matches it, no `deny` rule does.
    pub(crate) fn may_publish(&self, topic: &str) -> bool {
        let mut allowed = false;
        for rule in &self.rules {
            if covers(&rule.filter, topic) {
                match rule.grant {
                    Grant::Deny => return false,
                    grant => allowed |= grant.writes(),
                }
            }
        }
        allowed
    }

    /// Whether the client may subscribe to `filter`: a rule with read
    /// access covers it, and no `deny` rule overlaps it (see the module's
    /// docs for how this differs from Mosquitto). A shared subscription is
    /// judged by its filter (`$share/GROUP/` taken off).
    pub(crate) fn may_subscribe(&self, filter: &str) -> bool {
        let filter = match filter.strip_prefix("$share/").and_then(|rest| rest.split_once('/')) {
            Some((_group, filter)) => filter,
            None => filter,
        };
        let mut allowed = false;
        for rule in &self.rules {
            match rule.grant {
                Grant::Deny if overlap(&rule.filter, filter) => return false,
                Grant::Deny => {}
                grant => allowed |= grant.reads() && covers(&rule.filter, filter),
            }
        }
        allowed
    }
}

/// One session's ACL: its rules, and what judging its packets needs to
/// remember.
#[derive(Debug)]
pub(crate) struct SessionAcl {
    rules: ClientAcl,
    /// The username the rules are for (`None`: anonymous).
    username: Option<Box<str>>,
    /// The MQTT 5 topic aliases the client set, so that a publish by alias
    /// is judged by its topic (at most `mqtt.topic_alias_maximum`, checked
    /// before). Set whether or not that publish was allowed: the router
    /// only learns an alias from an allowed one, and a publish by an alias
    /// the router does not know is refused here first.
    aliases: HashMap<u16, String>,
}

impl SessionAcl {
    pub(crate) fn new(rules: ClientAcl, username: Option<&str>) -> SessionAcl {
        SessionAcl { rules, username: username.map(Box::from), aliases: HashMap::new() }
    }

    pub(crate) fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// Whether the client may publish to `topic`, or to what `alias`
    /// stands for when the topic is empty. `topic` has been checked to be
    /// UTF-8 without wildcards.
    pub(crate) fn may_publish(&mut self, topic: &[u8], alias: Option<u16>) -> bool {
        let topic = std::str::from_utf8(topic).unwrap_or_default();
        match alias {
            Some(alias) if topic.is_empty() => match self.aliases.get(&alias) {
                Some(topic) => self.rules.may_publish(topic),
                // The router refuses an alias it was never given.
                None => true,
            },
            Some(alias) => {
                self.aliases.insert(alias, topic.to_owned());
                self.rules.may_publish(topic)
            }
            None => self.rules.may_publish(topic),
        }
    }

    pub(crate) fn may_subscribe(&self, filter: &str) -> bool {
        self.rules.may_subscribe(filter)
    }
}

/// Splits off the first whitespace-separated word.
fn split_word(text: &str) -> (&str, &str) {
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

fn parse_rule(kind: &str, rest: &str) -> Result<Rule, String> {
    let (word, after) = split_word(rest);
    let (grant, filter) = match word {
        "read" => (Grant::Read, after),
        "write" => (Grant::Write, after),
        "readwrite" => (Grant::ReadWrite, after),
        "deny" => (Grant::Deny, after),
        _ => (Grant::ReadWrite, rest),
    };
    if filter.is_empty() {
        return Err(format!("`{kind}` without a topic filter"));
    }
    // Substitutions are checked as if they were a plain level.
    let plain = filter.replace("%u", "u").replace("%c", "c");
    if let Err(why) = check_syntax(&plain) {
        return Err(format!("{filter:?} is not a topic filter: {why}"));
    }
    Ok(Rule { grant, filter: filter.to_owned() })
}

fn check_syntax(filter: &str) -> Result<(), &'static str> {
    if filter.contains('\0') {
        return Err("it contains NUL");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 != levels.len() => return Err("`#` must be the last level"),
            "#" | "+" => {}
            other if other.contains(['+', '#']) => return Err("`+` and `#` must be a whole level"),
            _ => {}
        }
    }
    Ok(())
}

/// Whether every topic `inner` can match is matched by `outer` (for a
/// topic name, that is simply: `outer` matches it). MQTT's rules: `+` is
/// one level, `#` any number including none (`a/#` matches `a`), and a
/// wildcard in the first level does not match a topic starting with `$`.
pub(crate) fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    let mut first = true;
    loop {
        match (o.next(), i.next()) {
            (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
            (Some("#"), None) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(level)) => {
                if first && level.starts_with('$') {
                    return false;
                }
            }
            (Some(a), Some(b)) => {
                if a != b {
                    return false;
                }
            }
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
        }
        first = false;
    }
}

/// Whether some topic is matched by both filters.
pub(crate) fn overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    let mut first = true;
    loop {
        match (x.next(), y.next()) {
            // `#` matches everything from here on, including nothing more;
            // but in the first level not a `$` topic.
            (Some("#"), Some(level)) | (Some(level), Some("#")) => {
                return !(first && level.starts_with('$') && level != "#" && level != "+");
            }
            (Some("#"), None) | (None, Some("#")) => return true,
            (Some(p), Some(q)) => {
                let wild = |l: &str| l == "+";
                if wild(p) || wild(q) {
                    let other = if wild(p) { q } else { p };
                    if first && other.starts_with('$') {
                        return false;
                    }
                } else if p != q {
                    return false;
                }
            }
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic write shared/in
topic read shared/+/out

user bob
topic bob/#
pattern write devices/%c/status
pattern read inbox/%u/#
";

    fn acl() -> Acl {
        Acl::parse(FILE).unwrap()
    }

    #[test]
    fn matching_follows_mqtt_wildcards() {
        assert!(covers("a/b", "a/b"));
        assert!(!covers("a/b", "a/c"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(covers("a/+", "a/"), "+ matches an empty level");
        assert!(covers("a/#", "a"), "# matches the parent too");
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("#", "anything/at/all"));
        assert!(!covers("#", "$SYS/x"), "a first-level wildcard does not match $ topics");
        assert!(!covers("+/x", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
        // Coverage of filters by filters.
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/+/#", "a/+/c/#"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+/#", "a/#"), "a/# matches `a`, which a/+/# does not");
        assert!(covers("+/+", "+/b"));
    }

    #[test]
    fn overlap_is_symmetric_and_follows_wildcards() {
        for (a, b, expected) in [
            ("secret/#", "#", true),
            ("secret/#", "+/x", true),
            ("secret/#", "secret", true),
            ("secret/#", "news/#", false),
            ("a/+/c", "a/b/+", true),
            ("a/+/c", "a/b/d", false),
            ("a/b", "a/b/c", false),
            ("a/b", "a/b/#", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/+", false),
            ("$SYS/#", "$SYS/x", true),
        ] {
            assert_eq!(overlap(a, b), expected, "{a} vs {b}");
            assert_eq!(overlap(b, a), expected, "{b} vs {a}");
        }
    }

    #[test]
    fn the_anonymous_section_is_for_clients_without_a_username() {
        let anon = acl().for_client(None, "c1");
        assert!(anon.may_subscribe("public/news"));
        assert!(anon.may_subscribe("public/#"));
        assert!(!anon.may_publish("public/news"), "read only");
        assert!(!anon.may_subscribe("alice/x"));
        // A pattern with %u does not apply without a username; one with
        // only %c does.
        assert!(!anon.may_subscribe("inbox//x"));
        assert!(anon.may_publish("devices/c1/status"));
        // A user without a section gets only the patterns.
        let carol = acl().for_client(Some("carol"), "c2");
        assert!(!carol.may_subscribe("public/news"));
        assert!(carol.may_subscribe("inbox/carol/1"));
    }

    #[test]
    fn user_sections_and_access_words() {
        let alice = acl().for_client(Some("alice"), "a1");
        assert!(alice.may_publish("alice/x"));
        assert!(alice.may_subscribe("alice/x/+"));
        assert!(alice.may_publish("shared/in"), "write");
        assert!(!alice.may_subscribe("shared/in"), "write is not read");
        assert!(alice.may_subscribe("shared/+/out"), "read");
        assert!(alice.may_subscribe("shared/a/out"));
        assert!(!alice.may_publish("shared/a/out"), "read is not write");
        assert!(!alice.may_publish("bob/x"), "another user's section");
        let bob = acl().for_client(Some("bob"), "b1");
        assert!(bob.may_publish("bob/x") && bob.may_subscribe("bob/#"), "no access word: readwrite");
        assert!(!bob.may_subscribe("alice/#"));
        assert!(!bob.may_subscribe("#"), "not covered by bob/#");
    }

    #[test]
    fn deny_wins_over_any_grant() {
        let alice = acl().for_client(Some("alice"), "a1");
        assert!(!alice.may_publish("alice/secret/x"));
        assert!(!alice.may_publish("alice/secret"), "deny alice/secret/# covers its parent");
        assert!(!alice.may_subscribe("alice/secret/x"));
        // Overlapping a deny rule is enough to refuse a subscription.
        assert!(!alice.may_subscribe("alice/#"));
        assert!(!alice.may_subscribe("alice/+/x"));
        assert!(alice.may_subscribe("alice/public/#"));
        // Order in the file does not matter.
        let acl = Acl::parse("user u\ntopic deny a/b\ntopic readwrite a/#\n").unwrap();
        let u = acl.for_client(Some("u"), "c");
        assert!(!u.may_publish("a/b"));
        assert!(u.may_publish("a/c"));
    }

    #[test]
    fn patterns_substitute_username_and_client_id() {
        let bob = acl().for_client(Some("bob"), "sensor-7");
        assert!(bob.may_publish("devices/sensor-7/status"));
        assert!(!bob.may_publish("devices/sensor-8/status"));
        assert!(bob.may_subscribe("inbox/bob/#"));
        assert!(!bob.may_subscribe("inbox/alice/#"));
        // Patterns apply to every user, even those with a section of their
        // own and patterns written inside another user's section.
        let alice = acl().for_client(Some("alice"), "a1");
        assert!(alice.may_publish("devices/a1/status"));
        assert!(alice.may_subscribe("inbox/alice/1"));
        // A deny pattern.
        let acl = Acl::parse("topic readwrite #\npattern deny private/%u/#\n").unwrap();
        assert!(!acl.for_client(Some("eve"), "e").may_publish("private/eve/x"));
        assert!(acl.for_client(None, "e").may_publish("private/eve/x"), "no username: no %u pattern");
    }

    #[test]
    fn a_username_with_wildcards_gets_nothing_from_patterns() {
        let acl = Acl::parse("pattern readwrite inbox/%u/#\npattern read all/%c\n").unwrap();
        for user in ["#", "a+", "a/b"] {
            let client = acl.for_client(Some(user), "c");
            assert!(!client.may_subscribe("inbox/#"), "{user}");
            assert!(!client.may_publish("inbox/a/b/x"), "{user}");
            assert!(!client.may_subscribe("all/c"), "{user}: fails closed");
        }
    }

    #[test]
    fn shared_subscriptions_are_judged_by_their_filter() {
        let bob = acl().for_client(Some("bob"), "b1");
        assert!(bob.may_subscribe("$share/g/bob/#"));
        assert!(!bob.may_subscribe("$share/g/alice/#"));
    }

    /// A publish by alias is judged by the topic the alias was last set
    /// to, allowed or not. (Refused QoS 2 publishes are remembered by
    /// `ackorder::AckOrder`, whoever refused them.)
    #[test]
    fn a_session_follows_aliases() {
        let mut bob = SessionAcl::new(acl().for_client(Some("bob"), "b1"), Some("bob"));
        assert_eq!(bob.username(), Some("bob"));
        assert!(!bob.may_publish(b"alice/x", Some(1)));
        assert!(!bob.may_publish(b"", Some(1)), "alias 1 is alice/x");
        assert!(bob.may_publish(b"bob/x", Some(1)));
        assert!(bob.may_publish(b"", Some(1)), "alias 1 is bob/x now");
        assert!(bob.may_publish(b"", Some(2)), "an alias never set is the router's to refuse");
        assert!(bob.may_publish(b"bob/y", None) && !bob.may_publish(b"alice/y", None));
        assert!(!bob.may_subscribe("alice/#") && bob.may_subscribe("bob/+"));
    }

    #[test]
    fn topics_may_have_spaces() {
        let acl = Acl::parse("topic read my topic/#\ntopic room one\n").unwrap();
        let anon = acl.for_client(None, "c");
        assert!(anon.may_subscribe("my topic/x"));
        assert!(anon.may_publish("room one"));
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        for (text, line, needle) in [
            ("topic read a\ntpoic read b\n", 2, "unknown \"tpoic\""),
            ("# c\n\nuser\n", 3, "`user` without a name"),
            ("topic read\n", 1, "`topic` without a topic filter"),
            ("topic\n", 1, "`topic` without a topic filter"),
            ("user a\npattern deny\n", 2, "`pattern` without a topic filter"),
            ("topic read a/#/b\n", 1, "\"a/#/b\" is not a topic filter: `#` must be the last level"),
            ("topic a+/b\n", 1, "`+` and `#` must be a whole level"),
            ("\n\n\npattern read x/%u#\n", 4, "must be a whole level"),
        ] {
            let err = Acl::parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.reason.contains(needle), "{text:?}: {err}");
        }
        assert!(Acl::parse("").is_ok(), "an empty file denies everything");
        assert!(!Acl::parse("").unwrap().for_client(None, "c").may_publish("a"));
    }
}
