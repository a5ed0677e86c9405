//! Checks before a run: are the settings possible on this machine, and is
//! there a server of the right kind at the URL? Each refusal says what to
//! change, so nobody waits through a ramp to learn the URL was wrong.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::mqtt::Client;
use crate::payload;
use crate::scenario::Settings;
use crate::stats::ErrorKind;
use crate::target::{Protocol, Target};
use echo_mqtt_wire::{self as codec, Packet};

/// File descriptors a worker keeps for itself (runtime, pipes, /proc reads).
pub const FD_RESERVE: u64 = 64;

/// How many worker processes the largest step needs, or why it cannot run.
pub fn workers_needed(settings: &Settings, requested: Option<usize>, fd_limit: u64) -> Result<usize, String> {
    let max = settings.max_connections();
    let per_process = fd_limit.saturating_sub(FD_RESERVE).max(1);
    let needed = max.div_ceil(per_process).max(1) as usize;
    match requested {
        None => Ok(needed),
        Some(0) => Err("--workers must be at least 1".into()),
        Some(w) if w < needed => Err(format!(
            "{max} connections over {w} worker(s) is {} per process, but the open-file limit ({fd_limit}) allows {per_process}: \
             use --workers {needed} or more (or leave --workers out)",
            max.div_ceil(w as u64)
        )),
        Some(w) => Ok(w),
    }
}

/// Whether the source addresses can reach `server` and have enough local
/// ports for the largest step; if not, what to give instead. The hint
/// depends on where the server is: every 127.x.y.z address is this
/// machine's, so a loopback server can be reached from as many as needed,
/// while a remote one only from addresses this machine really has.
pub fn sources_suffice(settings: &Settings, server: IpAddr, ports_per_source: u64) -> Result<(), String> {
    if let Some(bad) = settings.sources.iter().find(|a| a.is_ipv4() != server.is_ipv4()) {
        let family = |a: &IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(format!(
            "--source {bad} is an {} address but the server's address {server} is {}: give source addresses of the same family",
            family(bad),
            family(&server)
        ));
    }
    let max = settings.max_connections();
    let sources = settings.sources.len().max(1) as u64;
    let capacity = sources * ports_per_source;
    if max <= capacity {
        return Ok(());
    }
    let want = max.div_ceil(ports_per_source);
    let loopback_range = |n: u64| {
        let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
        let last = Ipv4Addr::from(first.saturating_add(n.saturating_sub(1) as u32));
        format!("127.0.0.2-{last}")
    };
    let hint = match server {
        IpAddr::V4(ip) if ip.is_loopback() => format!(
            "give --source {} ({want} addresses; every 127.x.y.z address is this machine's)",
            loopback_range(want)
        ),
        IpAddr::V6(ip) if ip.is_loopback() => format!(
            "IPv6 has one loopback address: if the server also listens on 127.0.0.1, address it so and give --source {}",
            loopback_range(want)
        ),
        _ => format!(
            "give --source with at least {want} addresses of this machine that reach {server} (e.g. extra \
             addresses on its network interface), or spread the connections over several machines and `merge` the results"
        ),
    };
    Err(format!(
        "{max} connections need more local ports than {sources} source address(es) × {ports_per_source} ephemeral ports = {capacity}: {hint}"
    ))
}

/// Opens one connection and checks that a message comes back intact.
pub async fn probe(target: &Target, settings: &Settings) -> Result<(), String> {
    let timeout = settings.connect_timeout().min(Duration::from_secs(5));
    let source = settings.sources.first().copied();
    match target.protocol {
        Protocol::WebSocket => probe_ws(target, settings, source, timeout).await,
        Protocol::Mqtt => probe_mqtt(target, settings, source, timeout).await,
    }
}

fn explain(kind: ErrorKind, target: &Target, timeout: Duration) -> String {
    let (url, addr) = (&target.url, target.addr);
    match kind {
        ErrorKind::ConnectRefused => {
            format!(
                "nothing accepts connections at {addr} (connection refused): is the server running, and is the port in {url} right?"
            )
        }
        ErrorKind::ConnectTimeout => {
            format!(
                "no answer from {addr} within {timeout:?}: is the address right, or is a firewall dropping packets?"
            )
        }
        ErrorKind::AddressUnavailable => {
            format!("cannot bind the --source address: is it an address of this machine? ({addr})")
        }
        ErrorKind::HandshakeStatus(code) => format!(
            "{url} answered the WebSocket upgrade with HTTP {code} instead of 101 Switching Protocols: \
             is the path right, and is this a WebSocket endpoint?"
        ),
        ErrorKind::HandshakeTimeout | ErrorKind::HandshakeFailed
            if target.protocol == Protocol::WebSocket =>
        {
            format!(
                "{addr} accepted TCP but did not complete a WebSocket handshake: is it a WebSocket server? (an MQTT broker is addressed as mqtt://)"
            )
        }
        ErrorKind::HandshakeTimeout | ErrorKind::HandshakeFailed => format!(
            "{addr} accepted TCP but did not answer MQTT CONNECT with CONNACK: is it an MQTT broker? (a WebSocket server is addressed as ws://)"
        ),
        ErrorKind::MqttConnackRefused(code) => format!(
            "the broker at {addr} refused the connection (CONNACK code {code}{}): check --mqtt-version and the broker's access rules",
            match code {
                1 | 132 => ", unsupported protocol version",
                4 | 5 | 134 | 135 => ", not authorized: anonymous clients are not allowed",
                _ => "",
            }
        ),
        ErrorKind::MqttSubscribeRefused => {
            format!("the broker at {addr} refused SUBSCRIBE: check its access rules for the topic prefix")
        }
        other => format!("{url}: {other}"),
    }
}

fn not_taken(target: &Target, size: usize, timeout: Duration) -> String {
    format!(
        "{} accepted the connection but did not take a {size}-byte message within {timeout:?}: is the server reading \
         (is it overloaded or stuck)?",
        target.url
    )
}

async fn probe_ws(
    target: &Target,
    settings: &Settings,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
) -> Result<(), String> {
    let mut ws = crate::ws::open(&target.ws_url(), target.addr, source, timeout)
        .await
        .map_err(|k| explain(k, target, timeout))?;
    let msg = payload::message(0, 0, 0, settings.size);
    let deadline = Instant::now() + timeout;
    // A server that does not read must not hold the check up forever.
    match tokio::time::timeout_at(deadline, ws.send(Message::Binary(Bytes::from(msg.clone())))).await {
        Err(_) => return Err(not_taken(target, settings.size, timeout)),
        Ok(Err(e)) => {
            return Err(format!("{}: the connection failed right after the handshake: {e}", target.url));
        }
        Ok(Ok(())) => {}
    }
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => {
                return Err(format!(
                    "{} accepted the WebSocket but did not echo a {}-byte message within {timeout:?}: is it an echo server?",
                    target.url, settings.size
                ));
            }
            Ok(Some(Ok(Message::Binary(data)))) if data[..] == msg[..] => break,
            Ok(Some(Ok(Message::Binary(_) | Message::Text(_)))) => {
                return Err(format!(
                    "{} answered with something other than the echo of what was sent: is it an echo server?",
                    target.url
                ));
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(format!("{} closed the connection instead of echoing ({frame:?})", target.url));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(format!("{}: {e}", target.url)),
            Ok(None) => return Err(format!("{} closed the connection instead of echoing", target.url)),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(())
}

async fn probe_mqtt(
    target: &Target,
    settings: &Settings,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let id = format!("elg-probe-{}", std::process::id());
    let mut c = Client::open(target.addr, source, settings.mqtt_version, &id, deadline)
        .await
        .map_err(|k| explain(k, target, timeout))?;
    let topic = format!("{}/probe/{}", settings.topic_prefix, std::process::id());
    c.subscribe(&topic, 0, deadline).await.map_err(|k| explain(k, target, timeout))?;
    let msg = payload::message(0, 0, 0, settings.size);
    match tokio::time::timeout_at(
        deadline,
        c.send(|buf, v| codec::publish(buf, v.level(), topic.as_bytes(), 0, 0, &msg)),
    )
    .await
    {
        Err(_) => return Err(not_taken(target, settings.size, timeout)),
        Ok(Err(k)) => return Err(explain(k, target, timeout)),
        Ok(Ok(())) => {}
    }
    loop {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Err(_) => {
                return Err(format!(
                    "the broker at {} did not deliver a message published to a subscribed topic within {timeout:?}",
                    target.addr
                ));
            }
            Ok(Ok(Packet::Publish { payload, .. })) if payload[..] == msg[..] => break,
            Ok(Ok(Packet::Publish { .. })) => {
                return Err("the broker delivered different bytes than were published".into());
            }
            Ok(Ok(_)) => continue,
            Ok(Err(k)) => return Err(explain(k, target, timeout)),
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        c.send(|buf, _| buf.extend_from_slice(&codec::DISCONNECT)),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::tests::run;

    fn settings(steps: Vec<u64>, sources: usize) -> Settings {
        let mut s = run(vec![]).settings;
        s.steps = steps;
        s.sources = (0..sources).map(|i| format!("127.0.0.{}", i + 2).parse().unwrap()).collect();
        s
    }

    #[test]
    fn workers_follow_the_fd_limit() {
        assert_eq!(workers_needed(&settings(vec![19_000], 0), None, 20_000), Ok(1));
        assert_eq!(workers_needed(&settings(vec![1000, 40_000], 2), None, 20_000), Ok(3));
        assert_eq!(workers_needed(&settings(vec![100], 0), Some(4), 20_000), Ok(4));
        let e = workers_needed(&settings(vec![30_000], 2), Some(1), 20_000).unwrap_err();
        assert!(e.contains("--workers 2"), "{e}");
    }

    #[test]
    fn ports_need_source_addresses_and_the_hint_fits_the_server() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let e = sources_suffice(&settings(vec![60_000], 0), local, 28_232).unwrap_err();
        assert!(e.contains("--source 127.0.0.2-127.0.0.4 (3 addresses"), "{e}");
        assert!(sources_suffice(&settings(vec![60_000], 3), local, 28_232).is_ok());
        let e = sources_suffice(&settings(vec![60_000], 2), local, 28_232).unwrap_err();
        assert!(e.contains("2 source address(es)") && e.contains("127.0.0.2-127.0.0.4"), "{e}");
        // A remote server: 127.x addresses cannot reach it, so none are suggested.
        let remote: IpAddr = "192.0.2.10".parse().unwrap();
        let e = sources_suffice(&settings(vec![60_000], 0), remote, 28_232).unwrap_err();
        assert!(!e.contains("127.0.0") && !e.contains("loopback"), "{e}");
        assert!(e.contains("at least 3 addresses of this machine that reach 192.0.2.10"), "{e}");
        let e = sources_suffice(&settings(vec![60_000], 0), "::1".parse().unwrap(), 28_232).unwrap_err();
        assert!(e.contains("IPv6 has one loopback address"), "{e}");
        // Many addresses: the range is written correctly past 127.0.0.255.
        let e = sources_suffice(&settings(vec![10_000_000], 0), local, 28_232).unwrap_err();
        assert!(e.contains("127.0.0.2-127.0.1.100 (355 addresses"), "{e}");
        // Sources of the other family cannot reach the server at all.
        let e = sources_suffice(&settings(vec![10], 1), "::1".parse().unwrap(), 28_232).unwrap_err();
        assert!(e.contains("--source 127.0.0.2 is an IPv4 address"), "{e}");
    }
}
