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
//! [`owed`]: AckOrder::owed
//! [`pass`]: AckOrder::pass

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

/// An acknowledgement the session gives itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names, reason = "named after the packets")]
pub(crate) enum Answer {
    PubAck(u16, PubAckReason),
    PubRec(u16, PubRecReason),
    PubComp(u16),
}

impl Answer {
    fn packet(self) -> Packet {
        match self {
            Answer::PubAck(pkid, reason) => Packet::PubAck(PubAck { pkid, reason }, None),
            Answer::PubRec(pkid, reason) => Packet::PubRec(PubRec { pkid, reason }, None),
            Answer::PubComp(pkid) => Packet::PubComp(PubComp { pkid, reason: PubCompReason::Success }, None),
        }
    }
}

/// One session's acknowledgements owed by the router, and the answers of
/// its own waiting for them. 16 bytes in every session's future; what is
/// held is allocated only while there is something to hold.
#[derive(Debug, Default)]
pub(crate) struct AckOrder {
    /// Acknowledgements the router owes for packets handed to it.
    owed: u32,
    held: Option<Box<Held>>,
}

/// Answers held back, and how far the router's acknowledgements have come
/// since the first of them was.
#[derive(Debug, Default)]
struct Held {
    /// Acknowledgements of the router passed to the client since.
    passed: u32,
    /// Each answer goes out after the router's acknowledgement with this
    /// number (of `passed`); in order.
    answers: VecDeque<(u32, Answer)>,
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
            // Nothing stays allocated between bursts (and the count starts
            // again with the next answer held).
            self.held = None;
        }
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
        acks.answer(Answer::PubComp(6), &mut replies);
        assert_eq!(order(&replies), [("pubcomp", 6)]);
    }

    /// A PUBREL to the router owes its PUBCOMP: the session's own PUBCOMP
    /// (a refused 3.1.1 QoS 2 publish's release) waits for it.
    #[test]
    fn a_pubcomp_waits_for_the_router_pubcomps_owed_before_it() {
        let mut acks = AckOrder::default();
        let mut replies = Vec::new();
        acks.owed();
        acks.answer(Answer::PubComp(8), &mut replies);
        assert!(replies.is_empty());
        let mut out = Vec::new();
        acks.pass(Answer::PubComp(7).packet(), &mut out);
        assert_eq!(order(&out), [("pubcomp", 7), ("pubcomp", 8)]);
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
