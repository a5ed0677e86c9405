//! Checking topic names and filters before the router sees them.
//!
//! The router answers a SUBSCRIBE it dislikes (bad UTF-8, say) by
//! dropping the whole connection without a SUBACK, and it does not check
//! wildcard syntax at all. MQTT wants a per-filter failure code in the
//! SUBACK instead. So a session takes the filters the router must not see
//! out of the SUBSCRIBE, remembers where they were, and puts failure codes
//! back in those places when the router's SUBACK comes by ([`Refusals`]).

use rumqttd::protocol::{SubAck, SubscribeReasonCode};

/// Why a filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterRefusal {
    /// Bad wildcard syntax, empty, or a NUL character.
    Invalid,
    /// The ACL (`mqtt.acl_file`) does not allow it.
    NotAuthorized,
    /// Shared subscriptions are only for sessions that end with their
    /// connection (rumqttd 0.20's router panics when a session it keeps is
    /// the last member of a share group and disconnects with messages in
    /// flight).
    SharedNotSupported,
    /// One filter more than `mqtt.max_subscriptions` (see `caps`).
    QuotaExceeded,
}

impl FilterRefusal {
    /// The SUBACK code: MQTT 5 has one per reason, 3.1.1 only 0x80.
    pub fn code(self, v5: bool) -> SubscribeReasonCode {
        match (self, v5) {
            (_, false) => SubscribeReasonCode::Failure,
            (FilterRefusal::Invalid, true) => SubscribeReasonCode::TopicFilterInvalid,
            (FilterRefusal::NotAuthorized, true) => SubscribeReasonCode::NotAuthorized,
            (FilterRefusal::SharedNotSupported, true) => SubscribeReasonCode::SharedSubscriptionsNotSupported,
            (FilterRefusal::QuotaExceeded, true) => SubscribeReasonCode::QuotaExceeded,
        }
    }
}

/// Whether a topic filter may go to the router. `persistent`: the session
/// outlives its connection (3.1.1 without clean session, MQTT 5 with a
/// session expiry interval).
pub fn check_filter(filter: &str, persistent: bool) -> Result<(), FilterRefusal> {
    let path = match filter.strip_prefix("$share/") {
        Some(rest) => {
            if persistent {
                return Err(FilterRefusal::SharedNotSupported);
            }
            let Some((group, path)) = rest.split_once('/') else {
                return Err(FilterRefusal::Invalid);
            };
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(FilterRefusal::Invalid);
            }
            path
        }
        // A share group without a filter.
        None if filter == "$share" => return Err(FilterRefusal::Invalid),
        // `$SYS/#` and other `$` filters are served: the server publishes
        // its statistics there (`sys`).
        None => filter,
    };
    if path.is_empty() || path.contains('\0') {
        return Err(FilterRefusal::Invalid);
    }
    let levels: Vec<&str> = path.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let ok = match *level {
            "#" => i + 1 == levels.len(),
            "+" => true,
            other => !other.contains(['+', '#']),
        };
        if !ok {
            return Err(FilterRefusal::Invalid);
        }
    }
    Ok(())
}

/// Whether a topic is the server's own: MQTT §4.7.2 reserves topics
/// starting with `$` for the server (`$SYS/...`, see `sys`). Clients may
/// subscribe to them but not publish there (as with Mosquitto): their
/// publishes and wills to such topics are refused as the ACL refuses.
pub fn server_only(topic: &[u8]) -> bool {
    topic.first() == Some(&b'$')
}

/// Why a topic name (of a PUBLISH or a will) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRefusal {
    /// Not a well-formed MQTT string: invalid UTF-8 (overlong forms and
    /// encoded surrogates included) or a NUL character (3.1.1 §1.5.3,
    /// 5 §1.5.4). The packet is malformed (MQTT 5: 0x81).
    Malformed,
    /// Wildcards, which a topic name must not have (§4.7.1; MQTT 5: 0x90).
    Wildcard,
    /// Empty, without an MQTT 5 topic alias to stand for it (§4.7.3; in a
    /// PUBLISH, MQTT 5 calls it a protocol error, 0x82).
    Empty,
}

/// Whether a topic name may go to the router. An empty name is valid only
/// with an MQTT 5 topic alias (the router checks the alias).
///
/// Topic names are bytes in rumqttd's packets, not strings: its decoders
/// check nothing. The router needs UTF-8 (`from_utf8` on every publish it
/// appends) and drops the link that sent anything else, so this is the
/// check that keeps a client's bytes from ending the server's own wills
/// link (see `broker`) or a session without a reason.
pub fn check_topic(topic: &[u8], has_alias: bool) -> Result<(), TopicRefusal> {
    let Ok(topic) = std::str::from_utf8(topic) else {
        return Err(TopicRefusal::Malformed);
    };
    if topic.contains('\0') {
        return Err(TopicRefusal::Malformed);
    }
    if topic.is_empty() {
        return if has_alias { Ok(()) } else { Err(TopicRefusal::Empty) };
    }
    if topic.contains(['+', '#']) {
        return Err(TopicRefusal::Wildcard);
    }
    Ok(())
}

/// SUBSCRIBE packets whose filters were partly refused, by packet id:
/// where in the client's list each refused filter was, and why.
///
/// A list, not a map: it holds only SUBSCRIBEs with refused filters that
/// the router has not answered yet (none, most of the time), and it is
/// part of every session's future (24 bytes against a map's 48; see
/// `a_session_costs_a_small_future`).
/// The router answers in order, so the first entry with a packet id is the
/// one its SUBACK answers.
#[derive(Debug, Default)]
pub struct Refusals(Vec<(u16, Vec<(usize, FilterRefusal)>)>);

impl Refusals {
    pub fn remember(&mut self, pkid: u16, refused: Vec<(usize, FilterRefusal)>) {
        if !refused.is_empty() {
            self.0.push((pkid, refused));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Puts the refused filters' failure codes back into the router's SUBACK.
    pub fn complete(&mut self, mut ack: SubAck, v5: bool) -> SubAck {
        if let Some(at) = self.0.iter().position(|(pkid, _)| *pkid == ack.pkid) {
            let (_, refused) = self.0.remove(at);
            for (position, reason) in refused {
                let at = position.min(ack.return_codes.len());
                ack.return_codes.insert(at, reason.code(v5));
            }
            if self.0.is_empty() {
                // Nothing stays allocated between bursts.
                self.0 = Vec::new();
            }
        }
        ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in
            ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+", "/", "/a", "a//b", "$share/g/a/+", "$share/g/#"]
        {
            assert_eq!(check_filter(ok, false), Ok(()), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "#/a", "a/b#", "$share/g", "$share//a", "$share/g+/a", "a\0b"]
        {
            assert_eq!(check_filter(bad, false), Err(FilterRefusal::Invalid), "{bad:?}");
        }
        for sys in ["$SYS/#", "$SYS/broker/+", "$SYS/broker/version", "$other"] {
            assert_eq!(check_filter(sys, false), Ok(()), "{sys}");
        }
        assert_eq!(check_filter("$SYS/#/x", false), Err(FilterRefusal::Invalid));
        assert_eq!(check_filter("$share", false), Err(FilterRefusal::Invalid));
        assert_eq!(check_filter("$share/g/a", true), Err(FilterRefusal::SharedNotSupported));
        assert_eq!(check_filter("a/+", true), Ok(()));
    }

    #[test]
    fn topics() {
        assert_eq!(check_topic(b"a/b", false), Ok(()));
        assert_eq!(check_topic("caf\u{e9}/\u{1f600}".as_bytes(), false), Ok(()));
        assert_eq!(check_topic(b"a/+", false), Err(TopicRefusal::Wildcard));
        assert_eq!(check_topic(b"#", false), Err(TopicRefusal::Wildcard));
        assert_eq!(check_topic(b"", false), Err(TopicRefusal::Empty));
        assert_eq!(check_topic(b"", true), Ok(()));
        assert_eq!(check_topic(b"a\0", false), Err(TopicRefusal::Malformed));
        assert!(server_only(b"$SYS/x") && server_only(b"$"));
        assert!(!server_only(b"a/$SYS") && !server_only(b""));
        // Invalid UTF-8: a lead byte without its continuation (the audit's
        // will topic), a lone continuation, a truncated sequence, an
        // overlong '/', an encoded surrogate (U+D800), past U+10FFFF.
        for bad in
            [&b"\xc3\x28"[..], b"a\x80", b"\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
        {
            assert_eq!(check_topic(bad, false), Err(TopicRefusal::Malformed), "{bad:x?}");
            assert_eq!(check_topic(bad, true), Err(TopicRefusal::Malformed), "{bad:x?}");
        }
    }

    #[test]
    fn refused_codes_go_back_in_place() {
        let mut refusals = Refusals::default();
        // The client asked for [ok, $SYS/#, ok, a#]; the router saw two.
        refusals.remember(7, vec![(1, FilterRefusal::NotAuthorized), (3, FilterRefusal::Invalid)]);
        let ack =
            SubAck { pkid: 7, return_codes: vec![SubscribeReasonCode::QoS1, SubscribeReasonCode::QoS0] };
        let done = refusals.complete(ack, true);
        assert_eq!(
            done.return_codes,
            vec![
                SubscribeReasonCode::QoS1,
                SubscribeReasonCode::NotAuthorized,
                SubscribeReasonCode::QoS0,
                SubscribeReasonCode::TopicFilterInvalid
            ]
        );
        assert!(refusals.is_empty());
        // Two SUBSCRIBEs awaiting their SUBACKs: each gets its own codes.
        refusals.remember(1, vec![(0, FilterRefusal::Invalid)]);
        refusals.remember(2, vec![(1, FilterRefusal::NotAuthorized)]);
        let second = SubAck { pkid: 2, return_codes: vec![SubscribeReasonCode::QoS0] };
        let codes = refusals.complete(second, true).return_codes;
        assert_eq!(codes, vec![SubscribeReasonCode::QoS0, SubscribeReasonCode::NotAuthorized]);
        let first = SubAck { pkid: 1, return_codes: vec![] };
        assert_eq!(
            refusals.complete(first, true).return_codes,
            vec![SubscribeReasonCode::TopicFilterInvalid]
        );
        assert!(refusals.is_empty());
        let untouched = SubAck { pkid: 8, return_codes: vec![SubscribeReasonCode::QoS2] };
        assert_eq!(refusals.complete(untouched.clone(), false), untouched);
    }
}
