//! The admin listener: `/healthz`, `/readyz` and `/metrics`.
//!
//! It is a separate port so it can be firewalled apart from client traffic.
//! It runs on the same event loop as everything else (a scrape is a few
//! microseconds of work) and keeps answering during a graceful shutdown, so
//! an orchestrator can watch `/readyz` turn to 503 while clients drain.

use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Admin connections served at once; more are closed at once, so that
/// scrapers cannot eat the file descriptors kept for clients.
const MAX_ADMIN_CONNECTIONS: u32 = 16;

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub shutdown: Rc<Shutdown>,
    open: Cell<u32>,
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, shutdown: Rc<Shutdown>) -> Rc<Self> {
        Rc::new(AdminState { metrics, shutdown, open: Cell::new(0) })
    }
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
        if state.open.get() >= MAX_ADMIN_CONNECTIONS {
            continue; // dropped: closes the socket
        }
        state.open.set(state.open.get() + 1);
        let state = state.clone();
        tokio::task::spawn_local(async move {
            let handler_state = state.clone();
            let service = service_fn(move |request| {
                let response = route(&handler_state, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let result = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = result {
                debug!(%peer, error = %err, "admin connection ended with an error");
            }
            state.open.set(state.open.get() - 1);
        });
    }
}

fn route(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.shutdown.is_triggered() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(Full::new(Bytes::from(state.metrics.encode())))
            .expect("static headers are valid"),
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static headers are valid")
}
