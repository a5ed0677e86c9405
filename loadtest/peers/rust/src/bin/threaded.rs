//! WebSocket echo with one OS thread per connection: std::net and
//! tungstenite's blocking API, the design the README's founding claim
//! argues against. Each accepted socket gets a thread that does the
//! handshake, then reads and echoes until the client leaves.
//!
//! When a thread cannot be created (memory, the kernel's thread or map
//! limits) the connection is closed at once and a `thread_spawn_failed`
//! line goes to stderr: run.sh counts those lines.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use tungstenite::{Error, Message};

#[derive(Parser)]
#[command(about = "WebSocket echo server, one OS thread per connection")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Read and write buffer of each connection (echo-server's default).
    #[arg(long, value_parser = echo_peers::parse_size, default_value = echo_peers::ECHO_SERVER_BUFFER)]
    buffer_size: usize,
    /// Stack size of each connection's thread (e.g. 64k); without it,
    /// Rust's default for spawned threads (2 MiB, or RUST_MIN_STACK).
    #[arg(long, value_parser = echo_peers::parse_size)]
    stack_size: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)?;
    println!("listening on {}", listener.local_addr()?);
    let failed = AtomicU64::new(0);
    let live = Arc::new(AtomicU64::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, mostly: the client's connect waits in
                // the backlog meanwhile. A pause keeps this from spinning.
                eprintln!("accept_failed error=\"{e}\"");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut builder = std::thread::Builder::new();
        if let Some(size) = args.stack_size {
            builder = builder.stack_size(size);
        }
        let counter = Arc::clone(&live);
        // The stream moves into the closure; if the spawn fails the closure
        // (and with it the stream) is dropped, which closes the connection.
        counter.fetch_add(1, Ordering::Relaxed);
        let buffer = args.buffer_size;
        let spawned = builder.spawn(move || {
            serve(stream, buffer);
            counter.fetch_sub(1, Ordering::Relaxed);
        });
        if let Err(e) = spawned {
            live.fetch_sub(1, Ordering::Relaxed);
            let n = failed.fetch_add(1, Ordering::Relaxed) + 1;
            eprintln!(
                "thread_spawn_failed error=\"{e}\" failed={n} live_threads={}",
                live.load(Ordering::Relaxed)
            );
        }
    }
}

/// One connection, from handshake to close, on its own thread.
fn serve(stream: TcpStream, buffer: usize) {
    // Echoes are small and latency is what is measured: no Nagle delay.
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tungstenite::accept_with_config(stream, Some(echo_peers::codec(buffer))) else { return };
    loop {
        match ws.read() {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(msg).is_err() {
                    return;
                }
            }
            // tungstenite queues the pong (and the answer to a close)
            // itself; flushing sends it now rather than with the next echo.
            Ok(Message::Ping(_) | Message::Close(_)) => {
                if ws.flush().is_err() {
                    return;
                }
            }
            Ok(Message::Pong(_) | Message::Frame(_)) => {}
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => return,
            Err(_) => return,
        }
    }
}
