//! The closing phase: the will, MQTT 5's DISCONNECT with its reason, a
//! polite close, and telling the router, on a turn
//! ([`ConnectTurns::close`](super::ConnectTurns::close)).

use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{Disconnect, Packet};
use tokio::time::Instant;

use super::exchange::End;
use super::{Accepted, MqttServer, RouterLink, send};
use crate::mqtt::codec::Version;
use crate::mqtt::transport::{Goodbye, Transport};

/// Closes the session on a turn: [`finish`], then the router is told the
/// client is gone and the socket closed.
pub(super) async fn close(
    mut transport: Transport,
    session: &Accepted,
    mut router: RouterLink,
    end: End,
    server: &MqttServer,
) {
    let closing = async move {
        finish(&mut transport, session, end, server).await;
        if session.expiry_changed {
            router.leave(session.session_expiry);
        }
        drop(router);
        drop(transport);
    };
    server.connecting.close(closing).await;
}

/// The will, MQTT 5's DISCONNECT with its reason, and a polite close, all
/// within the shutdown grace when shutting down.
async fn finish(transport: &mut Transport, session: &Accepted, end: End, server: &MqttServer) {
    if end.will {
        publish_will(server, session);
    }
    let grace = server.shutdown.deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
    if let Some(code) = end.disconnect
        && session.codec.version == Version::V5
    {
        let bye = Packet::Disconnect(Disconnect { reason_code: code }, None);
        let mut out = BytesMut::new();
        let _ = tokio::time::timeout_at(grace, send(transport, &session.codec, vec![bye], &mut out, server))
            .await;
    }
    if end.polite_close {
        let _ = tokio::time::timeout_at(grace, async {
            transport.close(Goodbye::after_session(end.disconnect, server.shutdown.is_triggered())).await;
            transport.drain().await;
        })
        .await;
    }
}

/// Publishes the session's will, if it has one.
pub(super) fn publish_will(server: &MqttServer, accepted: &Accepted) {
    if let Some(will) = accepted.will.clone() {
        let (will, properties) = *will;
        server.broker.publish_will(&accepted.client_id, will, properties, accepted.will_delay);
    }
}
