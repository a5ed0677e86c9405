//! Fuzzing what a client reaches first, through the real server: MQTT
//! packets (our codec and checks, and rumqttd's router behind them) and the
//! HTTP head of the WebSocket port (the upgrade, the page, MQTT over
//! WebSocket).
//!
//! Inputs are whole client conversations from the seed corpus in
//! `tests/fuzz-corpus/` (`make.py` there writes it), mutated by proptest:
//! bytes flipped, set, inserted, deleted or repeated, the input cut short,
//! or a part of another seed spliced in. Each input goes to the server on a
//! connection of its own; whatever comes back is read until the server
//! closes or goes quiet. What must hold: the server lives, nothing panics
//! (a panicking task is logged, and counted in `closed_total{reason}`), and
//! a well-behaved client is still served the same as before.
//!
//! `FUZZ_CASES` sets the inputs per test (CI: the default, a few seconds);
//! a longer hunt: `FUZZ_CASES=20000 cargo test --release --test fuzz`. A
//! failing input is shrunk by proptest and printed; add it to the corpus,
//! named after what it found, with the fix.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt};
use common::raw::RawClient;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};

/// How long a connection may stay quiet before the input is taken as
/// answered (most mutated inputs leave a packet or a head incomplete).
const QUIET: Duration = Duration::from_millis(40);

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus").join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Repeat(Index, usize),
    Truncate(Index),
    Splice(Index, Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<Index>;
    // Bytes that matter to MQTT and HTTP framing more often than others.
    let byte =
        || prop_oneof![any::<u8>(), Just(0), Just(0x7f), Just(0x80), Just(0xff), Just(b'\r'), Just(b'\n')];
    prop_oneof![
        (at(), 0..8u8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        (at(), byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (at(), byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        at().prop_map(Mutation::Delete),
        (at(), 1..64usize).prop_map(|(i, n)| Mutation::Repeat(i, n)),
        at().prop_map(Mutation::Truncate),
        (at(), at(), at()).prop_map(|(seed, from, to)| Mutation::Splice(seed, from, to)),
    ]
}

/// Applies the mutations in order to a copy of `seed`.
fn mutate(seed: &[u8], mutations: &[Mutation], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut input = seed.to_vec();
    for m in mutations {
        let len = input.len();
        match m {
            _ if len == 0 => input.push(0x10),
            Mutation::Flip(i, bit) => input[i.index(len)] ^= 1 << bit,
            Mutation::Set(i, b) => input[i.index(len)] = *b,
            Mutation::Insert(i, b) => input.insert(i.index(len + 1), *b),
            Mutation::Delete(i) => {
                input.remove(i.index(len));
            }
            Mutation::Repeat(i, n) => {
                let at = i.index(len);
                let part = input[at..(at + n).min(len)].to_vec();
                input.splice(at..at, part);
            }
            Mutation::Truncate(i) => input.truncate(i.index(len)),
            Mutation::Splice(seed, from, to) => {
                let other = &seeds[seed.index(seeds.len())];
                let from = from.index(other.len());
                input.splice(to.index(len + 1)..to.index(len + 1), other[from..].iter().copied());
            }
        }
    }
    input
}

/// Sends `input` on a new connection and reads the answer until the server
/// closes, resets or goes quiet; returns the bytes it answered.
fn send(addr: SocketAddr, input: &[u8]) -> usize {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(QUIET)).unwrap();
    // The server may close before it has read everything (a refusal).
    let _ = stream.write_all(input);
    let mut answered = 0;
    let mut buf = [0; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answered += n;
    }
    answered
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

/// Runs the fuzzer against `addr` with the seeds of `kind`, then checks
/// that nothing in the server panicked.
fn fuzz(server: &TestServer, addr: SocketAddr, kind: &str) {
    let seeds = corpus(kind);
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let strategy = (any::<Index>(), proptest::collection::vec(mutation(), 0..6));
    let result = runner.run(&strategy, |(seed, mutations)| {
        let input = mutate(&seeds[seed.index(seeds.len())], &mutations, &seeds);
        send(addr, &input);
        prop_assert!(
            !server.log_text().contains("\"panic\""),
            "a panic in the server:\n{}",
            server.log_text()
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{kind} input that hurt the server: {e}");
    }
}

/// A plain MQTT round trip and a WebSocket echo: still served.
fn still_served(server: &TestServer) {
    let mut client = RawMqtt::session(server.mqtt_addr(), 5, "after-the-fuzz", 30);
    client.send(&mqtt_raw::subscribe(5, 1, "after/fuzz"));
    assert_eq!(client.read_packet().expect("SUBACK").packet_type(), 9);
    client.send(&mqtt_raw::publish(5, "after/fuzz", b"still here"));
    let echo = client.read_packet().expect("the publish");
    assert_eq!(echo.packet_type(), 3);
    let mut ws = RawClient::connect(server.ws_addr());
    ws.send_frame(true, 1, b"still here");
    assert_eq!(ws.read_frame().expect("the echo").payload, b"still here");
}

#[test]
fn mqtt_packets_mutated_from_the_corpus_never_hurt_the_server() {
    let server = TestServer::start(&[]);
    fuzz(&server, server.mqtt_addr(), "mqtt");
    let metrics = server.metrics();
    let total =
        |prefix: &str| metrics.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum::<f64>();
    let (sessions, publishes) =
        (total("echo_mqtt_connects_total"), total("echo_mqtt_publishes_received_total"));
    eprintln!("{} inputs: {sessions} sessions, {publishes} publishes routed", cases());
    // Mutations that only ever broke the CONNECT would test one function.
    assert!(sessions >= f64::from(cases()) / 10.0, "too few inputs got past CONNECT: {sessions}");
    assert!(publishes > 0.0, "no fuzzed publish reached the router");
    assert_eq!(metrics.get("echo_mqtt_closed_total{reason=\"panic\"}").copied().unwrap_or(0.0), 0.0);
    still_served(&server);
}

#[test]
fn http_heads_mutated_from_the_corpus_never_hurt_the_server() {
    let server = TestServer::start(&[]);
    fuzz(&server, server.ws_addr(), "http");
    still_served(&server);
}
