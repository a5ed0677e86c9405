//! Each peer binary, started as run.sh starts it, echoes like echo-server:
//! text and binary back, pings answered, a close answered.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tungstenite::{Message, protocol::CloseFrame, protocol::frame::coding::CloseCode};

/// Kills the server when the test ends, passed or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(exe: &str, args: &[&str]) -> (Server, String) {
    let mut child = Command::new(exe)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the peer starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("the address is printed").to_string();
    (Server(child), addr)
}

fn check_echo(addr: &str) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).unwrap();
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    ws.send(Message::Ping(b"p".to_vec().into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong(b"p".to_vec().into()));
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).unwrap();
    match ws.read().unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected the close to be answered, got {other:?}"),
    }
}

#[test]
fn threaded_echo_with_default_stack() {
    let (_server, addr) = start(env!("CARGO_BIN_EXE_threaded-echo"), &[]);
    check_echo(&addr);
    // A second client at the same time gets a thread of its own.
    let other = std::thread::spawn({
        let addr = addr.clone();
        move || check_echo(&addr)
    });
    check_echo(&addr);
    other.join().unwrap();
}

#[test]
fn threaded_echo_with_small_stack() {
    let (_server, addr) = start(env!("CARGO_BIN_EXE_threaded-echo"), &["--stack-size", "64k"]);
    check_echo(&addr);
}

#[test]
fn tokio_multi_thread_echo() {
    let (_server, addr) = start(env!("CARGO_BIN_EXE_tokio-mt-echo"), &["--workers", "2"]);
    check_echo(&addr);
}

#[test]
fn a_thread_that_cannot_be_created_closes_its_connection_and_is_logged() {
    // A stack far larger than memory: the kernel refuses to map it, so
    // every spawn fails the way it does when threads run out for real.
    let mut child = Command::new(env!("CARGO_BIN_EXE_threaded-echo"))
        .args(["--listen", "127.0.0.1:0", "--stack-size", "1000000m"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap().to_string();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut server = Server(child);
    for n in 1..=2 {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Closed without a byte: a read sees the end (or a reset).
        let mut buf = [0u8; 16];
        let got = std::io::Read::read(&mut stream, &mut buf);
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
        let mut log = String::new();
        stderr.read_line(&mut log).unwrap();
        assert!(log.starts_with("thread_spawn_failed "), "{log}");
        assert!(log.contains(&format!("failed={n} ")), "{log}");
    }
    // The server itself lives on.
    assert!(server.0.try_wait().unwrap().is_none());
}
