//! Injected faults must show up as the right error kind, or as latency —
//! never silently. The faulty server is built here, on tokio-tungstenite,
//! so the real server stays free of test hooks. Each fault starts after a
//! connection's first message, so the generator's pre-run check (one
//! message on one connection) still sees an echo server — except
//! `NeverRead`, which is for the check itself.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// After echoing this many messages, send a close frame.
    CloseAfter(u64),
    /// After echoing this many messages, drop the TCP connection.
    DropAfter(u64),
    /// Flip one byte of every message whose index is k (mod 4 == 3).
    CorruptEveryFourth,
    /// Before echoing message `at`, wait.
    Stall { at: u64, millis: u64 },
    /// Echo this many messages, then read but never answer again.
    SwallowAfter(u64),
    /// Echo this many messages, then never read again: the socket buffers
    /// fill and the generator's writes block.
    StopReadingAfter(u64),
    /// Accept the upgrade, then never read at all (not even the pre-run check's message).
    NeverRead,
}

/// Starts a faulty echo server on its own runtime thread; returns its address.
fn faulty_server(fault: Fault) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                    let mut n = 0u64;
                    if let Fault::NeverRead = fault {
                        // Holds the connection open, unread.
                        std::future::pending::<()>().await;
                    }
                    while let Some(Ok(msg)) = ws.next().await {
                        let Message::Binary(data) = msg else { continue };
                        let mut data = data.to_vec();
                        match fault {
                            Fault::CloseAfter(k) if n == k => {
                                let frame = CloseFrame { code: CloseCode::Away, reason: "fault".into() };
                                let _ = ws.close(Some(frame)).await;
                                return;
                            }
                            Fault::DropAfter(k) if n == k => return,
                            Fault::CorruptEveryFourth if n % 4 == 3 => data[40] ^= 0x20,
                            Fault::Stall { at, millis } if n == at => {
                                tokio::time::sleep(Duration::from_millis(millis)).await;
                            }
                            Fault::StopReadingAfter(k) if n >= k => std::future::pending().await,
                            Fault::SwallowAfter(k) if n >= k => {
                                n += 1;
                                continue;
                            }
                            _ => {}
                        }
                        n += 1;
                        if ws.send(Message::Binary(data.into())).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    addr
}

fn run_against(fault: Fault, extra: &[&str]) -> Run {
    let url = format!("ws://{}/", faulty_server(fault));
    let mut args = vec![url.as_str(), "--steps", "10", "--hold", "3s", "--rate", "20", "--size", "64"];
    args.extend(extra);
    loadgen(&format!("{fault:?}").replace([' ', '{', '}', ':', ','], ""), &args)
}

#[test]
fn server_closing_connections_is_closed_by_server() {
    let run = run_against(Fault::CloseAfter(5), &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    // Every connection is closed by the server within the first second.
    assert_eq!(errors(s, "closed_by_server"), 10, "{s}");
    assert_eq!(u(&s["open_connections"]), 0);
    assert_eq!(u(&s["derived"]["errors"]), 10);
}

#[test]
fn server_dropping_tcp_is_a_connection_error() {
    let run = run_against(Fault::DropAfter(5), &[]);
    let s = run.step(0);
    let dropped = errors(s, "connection_eof") + errors(s, "connection_reset");
    assert_eq!(dropped, 10, "{s}");
    assert_eq!(u(&s["open_connections"]), 0);
}

#[test]
fn a_changed_byte_is_an_echo_mismatch_not_a_sample() {
    let run = run_against(Fault::CorruptEveryFourth, &["--max-error-rate", "0.01"]);
    // The threshold turns the errors into a failed run.
    assert_eq!(run.code(), 3, "{}", run.stderr());
    assert!(run.stderr().contains("--max-error-rate"), "{}", run.stderr());
    let s = run.step(0);
    let mismatches = errors(s, "echo_mismatch");
    let received = u(&s["hold"]["received"]);
    assert!(mismatches > 100, "{s}");
    // One in four echoes is corrupted: three good per bad one.
    assert!(received.abs_diff(mismatches * 3) <= 40, "received {received}, mismatches {mismatches}");
    // Corrupted echoes are not latency samples.
    assert_eq!(u(&s["hold"]["latency"]["count"]), received);
    assert_eq!(errors(s, "echo_out_of_order") + errors(s, "echo_lost"), 0, "{s}");
}

#[test]
fn a_stalled_echo_shows_as_latency_of_every_message_behind_it() {
    // Message 30 of each connection (~1.5 s in) waits 400 ms; the messages
    // scheduled behind it during the stall wait too.
    let run = run_against(Fault::Stall { at: 30, millis: 400 }, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(u(&s["derived"]["errors"]), 0, "a stall shorter than the timeout is not an error: {s}");
    let lat = &s["hold"]["latency"];
    assert!(u(&lat["max_us"]) >= 390_000, "{lat}");
    // 20 msg/s: ~8 messages per connection fall due during the stall, all
    // delayed; with 10 connections that is > 1% of ~600 samples, so p99
    // shows the stall (a closed-loop generator would have hidden it).
    assert!(u(&lat["p99_us"]) >= 100_000, "{lat}");
    assert!(u(&lat["p50_us"]) < 50_000, "{lat}");
}

#[test]
fn an_echo_that_never_comes_is_an_echo_timeout() {
    let run = run_against(Fault::SwallowAfter(5), &["--timeout", "1s"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(errors(s, "echo_timeout"), 10, "{s}");
    assert_eq!(u(&s["open_connections"]), 0);
}

#[test]
fn a_server_that_stops_reading_is_a_write_stall_within_the_timeout() {
    let url = format!("ws://{}/", faulty_server(Fault::StopReadingAfter(1)));
    assert_write_stalls_are_errors("stop-reading", &url);
}

#[test]
fn a_server_that_never_reads_is_refused_before_the_run_not_waited_for() {
    // The pre-run check's one message (16 MiB, more than the socket buffers
    // hold) cannot be written: a refusal within the connect timeout.
    let url = format!("ws://{}/", faulty_server(Fault::NeverRead));
    let started = std::time::Instant::now();
    let run =
        loadgen("never-reads", &[&url, "--steps", "1", "--size", "16777216", "--connect-timeout", "2s"]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("did not take a 16777216-byte message within"), "{}", run.stderr());
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

/// An echo server that takes 200 ms over every WebSocket handshake and
/// counts how many were in progress at once (the most, since it started).
fn slow_handshake_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let most = Arc::new(AtomicU64::new(0));
    let seen = most.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let now = Arc::new(AtomicU64::new(0));
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (now, most) = (now.clone(), most.clone());
                tokio::spawn(async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let ws = tokio_tungstenite::accept_async(tcp).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    let Ok(mut ws) = ws else { return };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_binary() && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    (addr, seen)
}

#[test]
fn connect_concurrency_bounds_the_attempts_in_flight() {
    use std::sync::atomic::Ordering;
    // Without a limit, 12 connections at 1,000,000/s are 12 handshakes at once.
    let (addr, most) = slow_handshake_server();
    let url = format!("ws://{addr}/");
    let base = [url.as_str(), "--steps", "12", "--hold", "1s", "--rate", "0", "--connect-rate", "1000000"];
    let run = loadgen("no-connect-limit", &base);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(most.load(Ordering::SeqCst), 12);
    // With --connect-concurrency 3: never more than 3, so the 12 take at
    // least 4 rounds of 200 ms, and every one connects.
    let (addr, most) = slow_handshake_server();
    let url = format!("ws://{addr}/");
    let mut args = base.to_vec();
    args[0] = &url;
    args.extend(["--connect-concurrency", "3"]);
    let run = loadgen("connect-limit", &args);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(most.load(Ordering::SeqCst), 3);
    let s = run.step(0);
    assert_eq!(u(&s["open_connections"]), 12);
    assert!(s["ramp_secs"].as_f64().unwrap() >= 0.8, "{s}");
    assert_eq!(run.json()["settings"]["connect_concurrency"], 3);
}
