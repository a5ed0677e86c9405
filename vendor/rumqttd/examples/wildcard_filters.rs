//! echo-server patch: the router's work for one client that holds many
//! wildcard filters (vendor/rumqttd/PATCHED.md). Run from a copy of the
//! crate, as .ci/run runs its tests:
//!
//! ```sh
//! cargo run --release --example wildcard_filters -- 100000 2000 [T [R]]
//! ```
//!
//! One router, as echo-server starts it, and three local links: a holder
//! that subscribes to N filters `w/<i>/+` (1,000 per SUBSCRIBE), a publisher
//! that sends P QoS 1 publishes to fresh topics nobody subscribes to
//! (`t/<j>`, and `w/<j>/a/b`, which shares the filters' first levels),
//! before and while the filters are held, and a probe. The holder then
//! disconnects and the probe publishes at once: the router handles events
//! in order, so the probe's PUBACK comes back when the disconnection has
//! been dealt with. Each phase reports its wall time and the router
//! thread's CPU time (Linux: /proc/self/task/*/schedstat), which is what
//! the other clients wait for, and does not depend on other load on the
//! machine.
//!
//! With T, another client first subscribes to T topics `c/<k>` and
//! publishes once to each, so that the router has T topics cached when the
//! wildcard filters come (each new wildcard filter is matched against the
//! cached topics). With R, the publisher first retains a message on each of
//! R topics `r/<k>` (each new subscription reads the retained messages its
//! filter matches). The retained messages are read when the router serves
//! the subscriptions, which may be after their SUBACKs: the subscription
//! phase ends when the router thread has stopped using CPU.

use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::{Notification, Router, RouterConfig};

const WINDOW: usize = 100;

/// The next packet the router sends this link (a wake-up may find the
/// notifications already taken: `None`).
fn next_packet(rx: &mut LinkRx) -> Packet {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let packet = match rx.recv_deadline(deadline).expect("router answers") {
            Some(Notification::Unschedule) | None => None,
            Some(n) => n.into(),
        };
        if let Some(p) = packet {
            return p;
        }
    }
}

/// Publishes `count` QoS 1 messages to fresh topics, `WINDOW` at a time,
/// and returns the rate the router acknowledged them at, by wall time and
/// by router CPU time.
fn publish_fresh(tx: &mut LinkTx, rx: &mut LinkRx, round: &str, count: usize) -> String {
    let started = now();
    let mut sent = 0;
    while sent < count {
        let n = WINDOW.min(count - sent);
        for k in 0..n {
            let j = sent + k;
            let topic = if j % 2 == 0 {
                format!("t/{round}/{j}")
            } else {
                format!("w/{j}/{round}/b")
            };
            tx.push_packet(Packet::Publish(qos1(&topic, (k + 1) as u16), None));
        }
        let mut acked = 0;
        while acked < n {
            if let Packet::PubAck(..) = next_packet(rx) {
                acked += 1;
            }
        }
        sent += n;
    }
    let wall = started.0.elapsed().as_secs_f64();
    let cpu = (router_cpu() - started.1).as_secs_f64();
    format!(
        "{:.0}/s, {:.1} µs of router CPU each",
        count as f64 / wall,
        cpu * 1e6 / count as f64
    )
}

/// CPU time the router thread has used so far (Linux; zero elsewhere).
fn router_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "router-0" {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let ns = stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            return Duration::from_nanos(ns);
        }
    }
    Duration::ZERO
}

/// Wall and router CPU time since `start`, as printed.
fn since(start: (Instant, Duration)) -> String {
    format!(
        "{:.3} s, router CPU {:.3} s",
        start.0.elapsed().as_secs_f64(),
        (router_cpu() - start.1).as_secs_f64()
    )
}

fn now() -> (Instant, Duration) {
    (Instant::now(), router_cpu())
}

/// Waits until the router thread has used no CPU for 100 ms, and returns
/// the time it was last seen working.
fn router_idle() -> Instant {
    let mut last = (Instant::now(), router_cpu());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let cpu = router_cpu();
        if cpu == last.1 {
            return last.0;
        }
        last = (Instant::now(), cpu);
    }
}

/// Resident memory of the process (Linux; empty elsewhere).
fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map_or_else(String::new, |kb| format!("RSS {}", kb.trim()))
}

/// A QoS 1 publish (its QoS and packet id are private to the crate; its
/// serialization is the public way to set them).
fn qos1(topic: &str, pkid: u16) -> Publish {
    publish(topic, pkid, false)
}

fn publish(topic: &str, pkid: u16, retain: bool) -> Publish {
    let mut raw = Vec::with_capacity(5 + topic.len() + 16);
    raw.push(0b0011_0010 | u8::from(retain));
    raw.extend_from_slice(&pkid.to_be_bytes());
    raw.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    raw.extend_from_slice(topic.as_bytes());
    raw.extend_from_slice(&[0u8; 16]);
    Publish::deserialize(raw.into())
}

trait Push {
    fn push_packet(&mut self, packet: Packet);
}

impl Push for LinkTx {
    /// `LinkTx::send` blocks on the router's channel and never awaits.
    fn push_packet(&mut self, packet: Packet) {
        thread_local! {
            static RUNTIME: tokio::runtime::Runtime =
                tokio::runtime::Builder::new_current_thread().build().unwrap();
        }
        RUNTIME
            .with(|rt| rt.block_on(self.send(packet)))
            .expect("router takes the packet");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let filters: usize = args
        .next()
        .map_or(100_000, |a| a.parse().expect("N filters"));
    let publishes: usize = args
        .next()
        .map_or(2_000, |a| a.parse().expect("P publishes"));
    let cached: usize = args
        .next()
        .map_or(0, |a| a.parse().expect("T cached topics"));
    let retained: usize = args
        .next()
        .map_or(0, |a| a.parse().expect("R retained topics"));

    let router = Router::new(
        0,
        RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
    );
    let router_tx = router.spawn();
    let build = |id: &str| {
        let (tx, rx, _connack) = LinkBuilder::new(id, router_tx.clone())
            .clean_session(true)
            .dynamic_filters(false)
            .build()
            .expect("link");
        (tx, rx)
    };
    let (mut holder_tx, mut holder_rx) = build("holder");
    let (mut pub_tx, mut pub_rx) = build("publisher");
    let (mut probe_tx, mut probe_rx) = build("probe");

    // Its deliveries are never read: the router stops at its queue's limit.
    let started = now();
    let _own_topics = (cached > 0).then(|| {
        let (mut own_tx, mut own_rx) = build("own-topics");
        for chunk in (0..cached).collect::<Vec<_>>().chunks(1000) {
            let batch = chunk
                .iter()
                .map(|k| Filter {
                    path: format!("c/{k}"),
                    qos: QoS::AtMostOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::Never,
                })
                .collect();
            own_tx.push_packet(Packet::Subscribe(
                Subscribe {
                    pkid: 1,
                    filters: batch,
                },
                None,
            ));
            while !matches!(next_packet(&mut own_rx), Packet::SubAck(..)) {}
        }
        for chunk in (0..cached).collect::<Vec<_>>().chunks(WINDOW) {
            for (n, k) in chunk.iter().enumerate() {
                let publish = qos1(&format!("c/{k}"), (n + 1) as u16);
                pub_tx.push_packet(Packet::Publish(publish, None));
            }
            let mut acked = 0;
            while acked < chunk.len() {
                if let Packet::PubAck(..) = next_packet(&mut pub_rx) {
                    acked += 1;
                }
            }
        }
        println!("{cached} topics cached: {}, {}", since(started), rss());
        (own_tx, own_rx)
    });

    let started = now();
    for chunk in (0..retained).collect::<Vec<_>>().chunks(WINDOW) {
        for (n, k) in chunk.iter().enumerate() {
            let retained = publish(&format!("r/{k}"), (n + 1) as u16, true);
            pub_tx.push_packet(Packet::Publish(retained, None));
        }
        let mut acked = 0;
        while acked < chunk.len() {
            if let Packet::PubAck(..) = next_packet(&mut pub_rx) {
                acked += 1;
            }
        }
    }
    if retained > 0 {
        println!("{retained} topics retained: {}, {}", since(started), rss());
    }

    let rate = publish_fresh(&mut pub_tx, &mut pub_rx, "before", publishes);
    println!("publishes to fresh topics, no filters held: {rate}");

    let started = now();
    let mut subscribed = 0;
    while subscribed < filters {
        let n = 1000.min(filters - subscribed);
        let batch = (subscribed..subscribed + n)
            .map(|i| Filter {
                path: format!("w/{i}/+"),
                qos: QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            })
            .collect();
        holder_tx.push_packet(Packet::Subscribe(
            Subscribe {
                pkid: 1,
                filters: batch,
            },
            None,
        ));
        while !matches!(next_packet(&mut holder_rx), Packet::SubAck(..)) {}
        subscribed += n;
    }
    let acked = since(started);
    let idle = router_idle();
    println!(
        "{filters} wildcard filters subscribed: SUBACKs {acked}; router done after {:.3} s, router CPU {:.3} s",
        (idle - started.0).as_secs_f64(),
        (router_cpu() - started.1).as_secs_f64()
    );

    let rate = publish_fresh(&mut pub_tx, &mut pub_rx, "held", publishes);
    println!("publishes to fresh topics, {filters} filters held: {rate}");

    let started = now();
    let bye = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    holder_tx.push_packet(Packet::Disconnect(bye, None));
    probe_tx.push_packet(Packet::Publish(qos1("probe", 1), None));
    while !matches!(next_packet(&mut probe_rx), Packet::PubAck(..)) {}
    println!(
        "disconnection of the holder: the next client waited {}",
        since(started)
    );

    let rate = publish_fresh(&mut pub_tx, &mut pub_rx, "after", publishes);
    println!("publishes to fresh topics, filters freed: {rate}");
}
