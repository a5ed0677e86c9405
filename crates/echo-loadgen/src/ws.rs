//! One WebSocket connection: connect, upgrade, send on schedule, verify echoes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::flow::Flow;
use crate::net;
use crate::stats::ErrorKind;
use crate::worker::Ctx;

/// Small buffers: a generator holding 19,000 mostly idle connections should
/// not spend 256 KiB on each (tungstenite's defaults).
fn config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0).max_message_size(Some(64 << 20))
}

/// Connects and upgrades within the connect timeout.
pub async fn open(
    url: &str,
    addr: std::net::SocketAddr,
    source: Option<IpAddr>,
    connect_timeout: Duration,
) -> Result<WebSocketStream<TcpStream>, ErrorKind> {
    let deadline = Instant::now() + connect_timeout;
    let tcp = net::connect(addr, source, connect_timeout).await?;
    match timeout_at(deadline, tokio_tungstenite::client_async_with_config(url, tcp, Some(config()))).await {
        Err(_) => Err(ErrorKind::HandshakeTimeout),
        Ok(Err(WsError::Http(response))) => Err(ErrorKind::HandshakeStatus(response.status().as_u16())),
        Ok(Err(_)) => Err(ErrorKind::HandshakeFailed),
        Ok(Ok((ws, _response))) => Ok(ws),
    }
}

/// Runs connection `id` until `stop` turns true or it fails.
pub async fn run(ctx: Arc<Ctx>, id: u32, source: Option<IpAddr>, mut stop: watch::Receiver<bool>) {
    let rec = &ctx.rec;
    rec.attempt(id);
    let started = Instant::now();
    let url = ctx.target.ws_url();
    let mut ws = match open(&url, ctx.target.addr, source, ctx.settings.connect_timeout()).await {
        Ok(ws) => ws,
        Err(kind) => return rec.error(id, kind),
    };
    rec.connected(id, started.elapsed().as_micros() as u64);
    let s = &ctx.settings;
    let mut flow = Flow::echo(id, s.size, s.rate, s.in_flight, s.timeout(), ctx.clock);
    if let Some(kind) = session(&mut ws, &mut flow, &ctx, &mut stop).await {
        rec.error(id, kind);
    }
    rec.closed();
}

async fn session(
    ws: &mut WebSocketStream<TcpStream>,
    flow: &mut Flow,
    ctx: &Ctx,
    stop: &mut watch::Receiver<bool>,
) -> Option<ErrorKind> {
    let rec = &ctx.rec;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let sleep = sleep_until(far);
    tokio::pin!(sleep);
    loop {
        if *stop.borrow() {
            return close(ws).await;
        }
        let now = Instant::now();
        if flow.timed_out(now) {
            return Some(ErrorKind::EchoTimeout);
        }
        let mut batch = Vec::new();
        let mut first_ns = None;
        while let Some((seq, ns)) = flow.next_due(now) {
            first_ns.get_or_insert(ns);
            batch.push(Message::Binary(Bytes::from(flow.payload(seq, ns))));
        }
        if !batch.is_empty() {
            let sent = batch.len() as u64;
            // A server that stops reading blocks the write once the socket
            // buffers are full: that must end as an error within the
            // timeout, and must not hold up the stop.
            let deadline = flow.write_deadline(first_ns, now);
            let write = async {
                for m in batch {
                    ws.feed(m).await?;
                }
                ws.flush().await
            };
            tokio::select! {
                biased;
                r = write => if let Err(e) = r {
                    return Some(classify(e));
                },
                _ = stop.changed() => return None,
                _ = sleep_until(deadline) => return Some(ErrorKind::WriteStall),
            }
            rec.sent(flow.id(), sent);
        }
        sleep.as_mut().reset(flow.next_wake(now).unwrap_or(far));
        tokio::select! {
            biased;
            _ = stop.changed() => return close(ws).await,
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    flow.on_payload(&data, Instant::now(), rec);
                }
                Some(Ok(Message::Text(_))) => rec.error(flow.id(), ErrorKind::UnexpectedMessage),
                Some(Ok(Message::Close(_))) => return Some(ErrorKind::ClosedByServer),
                Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                Some(Err(e)) => return Some(classify(e)),
                None => return Some(ErrorKind::ConnectionEof),
            },
            _ = &mut sleep => {}
        }
    }
}

/// Closes politely and waits briefly for the server's close frame (also
/// when the close frame itself cannot be written: a server that stopped
/// reading must not hold up the end of the run).
async fn close(ws: &mut WebSocketStream<TcpStream>) -> Option<ErrorKind> {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    None
}

fn classify(e: WsError) -> ErrorKind {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => ErrorKind::ClosedByServer,
        WsError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => ErrorKind::ConnectionEof,
        WsError::Io(_) => ErrorKind::ConnectionReset,
        WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => ErrorKind::ConnectionEof,
        _ => ErrorKind::ProtocolError,
    }
}
