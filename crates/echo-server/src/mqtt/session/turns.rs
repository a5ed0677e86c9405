//! The pacing of connects and closes: a few turns that the sessions'
//! CONNECT phases and closings take one at a time (see [`ConnectTurns`]).

use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::{Instant, timeout_at};

use super::connect::Refused;
use crate::mqtt::transport::Transport;
use crate::shutdown::Shutdown;

/// How long a session may hold a turn while its CONNECT has not arrived,
/// or while it closes.
const TURN_PATIENCE: Duration = Duration::from_millis(50);

/// The turns (`mqtt.connect_concurrency`) on which sessions do their
/// CONNECT phase — reading and checking the CONNECT, router registration,
/// CONNACK — and their closing.
///
/// In a connect storm thousands of sessions are ready at once; if all of
/// them did that work at once, every WebSocket echo and MQTT message of the
/// clients already connected would queue behind them on the one event
/// loop. With a few turns, the storm's work is spread out and everyone else
/// is served in between (a session waiting for a turn costs one poll). A
/// session takes a turn only once its client has sent its first bytes, and
/// a client that has not sent its whole CONNECT within [`TURN_PATIENCE`]
/// gives its turn back and waits for a new one once its CONNECT is in, so
/// slow or silent clients cannot hold the turns ([`connect`](Self::connect)).
///
/// Closing runs on the same turns ([`close`](Self::close)): when thousands
/// of clients leave at once (a network blip, a load test's end), their
/// sessions all wake together, and the closes — a FIN, the will, telling
/// the router — would otherwise run back to back while every other client
/// waited: measured, 5,000 MQTT clients disconnecting together held the
/// event loop for 60–100 ms in one go (WebSocket echo p99 70 ms); on turns,
/// the work is the same but the others are served in between (p99 2–3 ms).
/// A closing turn is held across one yield, or every session would take a
/// free turn, close and give it back within one poll, and the turns would
/// pace nothing; and for at most [`TURN_PATIENCE`], so that clients that are
/// slow to close (a polite close waits for the client's FIN) cannot hold
/// the turns.
#[derive(Debug)]
pub(crate) struct ConnectTurns {
    free: Semaphore,
}

/// How a CONNECT fared on its turns.
pub(super) enum Paced<'t, T> {
    /// Read and checked, with a turn held for the rest of the CONNECT
    /// phase (router registration, CONNACK).
    Checked(T, SemaphorePermit<'t>),
    /// It will not become a session: answer it and close.
    Refused(Refused),
    /// Checked, but the server began shutting down while it waited for a
    /// turn again: nothing to answer.
    ShutDown,
}

impl ConnectTurns {
    pub(crate) fn new(turns: usize) -> ConnectTurns {
        ConnectTurns { free: Semaphore::new(turns) }
    }

    /// Reads and checks a CONNECT (`check`) on a turn, by `deadline`: the
    /// turn is taken once the client's first bytes are in, given back if
    /// `check` has not finished within [`TURN_PATIENCE`], and taken anew
    /// once it has, so that what follows runs on a turn too.
    pub(super) async fn connect<T>(
        &self,
        transport: &mut Transport,
        deadline: Instant,
        shutdown: &Shutdown,
        check: impl AsyncFnOnce(&mut Transport) -> Result<T, Refused>,
    ) -> Paced<'_, T> {
        let arrived = tokio::select! {
            biased;
            _ = shutdown.wait() => Err(Refused::Silently("shutdown")),
            arrived = timeout_at(deadline, transport.readable()) => {
                arrived.map_err(|_| Refused::Silently("connect_timeout"))
            }
        };
        if let Err(refused) = arrived {
            return Paced::Refused(refused);
        }
        let mut turn = self.take(shutdown).await;
        if turn.is_none() {
            return Paced::Refused(Refused::Silently("shutdown"));
        }
        let checked = {
            let check = check(transport);
            tokio::pin!(check);
            let patience = deadline.min(Instant::now() + TURN_PATIENCE);
            let first = tokio::select! {
                biased;
                _ = shutdown.wait() => Some(Err(Refused::Silently("shutdown"))),
                result = timeout_at(patience, &mut check) => result.ok(),
            };
            match first {
                Some(result) => result,
                None => {
                    turn = None;
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => Err(Refused::Silently("shutdown")),
                        result = timeout_at(deadline, &mut check) => {
                            result.unwrap_or(Err(Refused::Silently("connect_timeout")))
                        }
                    }
                }
            }
        };
        let checked = match checked {
            Ok(checked) => checked,
            Err(refused) => return Paced::Refused(refused),
        };
        let turn = match turn {
            Some(turn) => Some(turn),
            None => self.take(shutdown).await,
        };
        match turn {
            Some(turn) => Paced::Checked(checked, turn),
            None => Paced::ShutDown,
        }
    }

    /// Runs a session's closing on a turn, held across one yield and for
    /// at most [`TURN_PATIENCE`]; the rest of a slow closing runs without.
    pub(super) async fn close(&self, closing: impl Future<Output = ()>) {
        let mut turn = self.free.acquire().await.ok();
        tokio::task::yield_now().await;
        let mut closing = std::pin::pin!(closing);
        tokio::select! {
            biased;
            _ = &mut closing => {}
            _ = tokio::time::sleep(TURN_PATIENCE) => {
                turn = None;
                closing.await;
            }
        }
        drop(turn);
    }

    /// Waits for a free turn; none once the server is shutting down.
    async fn take(&self, shutdown: &Shutdown) -> Option<SemaphorePermit<'_>> {
        tokio::select! {
            biased;
            _ = shutdown.wait() => None,
            turn = self.free.acquire() => turn.ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures_util::FutureExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use super::*;

    /// The server's side of a connection whose client has sent the first
    /// byte of a CONNECT and nothing more; and the client, kept open.
    async fn first_byte_in() -> (Transport, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        client.write_all(&[0x10]).await.unwrap();
        let transport = Transport::Tcp(accepted);
        // Seen before any timer exists, so that the paused clock cannot
        // move on while the byte is on its way.
        transport.readable().await;
        (transport, client)
    }

    /// One turn, no shutdown, and a CONNECT deadline far beyond the
    /// patience.
    fn one_turn() -> (ConnectTurns, Shutdown, Instant) {
        (ConnectTurns::new(1), Shutdown::new(), Instant::now() + Duration::from_secs(10))
    }

    /// Lets `first` take the only turn, then waits until `next` is checked
    /// on it while `first` still waits: `first` must give its turn back
    /// within a second of the paused clock.
    async fn handed_on<'t, T>(
        turns: &'t ConnectTurns,
        mut first: Pin<&mut impl Future>,
        next: Pin<&mut impl Future<Output = Paced<'t, T>>>,
    ) -> (T, SemaphorePermit<'t>) {
        assert!(first.as_mut().now_or_never().is_none());
        assert_eq!(turns.free.available_permits(), 0, "the first holds the only turn");
        tokio::select! {
            biased;
            _ = first => panic!("the first ended before the next got its turn"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => panic!("the first kept its turn"),
            paced = next => match paced {
                Paced::Checked(checked, turn) => (checked, turn),
                _ => panic!("the next was not checked"),
            },
        }
    }

    /// With one turn: a CONNECT that does not arrive gives its turn back
    /// after the patience (the paused clock moves on while everything
    /// waits), so the next CONNECT is checked first; once the slow one
    /// arrives, it waits for a turn again before it goes on.
    #[tokio::test(start_paused = true)]
    async fn a_connect_that_does_not_arrive_gives_its_turn_to_the_next() {
        let (turns, shutdown, deadline) = one_turn();
        let (mut slow_io, _slow_client) = first_byte_in().await;
        let (mut quick_io, _quick_client) = first_byte_in().await;
        let (arrive, arrived) = oneshot::channel::<()>();
        let slow = turns.connect(&mut slow_io, deadline, &shutdown, async |_: &mut Transport| {
            arrived.await.unwrap();
            Ok("slow")
        });
        let quick = turns.connect(&mut quick_io, deadline, &shutdown, async |_: &mut Transport| Ok("quick"));
        tokio::pin!(slow, quick);
        let ("quick", quick_turn) = handed_on(&turns, slow.as_mut(), quick).await else {
            panic!("not the quick CONNECT")
        };
        arrive.send(()).unwrap();
        assert!(slow.as_mut().now_or_never().is_none(), "checked, it waits for a turn");
        drop(quick_turn);
        assert!(matches!(slow.await, Paced::Checked("slow", _)));
        assert_eq!(turns.free.available_permits(), 1);
    }

    /// With one turn: a closing that takes long gives its turn back after
    /// the patience, and finishes without it.
    #[tokio::test(start_paused = true)]
    async fn a_slow_closing_gives_its_turn_to_the_next() {
        let (turns, shutdown, deadline) = one_turn();
        let (mut io, _client) = first_byte_in().await;
        let (close, closed) = oneshot::channel::<()>();
        let closing = turns.close(async { closed.await.unwrap() });
        let next = turns.connect(&mut io, deadline, &shutdown, async |_: &mut Transport| Ok(()));
        tokio::pin!(closing, next);
        let ((), turn) = handed_on(&turns, closing.as_mut(), next).await;
        close.send(()).unwrap();
        closing.await;
        drop(turn);
        assert_eq!(turns.free.available_permits(), 1);
    }
}
