//! TLS on the MQTT port: a self-signed certificate made with `openssl`
//! (skips loudly when it is missing, unless `REQUIRE_TEST_TOOLS=1`),
//! a rustls client trusting it, and a CONNECT / SUBSCRIBE / PUBLISH round
//! trip. Plain MQTT on the same port is refused (no TLS hello).

mod common;

use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt};
use common::tls::{self, self_signed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn read_packet(stream: &mut (impl AsyncReadExt + Unpin)) -> (u8, Vec<u8>) {
    let first = stream.read_u8().await.unwrap();
    let len = stream.read_u8().await.unwrap() as usize; // small packets only
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.unwrap();
    (first, body)
}

#[tokio::test]
async fn mqtt_over_tls_round_trips_and_plain_mqtt_is_refused() {
    let dir = std::env::temp_dir().join(format!("echo-mqtt-tls-{}", std::process::id()));
    let Some((cert, key)) = self_signed(&dir) else { return };
    let server =
        TestServer::start_with_env(&[], &[("ECHO_MQTT_TLS_CERT", &cert), ("ECHO_MQTT_TLS_KEY", &key)]);
    let listening = server.wait_for_log(Duration::from_secs(5), |v| v["protocol"] == "mqtt");
    assert_eq!(listening["tls"], true);

    let mut tls = tls::connect(server.mqtt_addr(), &cert).await;
    tls.write_all(&mqtt_raw::connect(5, "over-tls", 30)).await.unwrap();
    let (first, body) = read_packet(&mut tls).await;
    assert_eq!((first >> 4, body[1]), (2, 0), "CONNACK success");
    tls.write_all(&mqtt_raw::subscribe(5, 1, "secure/echo")).await.unwrap();
    assert_eq!(read_packet(&mut tls).await.0 >> 4, 9, "SUBACK");
    tls.write_all(&mqtt_raw::publish(5, "secure/echo", b"encrypted hello")).await.unwrap();
    let (first, body) = read_packet(&mut tls).await;
    assert_eq!(first >> 4, 3);
    assert!(body.ends_with(b"encrypted hello"));

    // A client speaking plain MQTT to the TLS port gets nowhere, and the
    // TLS client carries on.
    let mut plain = RawMqtt::connect(server.mqtt_addr());
    plain.try_send(&mqtt_raw::connect(4, "plain", 30));
    assert!(plain.closed_within(Duration::from_secs(5)));
    tls.write_all(&mqtt_raw::publish(5, "secure/echo", b"still here")).await.unwrap();
    assert!(read_packet(&mut tls).await.1.ends_with(b"still here"));
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"tls\"}"), 1.0);
}

#[test]
fn unusable_tls_files_stop_the_start_naming_the_key() {
    tls::unusable_files_stop_the_start("mqtt");
}
