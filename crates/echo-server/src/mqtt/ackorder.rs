//! The order of one client's acknowledgements, whoever produces them.
//!
//! MQTT (3.1.1 and 5, §4.6) wants PUBACKs sent in the order their PUBLISHes
//! were received, PUBRECs too; and a client may expect the PUBCOMPs in the
//! order of its PUBRELs. Two sides answer a client: the router, for what
//! the session hands it (a QoS 1 or 2 publish, a PUBREL), once it has
//! taken the packet, over the link; and the session itself, at once, for
//! a publish it refuses (the ACL, the memory budget) or the PUBREL of a
//! publish the router never saw. An answer of the session's would overtake
//! the router's answers to packets the client sent before it.
//!
//! So the session counts the router's acknowledgements owed ([`owed`]),
//! and holds back an answer of its own while any are owed, tagged with how
//! many of them must go out first; the router's acknowledgements release
//! them as they pass to the client ([`pass`]). That is the order the spec
//! asks for because the router answers a client's packets in the order it
//! took them: one PUBACK per QoS 1 publish, one PUBREC per QoS 2 publish,
//! one PUBCOMP per PUBREL, all in one queue per client (rumqttd's
//! `AckLog`), or it drops the client, which ends the session.
//!
//! The session also remembers the QoS 2 publishes it refused itself
//! ([`refused_qos2`]), so that their PUBREL is its to answer
//! ([`releases_refused`]): the router never saw them, and a PUBREL it
//! cannot match is answered PUBCOMP 0x92 (patched rumqttd) or, before,
//! released another publish of the client's.
//!
//! [`owed`]: AckOrder::owed
//! [`pass`]: AckOrder::pass
//! [`refused_qos2`]: AckOrder::refused_qos2
//! [`releases_refused`]: AckOrder::releases_refused

use std::collections::VecDeque;

use rumqttd::protocol::{Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason};

/// Answers held back, at most, before the session stops reading its client.
///
/// The in-flight window does not bound them: it counts the publishes the
/// router holds, not those the session refused (nor QoS 1 ones in 3.1.1).
/// So the session stops reading while this many wait ([`AckOrder::is_full`])
/// — as it does while the router's queue is full — and the router's
/// acknowledgements, already owed, release them: 8 bytes each.
pub(crate) const MAX_HELD: usize = 256;

/// Refused QoS 2 publishes remembered, at most; past it the oldest is
/// forgotten (2 bytes each). Forgetting is safe: that publish's PUBREL then
/// goes to the router, which finds no publish with its packet id and
/// answers PUBCOMP 0x92 itself (in 3.1.1, a plain PUBCOMP: what the client
/// is owed). Bounded, since nothing else bounds them: refused publishes
/// take no in-flight slot, and a 3.1.1 client may leave any number
/// unreleased.
pub(crate) const MAX_REFUSED_QOS2: usize = 256;

/// An acknowledgement the session gives itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names, reason = "named after the packets")]
pub(crate) enum Answer {
    PubAck(u16, PubAckReason),
    PubRec(u16, PubRecReason),
    PubComp(u16, PubCompReason),
}

impl Answer {
    fn packet(self) -> Packet {
        match self {
            Answer::PubAck(pkid, reason) => Packet::PubAck(PubAck { pkid, reason }, None),
            Answer::PubRec(pkid, reason) => Packet::PubRec(PubRec { pkid, reason }, None),
            Answer::PubComp(pkid, reason) => Packet::PubComp(PubComp { pkid, reason }, None),
        }
    }
}

/// One session's acknowledgements owed by the router, the answers of its
/// own waiting for them, and the QoS 2 publishes it refused. 16 bytes in
/// every session's future; what is held is allocated only while there is
/// something to hold.
#[derive(Debug, Default)]
pub(crate) struct AckOrder {
    /// Acknowledgements the router owes for packets handed to it.
    owed: u32,
    held: Option<Box<Held>>,
}

/// Answers held back, and how far the router's acknowledgements have come
/// since the first of them was; refused QoS 2 publishes.
#[derive(Debug, Default)]
struct Held {
    /// Acknowledgements of the router passed to the client since.
    passed: u32,
    /// Each answer goes out after the router's acknowledgement with this
    /// number (of `passed`); in order.
    answers: VecDeque<(u32, Answer)>,
    /// Packet ids of QoS 2 publishes the session refused, oldest first (at
    /// most [`MAX_REFUSED_QOS2`]), whose PUBREL it answers itself.
    refused_qos2: VecDeque<u16>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.refused_qos2.is_empty()
    }
}

impl AckOrder {
    /// Takes note of a packet handed to the router that it acknowledges:
    /// a QoS 1 or 2 publish, a PUBREL.
    pub(crate) fn owed(&mut self) {
        self.owed += 1;
    }

    /// Gives the client an answer of the session's: into `replies` (written
    /// after the packets just handed to the router) if the router owes
    /// nothing, else held until what it owes now has gone out.
    pub(crate) fn answer(&mut self, answer: Answer, replies: &mut Vec<Packet>) {
        if self.owed == 0 {
            replies.push(answer.packet());
        } else {
            let held = self.held.get_or_insert_default();
            held.answers.push_back((held.passed + self.owed, answer));
        }
    }

    /// Passes a packet from the router to the client (onto `out`), and the
    /// answers it was the last to hold back right after it.
    pub(crate) fn pass(&mut self, packet: Packet, out: &mut Vec<Packet>) {
        let acknowledgement = matches!(packet, Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..));
        out.push(packet);
        if !acknowledgement {
            return;
        }
        self.owed = self.owed.saturating_sub(1);
        let Some(held) = &mut self.held else {
            return;
        };
        held.passed += 1;
        while let Some(&(after, answer)) = held.answers.front()
            && after <= held.passed
        {
            out.push(answer.packet());
            held.answers.pop_front();
        }
        if held.answers.is_empty() {
            // The count starts again with the next answer held.
            held.passed = 0;
        }
        self.free_if_empty();
    }

    /// Nothing stays allocated between bursts.
    fn free_if_empty(&mut self) {
        if self.held.as_ref().is_some_and(|held| held.is_empty()) {
            self.held = None;
        }
    }

    /// Takes note of a QoS 2 publish the session refused (the ACL, the
    /// memory budget), whose PUBREL it is to answer. MQTT 5's refusal, a
    /// PUBREC of 0x80 or more, ends the exchange (§4.3.3) and a conforming
    /// client sends no PUBREL; 3.1.1's, a PUBREC as if delivered, expects
    /// one.
    pub(crate) fn refused_qos2(&mut self, pkid: u16) {
        let refused = &mut self.held.get_or_insert_default().refused_qos2;
        refused.retain(|&p| p != pkid);
        if refused.len() == MAX_REFUSED_QOS2 {
            refused.pop_front();
        }
        refused.push_back(pkid);
    }

    /// Takes note of a QoS 2 publish handed to the router: its packet id
    /// names the router's exchange now, not a refused one.
    pub(crate) fn forwarded_qos2(&mut self, pkid: u16) {
        if let Some(held) = &mut self.held {
            held.refused_qos2.retain(|&p| p != pkid);
            self.free_if_empty();
        }
    }

    /// Whether a PUBREL from the client names a publish the session
    /// refused, which it then forgets: the session answers it (see
    /// [`refused_qos2`](AckOrder::refused_qos2)), not the router.
    pub(crate) fn releases_refused(&mut self, pkid: u16) -> bool {
        let Some(held) = &mut self.held else {
            return false;
        };
        let Some(at) = held.refused_qos2.iter().position(|&p| p == pkid) else {
            return false;
        };
        held.refused_qos2.remove(at);
        self.free_if_empty();
        true
    }

    /// Whether the session must stop reading its client (see [`MAX_HELD`]).
    pub(crate) fn is_full(&self) -> bool {
        self.held.as_ref().is_some_and(|held| held.answers.len() >= MAX_HELD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttd::protocol::Publish;

    /// A delivery to the client (QoS 0: no packet id, shown as 0).
    fn delivery() -> Packet {
        Packet::Publish(Publish::new(Bytes::from_static(b"t"), Bytes::new(), false), None)
    }

    fn puback(pkid: u16) -> Packet {
        Answer::PubAck(pkid, PubAckReason::Success).packet()
    }

    /// (type, pkid) of each packet, for comparing orders.
    fn order(packets: &[Packet]) -> Vec<(&'static str, u16)> {
        packets
            .iter()
            .map(|p| match p {
                Packet::PubAck(a, _) => ("puback", a.pkid),
                Packet::PubRec(a, _) => ("pubrec", a.pkid),
                Packet::PubComp(a, _) => ("pubcomp", a.pkid),
                Packet::Publish(p, _) => ("publish", p.pkid()),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Nothing owed: an answer goes out at once.
    #[test]
    fn with_nothing_owed_an_answer_is_not_held() {
        let mut acks = AckOrder::default();
        let mut replies = Vec::new();
        acks.answer(Answer::PubAck(1, PubAckReason::NotAuthorized), &mut replies);
        assert_eq!(order(&replies), [("puback", 1)]);
    }

    /// Publishes 1 and 2 to the router, 3 refused, 4 to the router, 5
    /// refused: 3 goes out right after the router's PUBACK 2, 5 after 4,
    /// whatever else the router sends in between.
    #[test]
    fn an_answer_waits_for_the_router_acknowledgements_owed_before_it() {
        let mut acks = AckOrder::default();
        let mut replies = Vec::new();
        acks.owed();
        acks.owed();
        acks.answer(Answer::PubAck(3, PubAckReason::NotAuthorized), &mut replies);
        acks.owed();
        acks.answer(Answer::PubRec(5, PubRecReason::QuotaExceeded), &mut replies);
        assert!(replies.is_empty(), "all held");
        let mut out = Vec::new();
        acks.pass(puback(1), &mut out);
        acks.pass(delivery(), &mut out);
        assert_eq!(order(&out), [("puback", 1), ("publish", 0)], "a delivery releases nothing");
        let pubrec = Answer::PubRec(2, PubRecReason::Success).packet();
        acks.pass(pubrec, &mut out);
        acks.pass(puback(4), &mut out);
        assert_eq!(
            order(&out),
            [("puback", 1), ("publish", 0), ("pubrec", 2), ("puback", 3), ("puback", 4), ("pubrec", 5)]
        );
        assert!(acks.held.is_none(), "nothing kept allocated");
        // All paid: the next answer goes out at once.
        acks.answer(Answer::PubComp(6, PubCompReason::Success), &mut replies);
        assert_eq!(order(&replies), [("pubcomp", 6)]);
    }

    /// A PUBREL to the router owes its PUBCOMP: the session's own PUBCOMP
    /// (a refused 3.1.1 QoS 2 publish's release) waits for it.
    #[test]
    fn a_pubcomp_waits_for_the_router_pubcomps_owed_before_it() {
        let mut acks = AckOrder::default();
        let mut replies = Vec::new();
        acks.owed();
        acks.answer(Answer::PubComp(8, PubCompReason::Success), &mut replies);
        assert!(replies.is_empty());
        let mut out = Vec::new();
        acks.pass(Answer::PubComp(7, PubCompReason::Success).packet(), &mut out);
        assert_eq!(order(&out), [("pubcomp", 7), ("pubcomp", 8)]);
    }

    /// A refused QoS 2 publish's PUBREL is the session's to answer, once;
    /// a QoS 2 publish handed to the router with the same packet id takes
    /// it back; at most `MAX_REFUSED_QOS2` are remembered, the oldest
    /// forgotten first; nothing stays allocated once all are released.
    #[test]
    fn refused_qos2_publishes_are_remembered_until_released_and_bounded() {
        let mut acks = AckOrder::default();
        assert!(!acks.releases_refused(1), "nothing refused");
        acks.refused_qos2(1);
        acks.refused_qos2(2);
        acks.refused_qos2(1);
        assert!(acks.releases_refused(1));
        assert!(!acks.releases_refused(1), "released once");
        acks.forwarded_qos2(2);
        assert!(!acks.releases_refused(2), "the router's exchange now");
        assert!(acks.held.is_none(), "nothing kept allocated");

        for pkid in 0..=MAX_REFUSED_QOS2 as u16 {
            acks.refused_qos2(pkid);
        }
        assert!(!acks.releases_refused(0), "the oldest was forgotten");
        for pkid in 1..=MAX_REFUSED_QOS2 as u16 {
            assert!(acks.releases_refused(pkid), "{pkid}");
        }
        assert!(acks.held.is_none());
    }

    /// Refused publishes remembered do not disturb the order of answers
    /// held back meanwhile.
    #[test]
    fn remembered_refusals_keep_the_order_of_held_answers() {
        let mut acks = AckOrder::default();
        let mut replies = Vec::new();
        acks.refused_qos2(9);
        for round in 0..3u16 {
            acks.owed();
            acks.answer(Answer::PubAck(100 + round, PubAckReason::NotAuthorized), &mut replies);
            let mut out = Vec::new();
            acks.pass(puback(round), &mut out);
            assert_eq!(order(&out), [("puback", round), ("puback", 100 + round)]);
        }
        assert!(replies.is_empty());
        assert!(acks.releases_refused(9));
        assert!(acks.held.is_none());
    }

    /// Held answers are bounded: the session stops reading at `MAX_HELD`,
    /// and one acknowledgement of the router's can release them all.
    #[test]
    fn held_answers_are_bounded() {
        assert_eq!(std::mem::size_of::<(u32, Answer)>(), 8, "as MAX_HELD says");
        assert_eq!(std::mem::size_of::<AckOrder>(), 16, "as AckOrder says");
        let mut acks = AckOrder::default();
        let mut replies = Vec::new();
        acks.owed();
        for pkid in 2..=MAX_HELD as u16 {
            acks.answer(Answer::PubAck(pkid, PubAckReason::NotAuthorized), &mut replies);
            assert!(!acks.is_full());
        }
        acks.answer(Answer::PubAck(0, PubAckReason::NotAuthorized), &mut replies);
        assert!(acks.is_full());
        let mut out = Vec::new();
        acks.pass(puback(1), &mut out);
        assert_eq!(out.len(), MAX_HELD + 1);
        assert!(!acks.is_full());
    }
}
