//! The admin listener: `/healthz`, `/readyz` and `/metrics`.
//!
//! It is a separate port so it can be firewalled apart from client traffic.
//! It runs on the same event loop as everything else (a scrape is a few
//! microseconds of work) and keeps answering during a graceful shutdown, so
//! an orchestrator can watch `/readyz` turn to 503 while clients drain.
//!
//! At most [`MAX_ADMIN_CONNECTIONS`] are open at once, so that scrapers
//! cannot eat the file descriptors kept for clients. A cap alone lets a few
//! sockets that never send a request lock the health check out (20 idle
//! sockets reopened every 9 s failed every probe), so when the cap is
//! reached a new connection is not refused: it takes the place of the
//! connection that has waited longest for a request — one that has sent
//! nothing since it connected, or is idle between keep-alive requests. A
//! probe sends its request as it connects and is answered within one turn
//! of the event loop, so however many idle sockets are held or opened, it
//! is served. Connections in the middle of a response are spared unless
//! their peer has not read it for [`STUCK_RESPONSE`]; only when every
//! connection is writing a fresh response is the newcomer closed. Each
//! connection also has [`HEADER_READ_TIMEOUT`] to send each request head.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use crate::metrics::{Count, Metrics};
use crate::shutdown::Shutdown;

/// Admin connections open at once: enough for a few scrapers and probes,
/// few enough that they cannot eat the descriptors kept for clients
/// ([`crate::limits::RESERVED_FDS`]).
const MAX_ADMIN_CONNECTIONS: usize = 16;

/// How long a connection may take to send a request head, counted from
/// when the server starts waiting for it (on accept, and after each
/// response on a keep-alive connection). Probes and scrapers send theirs at
/// once; the time only bounds how long a silent socket keeps its slot when
/// nobody needs it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A response still being written after this long goes to a peer that is
/// not reading it; its connection may then be evicted like an idle one.
const STUCK_RESPONSE: Duration = Duration::from_secs(2);

/// An answer to an admin request, once it is ready.
pub type Answer = Pin<Box<dyn Future<Output = Response<Full<Bytes>>>>>;

/// What answers the admin port's requests: this process's own figures
/// ([`Local`]), or a supervisor's, gathered from its workers
/// (`crate::supervisor`).
pub trait Answers {
    /// The response to a GET (or HEAD) of `path`.
    fn answer(&self, path: &str) -> Answer;
}

/// The admin answers of a server process: its own metrics and shutdown.
#[derive(Debug)]
pub struct Local {
    pub metrics: Arc<Metrics>,
    pub shutdown: Rc<Shutdown>,
}

impl Answers for Local {
    fn answer(&self, path: &str) -> Answer {
        Box::pin(std::future::ready(route(self, path)))
    }
}

/// What the admin handlers read.
pub struct AdminState {
    answers: Rc<dyn Answers>,
    refused: Count,
    evictions: Count,
    open: RefCell<Vec<Rc<AdminConn>>>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").field("open", &self.open.borrow().len()).finish_non_exhaustive()
    }
}

/// One open admin connection, as eviction sees it.
#[derive(Debug)]
struct AdminConn {
    /// Whether a response is being written (from the request head's arrival
    /// until hyper has taken the whole body).
    responding: Cell<bool>,
    /// When the current state began: waiting for a request, or responding.
    since: Cell<Instant>,
    /// Wakes the connection's task to close it.
    evicted: Notify,
}

impl AdminConn {
    fn set_responding(&self, responding: bool) {
        self.responding.set(responding);
        self.since.set(Instant::now());
    }
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, shutdown: Rc<Shutdown>) -> Rc<Self> {
        let (refused, evictions) = (metrics.admin_refused.clone(), metrics.admin_evictions.clone());
        Self::with_answers(Rc::new(Local { metrics, shutdown }), refused, evictions)
    }

    /// An admin port answered by `answers`; `refused` and `evictions`
    /// count the connections turned away and evicted.
    pub fn with_answers(answers: Rc<dyn Answers>, refused: Count, evictions: Count) -> Rc<Self> {
        Rc::new(AdminState { answers, refused, evictions, open: RefCell::new(Vec::new()) })
    }

    /// Registers a new connection, evicting one if the cap is reached;
    /// `None` when every open connection is writing a fresh response.
    fn admit(&self) -> Option<Rc<AdminConn>> {
        let mut open = self.open.borrow_mut();
        if open.len() >= MAX_ADMIN_CONNECTIONS {
            let Some(index) = eviction_victim(&open, Instant::now()) else {
                self.refused.inc();
                return None;
            };
            let victim = open.swap_remove(index);
            // notify_one keeps the wake-up if the task is not waiting yet.
            victim.evicted.notify_one();
            self.evictions.inc();
        }
        let conn = Rc::new(AdminConn {
            responding: Cell::new(false),
            since: Cell::new(Instant::now()),
            evicted: Notify::new(),
        });
        open.push(conn.clone());
        Some(conn)
    }

    fn remove(&self, conn: &Rc<AdminConn>) {
        self.open.borrow_mut().retain(|c| !Rc::ptr_eq(c, conn));
    }
}

/// The connection to close for a newcomer: the one waiting longest for a
/// request, else the one whose response has been stuck longest.
fn eviction_victim(open: &[Rc<AdminConn>], now: Instant) -> Option<usize> {
    open.iter()
        .enumerate()
        .filter(|(_, c)| !c.responding.get() || now.duration_since(c.since.get()) >= STUCK_RESPONSE)
        .min_by_key(|(_, c)| (c.responding.get(), c.since.get()))
        .map(|(index, _)| index)
}

/// Serves admin requests until the runtime stops.
pub async fn serve(listener: TcpListener, state: Rc<AdminState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                debug!(error = %err, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(conn) = state.admit() else {
            debug!(%peer, "admin connection refused: every slot is writing a response");
            continue; // dropped: closes the socket
        };
        tokio::task::spawn_local(serve_connection(stream, peer, conn, state.clone()));
        // Let the new connection read its request before the next accept:
        // a burst of connections queued behind it could otherwise evict it
        // before its first turn, though its request is already there.
        tokio::task::yield_now().await;
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    conn: Rc<AdminConn>,
    state: Rc<AdminState>,
) {
    let (handler_state, handler_conn) = (state.clone(), conn.clone());
    let service = service_fn(move |request: Request<Incoming>| {
        handler_conn.set_responding(true);
        let answer: Answer = if request.method() != Method::GET && request.method() != Method::HEAD {
            Box::pin(std::future::ready(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")))
        } else {
            handler_state.answers.answer(request.uri().path())
        };
        let conn = handler_conn.clone();
        async move { Ok::<_, Infallible>(answer.await.map(|body| Tracked { body, conn })) }
    });
    let serving = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        biased;
        _ = conn.evicted.notified() => debug!(%peer, "admin connection evicted to make room"),
        result = serving => {
            if let Err(err) = result {
                debug!(%peer, error = %err, "admin connection ended with an error");
            }
        }
    }
    state.remove(&conn);
}

/// A response body that marks its connection as waiting for a request
/// again once hyper has taken all of it (and dropped it).
struct Tracked {
    body: Full<Bytes>,
    conn: Rc<AdminConn>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.conn.set_responding(false);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn route(state: &Local, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.shutdown.is_triggered() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        "/readyz" if state.metrics.cluster.outage() => {
            // Clients are still served, locally; a publish no longer
            // reaches the other workers and nodes.
            text(StatusCode::SERVICE_UNAVAILABLE, "cluster: NATS unreachable (cluster.nats_url)\n")
        }
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => metrics(state.metrics.encode()),
        _ => text(StatusCode::NOT_FOUND, NOT_FOUND),
    }
}

/// The answer to a path the admin port does not serve.
pub(crate) const NOT_FOUND: &str = "not found: try /healthz, /readyz or /metrics\n";

/// A `/metrics` answer: `exposition` in the OpenMetrics text format.
pub(crate) fn metrics(exposition: String) -> Response<Full<Bytes>> {
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(Full::new(Bytes::from(exposition)))
        .expect("static headers are valid")
}

/// A plain-text answer.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(responding: bool, since: Instant) -> Rc<AdminConn> {
        Rc::new(AdminConn {
            responding: Cell::new(responding),
            since: Cell::new(since),
            evicted: Notify::new(),
        })
    }

    #[test]
    fn the_connection_waiting_longest_for_a_request_is_evicted_first() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A response stuck for 5 s, an old idle socket, a newer one, a fresh response.
        let open = [conn(true, at(0)), conn(false, at(100)), conn(false, at(3_000)), conn(true, at(4_900))];
        assert_eq!(eviction_victim(&open, at(5_000)), Some(1), "the oldest waiting, before a stuck response");
        assert_eq!(eviction_victim(&open[2..], at(5_000)), Some(0));
        assert_eq!(
            eviction_victim(&[conn(true, at(0)), conn(true, at(4_900))], at(5_000)),
            Some(0),
            "stuck 5 s"
        );
        assert_eq!(
            eviction_victim(&[conn(true, at(4_000)), conn(true, at(4_900))], at(5_000)),
            None,
            "all fresh"
        );
    }
}
