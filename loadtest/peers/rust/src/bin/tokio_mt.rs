//! WebSocket echo on tokio's multi-threaded, work-stealing runtime with
//! tokio-tungstenite: a task per connection, spread over one worker thread
//! per CPU the process may run on (its affinity mask, so `taskset -c 1`
//! gives one worker unless --workers says otherwise).

use std::net::SocketAddr;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(about = "WebSocket echo server on tokio's multi-threaded runtime")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Read and write buffer of each connection (echo-server's default).
    #[arg(long, value_parser = echo_peers::parse_size, default_value = echo_peers::ECHO_SERVER_BUFFER)]
    buffer_size: usize,
    /// Worker threads; default one per CPU the process may use.
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.workers {
        rt.worker_threads(n);
    }
    rt.build()?.block_on(serve(args.listen, args.buffer_size))
}

async fn serve(addr: SocketAddr, buffer: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, buffer));
            }
            Err(e) => {
                // Out of descriptors, mostly; pause rather than spin.
                eprintln!("accept_failed error=\"{e}\"");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, buffer: usize) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) =
        tokio_tungstenite::accept_async_with_config(stream, Some(echo_peers::codec(buffer))).await
    else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            // The pong and the close answer are queued by tungstenite;
            // flushing sends them now.
            Message::Ping(_) | Message::Close(_) => {
                if ws.flush().await.is_err() {
                    return;
                }
            }
            Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}
