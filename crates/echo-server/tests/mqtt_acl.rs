//! Access control end to end, with the real binary: users from a password
//! file (hashed), an ACL file in Mosquitto's format, the codes each MQTT
//! version gets for a refusal, the will, `echo-server passwd`, and a bad
//! file stopping the start.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mqtt_raw::{self, RawMqtt, RawPacket};
use common::{BIN, TestServer, run_to_exit, tool_available};
use echo_mqtt_wire::Connect;

const ACL: &str = "\
# Clients without a username.
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic read bob/out/#

user bob
topic readwrite bob/#
topic write alice/inbox

# Every client: its own corner, by client id.
pattern readwrite clients/%c/#
";

/// A directory of its own for one test's files, removed afterwards.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("echo-acl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Adds a user to a password file with `echo-server passwd`.
fn add_user(file: &str, user: &str, password: &str) {
    let (status, _, stderr) = run_to_exit(&["passwd", file, user, "--password", password], &[]);
    assert!(status.success(), "echo-server passwd: {stderr}");
}

/// A server with the ACL above and alice and bob in a password file.
fn server_with_users(dir: &Dir) -> TestServer {
    let passwords = dir.path("passwd");
    add_user(&passwords, "alice", "alice-pw");
    add_user(&passwords, "bob", "bob-pw");
    let acl = dir.file("acl", ACL);
    TestServer::start_with_env(&[], &[("ECHO_MQTT_PASSWORD_FILE", &passwords), ("ECHO_MQTT_ACL_FILE", &acl)])
}

fn login(server: &TestServer, level: u8, client_id: &str, user: &str, password: &str) -> RawMqtt {
    let mut c = RawMqtt::connect(server.mqtt_addr());
    c.send(&mqtt_raw::connect_with(level, client_id, 30, Some((user, password))));
    let ack = c.read_packet().expect("a CONNACK");
    assert_eq!(ack.connack_code(), 0, "{user} on level {level}");
    c
}

/// The topic and payload of a QoS 0 PUBLISH.
fn topic_payload(level: u8, packet: &RawPacket) -> (String, Vec<u8>) {
    assert_eq!(packet.packet_type(), 3, "not a PUBLISH: {packet:?}");
    let len = usize::from(u16::from_be_bytes([packet.body[0], packet.body[1]]));
    let topic = String::from_utf8(packet.body[2..2 + len].to_vec()).unwrap();
    let mut at = 2 + len;
    if level == 5 {
        at += 1 + usize::from(packet.body[at]);
    }
    (topic, packet.body[at..].to_vec())
}

fn denied(server: &TestServer, action: &str) -> f64 {
    server.metric(&format!("echo_mqtt_acl_denied_total{{action=\"{action}\"}}"))
}

/// Two users of a password file, each with their own section: what each
/// may publish and subscribe to, with the codes of each MQTT version, and
/// nothing refused reaches a subscriber.
#[test]
fn two_users_publish_and_subscribe_where_the_acl_allows() {
    let dir = Dir::new("users");
    let server = server_with_users(&dir);
    let mut expected_denied = (0.0, 0.0);
    for level in [4u8, 5] {
        let refused = if level == 5 { 0x87 } else { 0x80 };
        let mut alice = login(&server, level, &format!("alice-{level}"), "alice", "alice-pw");
        let mut bob = login(&server, level, &format!("bob-{level}"), "bob", "bob-pw");
        alice.send(&mqtt_raw::subscribe_all(
            level,
            1,
            &["alice/inbox", "bob/#", "alice/secret/x", "bob/out/#", "alice/#", "alice/other"],
        ));
        let suback = alice.read_packet().unwrap();
        // bob/# is not covered by alice's `read bob/out/#`; alice/# could
        // bring alice/secret/... (see docs/mqtt.md: a filter overlapping a
        // deny rule is refused).
        assert_eq!(suback.suback_codes(level), vec![0, refused, refused, 0, refused, 0], "level {level}");
        expected_denied.1 += 3.0;

        // bob may write alice/inbox, not alice/other: QoS 0, 1 and 2.
        bob.send(&mqtt_raw::publish_qos(level, "alice/other", 0, 0, b"dropped"));
        bob.send(&mqtt_raw::publish_qos(level, "alice/other", 1, 11, b"refused 1"));
        let puback = bob.read_packet().unwrap();
        assert_eq!((puback.packet_type(), puback.pkid()), (4, 11));
        if level == 5 {
            assert_eq!(puback.body[2], 0x87, "MQTT 5: PUBACK 0x87 not authorized");
        } else {
            assert_eq!(puback.body.len(), 2, "3.1.1: acknowledged, no code");
        }
        bob.send(&mqtt_raw::publish_qos(level, "alice/other", 2, 12, b"refused 2"));
        let pubrec = bob.read_packet().unwrap();
        assert_eq!((pubrec.packet_type(), pubrec.pkid()), (5, 12));
        if level == 5 {
            assert_eq!(pubrec.body[2], 0x87, "MQTT 5: PUBREC 0x87, which ends the exchange");
        } else {
            // 3.1.1: the exchange goes on as for a delivered message.
            bob.send(&mqtt_raw::ack(0x62, 12));
            let pubcomp = bob.read_packet().unwrap();
            assert_eq!((pubcomp.packet_type(), pubcomp.pkid()), (7, 12));
        }
        expected_denied.0 += 3.0;
        bob.send(&mqtt_raw::publish_qos(level, "alice/inbox", 1, 13, b"hello alice"));
        let puback = bob.read_packet().unwrap();
        assert_eq!((puback.packet_type(), puback.pkid()), (4, 13));
        assert!(puback.body.len() == 2 || puback.body[2] == 0, "allowed: {puback:?}");
        // bob's own topics, read by alice through bob/out/#.
        bob.send(&mqtt_raw::publish_qos(level, "bob/out/news", 0, 0, b"news"));
        // alice gets exactly the allowed two, in order: nothing on
        // alice/other, which she did subscribe to.
        let first = topic_payload(level, &alice.read_packet().unwrap());
        assert_eq!(first, ("alice/inbox".to_owned(), b"hello alice".to_vec()));
        let second = topic_payload(level, &alice.read_packet().unwrap());
        assert_eq!(second, ("bob/out/news".to_owned(), b"news".to_vec()));
        assert_eq!(alice.drain(Duration::from_millis(300)), 0, "nothing refused was delivered");

        // alice may not write what she may only read; she may write her own.
        alice.send(&mqtt_raw::publish_qos(level, "bob/out/news", 1, 21, b"no"));
        let puback = alice.read_packet().unwrap();
        assert_eq!(puback.pkid(), 21);
        assert_eq!(puback.body.get(2).copied().unwrap_or(0), if level == 5 { 0x87 } else { 0 });
        alice.send(&mqtt_raw::publish_qos(level, "alice/secret/plans", 1, 22, b"no"));
        let puback = alice.read_packet().unwrap();
        assert_eq!(puback.body.get(2).copied().unwrap_or(0), if level == 5 { 0x87 } else { 0 }, "deny wins");
        expected_denied.0 += 2.0;
        alice.send(&mqtt_raw::publish_qos(level, "alice/inbox", 0, 0, b"to myself"));
        let echo = topic_payload(level, &alice.read_packet().unwrap());
        assert_eq!(echo, ("alice/inbox".to_owned(), b"to myself".to_vec()));
        // Both stay connected: a refusal is not a disconnection.
        alice.send(&mqtt_raw::PINGREQ);
        assert_eq!(alice.read_packet().unwrap().packet_type(), 13);
        bob.send(&mqtt_raw::PINGREQ);
        assert_eq!(bob.read_packet().unwrap().packet_type(), 13);
    }
    assert_eq!(denied(&server, "publish"), expected_denied.0);
    assert_eq!(denied(&server, "subscribe"), expected_denied.1);
}

/// An MQTT 5 publish by topic alias is judged by the topic the alias
/// stands for, including an alias set by a publish that was refused (the
/// router never learnt that one).
#[test]
fn a_publish_by_topic_alias_is_judged_by_its_topic() {
    let dir = Dir::new("alias");
    let server = server_with_users(&dir);
    let mut alice = login(&server, 5, "alias-alice", "alice", "alice-pw");
    alice.send(&mqtt_raw::subscribe_all(5, 1, &["alice/inbox", "alice/other"]));
    assert_eq!(alice.read_packet().unwrap().suback_codes(5), vec![0, 0]);
    let mut bob = login(&server, 5, "alias-bob", "bob", "bob-pw");
    let alias = [0x23, 0x00, 0x01];
    let code = |p: RawPacket| (p.packet_type(), p.body.get(2).copied().unwrap_or(0));
    // Alias 1 = alice/other (refused), then by alias alone: refused too.
    bob.send(&mqtt_raw::publish_raw(5, b"alice/other", 1, &alias, b"no"));
    assert_eq!(code(bob.read_packet().unwrap()), (4, 0x87));
    bob.send(&mqtt_raw::publish_raw(5, b"", 1, &alias, b"no"));
    assert_eq!(code(bob.read_packet().unwrap()), (4, 0x87));
    // Alias 1 = alice/inbox (allowed), then by alias alone: delivered.
    bob.send(&mqtt_raw::publish_raw(5, b"alice/inbox", 1, &alias, b"one"));
    assert_eq!(code(bob.read_packet().unwrap()), (4, 0));
    bob.send(&mqtt_raw::publish_raw(5, b"", 1, &alias, b"two"));
    assert_eq!(code(bob.read_packet().unwrap()), (4, 0));
    for payload in [b"one", b"two"] {
        let got = topic_payload(5, &alice.read_packet().unwrap());
        assert_eq!(got, ("alice/inbox".to_owned(), payload.to_vec()));
    }
    assert_eq!(alice.drain(Duration::from_millis(300)), 0);
    assert_eq!(denied(&server, "publish"), 2.0);
}

/// A 3.1.1 CONNECT without clean session (the session outlives the
/// connection), with a login.
fn connect_persistent(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut connect = Vec::new();
    Connect { clean: false, login: Some((user, password)), ..Connect::new(4, client_id, 30) }
        .encode(&mut connect);
    connect
}

/// A kept session's subscriptions were checked against its user's rules:
/// its user resumes it, another user connecting with the same client id
/// starts anew (session present 0) and gets none of its messages.
#[test]
fn another_user_does_not_resume_a_kept_session() {
    let dir = Dir::new("resume");
    let server = server_with_users(&dir);
    let mut alice = RawMqtt::connect(server.mqtt_addr());
    alice.send(&connect_persistent("shared-id", "alice", "alice-pw"));
    assert_eq!(alice.read_packet().unwrap().connack_code(), 0);
    alice.send(&mqtt_raw::subscribe(4, 1, "alice/inbox"));
    assert_eq!(alice.read_packet().unwrap().suback_codes(4), vec![0]);
    alice.send(&mqtt_raw::DISCONNECT);
    assert!(alice.closed_within(Duration::from_secs(5)));
    // Her own reconnection resumes it.
    let mut alice = RawMqtt::connect(server.mqtt_addr());
    alice.send(&connect_persistent("shared-id", "alice", "alice-pw"));
    let ack = alice.read_packet().unwrap();
    assert_eq!((ack.connack_code(), ack.session_present()), (0, true));
    alice.send(&mqtt_raw::DISCONNECT);
    assert!(alice.closed_within(Duration::from_secs(5)));
    // bob's does not.
    let mut bob = RawMqtt::connect(server.mqtt_addr());
    bob.send(&connect_persistent("shared-id", "bob", "bob-pw"));
    let ack = bob.read_packet().unwrap();
    assert_eq!((ack.connack_code(), ack.session_present()), (0, false));
    let mut sender = login(&server, 4, "alice-sender", "alice", "alice-pw");
    sender.send(&mqtt_raw::publish_qos(4, "alice/inbox", 1, 5, b"for alice"));
    assert_eq!(sender.read_packet().unwrap().packet_type(), 4);
    assert_eq!(bob.drain(Duration::from_millis(500)), 0, "bob got alice's message");
}

/// Without a password file, clients without a username get the rules
/// before the first `user` line; patterns apply to every client.
#[test]
fn anonymous_clients_get_the_first_section_and_the_patterns() {
    let dir = Dir::new("anonymous");
    let acl = dir.file("acl", ACL);
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_ACL_FILE", &acl)]);
    for level in [4u8, 5] {
        let refused = if level == 5 { 0x87 } else { 0x80 };
        let id = format!("dev{level}");
        let mut c = RawMqtt::session(server.mqtt_addr(), level, &id, 30);
        let own = format!("clients/{id}/#");
        c.send(&mqtt_raw::subscribe_all(level, 1, &["public/#", "alice/inbox", &own, "clients/other/#"]));
        assert_eq!(c.read_packet().unwrap().suback_codes(level), vec![0, refused, 0, refused]);
        // public/# is read-only.
        c.send(&mqtt_raw::publish_qos(level, "public/x", 1, 2, b"no"));
        let puback = c.read_packet().unwrap();
        assert_eq!(puback.body.get(2).copied().unwrap_or(0), if level == 5 { 0x87 } else { 0 });
        // %c: its own corner, read and write.
        let topic = format!("clients/{id}/status");
        c.send(&mqtt_raw::publish_qos(level, &topic, 0, 0, b"up"));
        assert_eq!(topic_payload(level, &c.read_packet().unwrap()), (topic, b"up".to_vec()));
    }
}

/// A will is checked as a publish at CONNECT: refused with CONNACK 5
/// (3.1.1) or 0x87 not authorized (5); one the client may write is taken.
#[test]
fn a_will_the_acl_does_not_allow_is_refused_at_connect() {
    let dir = Dir::new("will");
    let acl = dir.file("acl", ACL);
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_ACL_FILE", &acl)]);
    for (level, code) in [(4u8, 5u8), (5, 0x87)] {
        let mut c = RawMqtt::connect(server.mqtt_addr());
        c.send(&mqtt_raw::connect_with_will(level, &format!("w{level}"), b"public/will", b"bye", 0));
        assert_eq!(c.read_packet().unwrap().connack_code(), code, "level {level}");
        assert!(c.closed_within(Duration::from_secs(5)));
        let id = format!("w{level}");
        let mut ok = RawMqtt::connect(server.mqtt_addr());
        ok.send(&mqtt_raw::connect_with_will(level, &id, format!("clients/{id}/will").as_bytes(), b"bye", 0));
        assert_eq!(ok.read_packet().unwrap().connack_code(), 0, "level {level}");
    }
    assert_eq!(denied(&server, "publish"), 2.0);
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"not_authorized\"}"), 2.0);
}

/// The password file: the right password lets its user in, a wrong one,
/// an unknown user or no login get "bad username or password" (3.1.1: 4,
/// 5: 0x86). The single username/password pair works beside it.
#[test]
fn the_password_file_checks_hashed_passwords() {
    let dir = Dir::new("passwd");
    let passwords = dir.path("passwd");
    add_user(&passwords, "carol", "carol-pw");
    let text = std::fs::read_to_string(&passwords).unwrap();
    assert!(text.starts_with("carol:$7$1000$") && !text.contains("carol-pw"), "hashed: {text}");
    let server = TestServer::start_with_env(
        &[],
        &[
            ("ECHO_MQTT_PASSWORD_FILE", &passwords),
            ("ECHO_MQTT_USERNAME", "admin"),
            ("ECHO_MQTT_PASSWORD", "admin-pw"),
        ],
    );
    for (level, bad) in [(4u8, 4u8), (5, 0x86)] {
        login(&server, level, "c1", "carol", "carol-pw");
        login(&server, level, "c2", "admin", "admin-pw");
        for (user, password) in
            [("carol", "carol-pW"), ("carol", "admin-pw"), ("dave", "carol-pw"), ("admin", "carol-pw")]
        {
            let mut c = RawMqtt::connect(server.mqtt_addr());
            c.send(&mqtt_raw::connect_with(level, "c3", 30, Some((user, password))));
            assert_eq!(c.read_packet().unwrap().connack_code(), bad, "{user}/{password} on level {level}");
        }
        let mut c = RawMqtt::connect(server.mqtt_addr());
        c.send(&mqtt_raw::connect(level, "c4", 30));
        assert_eq!(c.read_packet().unwrap().connack_code(), bad, "no login on level {level}");
    }
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"bad_credentials\"}"), 10.0);
}

/// A file written by Mosquitto's own `mosquitto_passwd` (101 iterations,
/// its defaults) lets its user in.
#[test]
fn a_file_from_mosquitto_passwd_works() {
    if !tool_available(
        "mosquitto_passwd (Debian package `mosquitto`)",
        Command::new("sh").args(["-c", "command -v mosquitto_passwd"]),
    ) {
        return;
    }
    let dir = Dir::new("mosquitto-passwd");
    let passwords = dir.file("passwd", "");
    let status =
        Command::new("mosquitto_passwd").args(["-b", &passwords, "erin", "erin-pw"]).status().unwrap();
    assert!(status.success());
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_PASSWORD_FILE", &passwords)]);
    login(&server, 5, "e1", "erin", "erin-pw");
    let mut c = RawMqtt::connect(server.mqtt_addr());
    c.send(&mqtt_raw::connect_with(5, "e2", 30, Some(("erin", "wrong"))));
    assert_eq!(c.read_packet().unwrap().connack_code(), 0x86);
}

/// And the other way: Mosquitto's broker takes a file `echo-server passwd`
/// wrote.
#[test]
fn mosquitto_takes_a_file_from_echo_server_passwd() {
    if !tool_available(
        "mosquitto and mosquitto_pub (Debian packages `mosquitto`, `mosquitto-clients`)",
        Command::new("sh").args(["-c", "command -v mosquitto && command -v mosquitto_pub"]),
    ) {
        return;
    }
    let dir = Dir::new("to-mosquitto");
    let passwords = dir.path("passwd");
    add_user(&passwords, "gina", "gina pw");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    // `user root`: as root, Mosquitto would otherwise switch to its own
    // user, which cannot read a file of mode 0600 (elsewhere it is ignored).
    let config = dir.file(
        "mosquitto.conf",
        &format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"),
    );
    let mut broker = Command::new("mosquitto")
        .args(["-c", &config])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let publish = |password: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-u", "gina", "-P", password, "-t", "t", "-m", "x"])
            .output()
            .unwrap()
    };
    let mut right = publish("gina pw");
    for _ in 0..50 {
        if right.status.success() || !String::from_utf8_lossy(&right.stderr).contains("Connection refused") {
            break;
        }
        // Not listening yet.
        std::thread::sleep(Duration::from_millis(100));
        right = publish("gina pw");
    }
    let wrong = publish("gina pW");
    let _ = broker.kill();
    let _ = broker.wait();
    assert!(right.status.success(), "{}", String::from_utf8_lossy(&right.stderr));
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not authorised"), "{wrong:?}");
}

/// `echo-server passwd FILE USER` reads the password from standard input.
#[test]
fn passwd_reads_the_password_from_standard_input() {
    let dir = Dir::new("stdin");
    let passwords = dir.path("passwd");
    let mut child = Command::new(BIN)
        .args(["passwd", &passwords, "frank"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"frank pw\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_PASSWORD_FILE", &passwords)]);
    login(&server, 4, "f1", "frank", "frank pw");
}

/// A bad line in either file stops the server before it binds anything,
/// naming the key, the file and the line, with exit status 2.
#[test]
fn a_bad_file_stops_the_start_naming_file_and_line() {
    let dir = Dir::new("bad");
    let acl = dir.file("acl", "topic read a/#\n\nuser alice\ntopic raedwrite a/#/b\n");
    let (status, _, stderr) = run_to_exit(&["--ws-listen", "127.0.0.1:0"], &[("ECHO_MQTT_ACL_FILE", &acl)]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("mqtt.acl_file: {acl}:4: \"raedwrite a/#/b\" is not a topic filter")),
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
    let passwords = dir.file("passwd", "# users\nalice:$7$101$AAAA$AAAA\n");
    let (status, _, stderr) =
        run_to_exit(&["--ws-listen", "127.0.0.1:0"], &[("ECHO_MQTT_PASSWORD_FILE", &passwords)]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("mqtt.password_file: {passwords}:2: user \"alice\": ")), "{stderr}");
    let (status, _, stderr) = run_to_exit(&[], &[("ECHO_MQTT_ACL_FILE", "/nonexistent/acl")]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("mqtt.acl_file: cannot read /nonexistent/acl"), "{stderr}");
}

/// Mosquitto's own clients log in with `-u/-P` and meet the ACL.
#[test]
fn mosquitto_clients_log_in_and_meet_the_acl() {
    if !tool_available(
        "mosquitto_pub and mosquitto_sub (Debian package `mosquitto-clients`)",
        Command::new("sh").args(["-c", "command -v mosquitto_pub && command -v mosquitto_sub"]),
    ) {
        return;
    }
    let dir = Dir::new("mosquitto-clients");
    let server = server_with_users(&dir);
    let port = server.mqtt_addr().port().to_string();
    let pub_as = |user: &str, password: &str, topic: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-u", user, "-P", password])
            .args(["-t", topic, "-m", "hi", "-q", "1"])
            .output()
            .unwrap()
    };
    let allowed = pub_as("bob", "bob-pw", "bob/x");
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    let wrong = pub_as("bob", "nope", "bob/x");
    assert!(!wrong.status.success());
    let before = denied(&server, "publish");
    // mosquitto_pub reports the PUBACK's 0x87 (and exits 0 or not
    // depending on its version): the server's count is what is checked.
    let _ = pub_as("bob", "bob-pw", "alice/secret/x");
    assert_eq!(denied(&server, "publish"), before + 1.0);
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-u", "alice", "-P", "alice-pw"])
        .args(["-t", "bob/#", "-C", "1", "-W", "3"])
        .output()
        .unwrap();
    // mosquitto_sub 2.0 says so and stops without waiting for messages.
    let said = String::from_utf8_lossy(&sub.stderr);
    assert!(said.contains("denied"), "a refused subscription: {said}");
    assert_eq!(denied(&server, "subscribe"), 1.0);
}

/// What comes back for each packet of a pipelined burst: (type, pkid,
/// reason), the reason 0 when the packet has none (3.1.1, or MQTT 5's
/// short form for success).
fn acks(c: &mut RawMqtt, count: usize) -> Vec<(u8, u16, u8)> {
    (0..count)
        .map(|_| {
            let p = c.read_packet().expect("an acknowledgement");
            (p.packet_type(), p.pkid(), p.body.get(2).copied().unwrap_or(0))
        })
        .collect()
}

/// MQTT 3.1.1 and 5 §4.6: PUBACKs go out in the order their PUBLISHes came
/// in, PUBRECs too, and (here) PUBCOMPs in the order of their PUBRELs —
/// whether the router acknowledged a packet or the session answered it
/// itself because the ACL refused it. Publishes allowed and refused are
/// pipelined in one write, so the session's own answers would overtake
/// the router's acknowledgements of earlier publishes if they did not wait
/// for them; with the router on its thread and on the event loop.
#[test]
fn acknowledgements_keep_the_order_of_the_packets_whatever_answers_them() {
    let dir = Dir::new("order");
    let acl = dir.file("acl", ACL);
    for on_the_loop in [false, true] {
        let mut env = vec![("ECHO_MQTT_ACL_FILE", acl.as_str())];
        if on_the_loop {
            env.extend(common::ROUTER_ON_THE_LOOP);
        }
        let server = TestServer::start_with_env(&[], &env);
        for level in [4u8, 5] {
            let refused = if level == 5 { 0x87 } else { 0 };
            let id = format!("order{level}");
            let allowed = format!("clients/{id}/data");
            let mut c = RawMqtt::session(server.mqtt_addr(), level, &id, 30);
            // Two allowed, one refused (public/# is read-only), and so on.
            let topic = |pkid: u16| if pkid.is_multiple_of(3) { "public/x" } else { allowed.as_str() };
            let code = |pkid: u16| if pkid.is_multiple_of(3) { refused } else { 0 };
            let pkids: Vec<u16> = (1..=30).collect();
            for qos in [1u8, 2] {
                let burst: Vec<u8> = pkids
                    .iter()
                    .flat_map(|&p| mqtt_raw::publish_qos(level, topic(p), qos, p, b"m"))
                    .collect();
                c.send(&burst);
                let expected: Vec<_> = pkids.iter().map(|&p| (3 + qos, p, code(p))).collect();
                assert_eq!(
                    acks(&mut c, pkids.len()),
                    expected,
                    "level {level}, QoS {qos}, loop {on_the_loop}"
                );
            }
            // The releases of the accepted QoS 2 publishes (and, in 3.1.1,
            // of the refused ones, which were acknowledged as delivered);
            // MQTT 5's PUBREC 0x87 ended those exchanges.
            let released: Vec<u16> = pkids.iter().copied().filter(|&p| level == 4 || code(p) == 0).collect();
            let burst: Vec<u8> = released.iter().flat_map(|&p| mqtt_raw::ack(0x62, p)).collect();
            c.send(&burst);
            let expected: Vec<_> = released.iter().map(|&p| (7, p, 0)).collect();
            assert_eq!(acks(&mut c, released.len()), expected, "level {level}, PUBCOMP, loop {on_the_loop}");
            // A burst longer than a turn (256 packets), mostly refused: the
            // answers held back for the router's are released as its
            // acknowledgements come, in order.
            let topic = |pkid: u16| if pkid % 30 == 1 { allowed.as_str() } else { "public/x" };
            let code = |pkid: u16| if pkid % 30 == 1 { 0 } else { refused };
            let pkids: Vec<u16> = (1..=600).collect();
            let burst: Vec<u8> =
                pkids.iter().flat_map(|&p| mqtt_raw::publish_qos(level, topic(p), 1, p, b"m")).collect();
            c.send(&burst);
            let expected: Vec<_> = pkids.iter().map(|&p| (4, p, code(p))).collect();
            assert_eq!(acks(&mut c, pkids.len()), expected, "level {level}, long burst, loop {on_the_loop}");
            c.send(&mqtt_raw::PINGREQ);
            assert_eq!(c.read_packet().unwrap().packet_type(), 13, "still connected");
        }
    }
}

/// MQTT 5: a PUBREC of 0x80 or more ends a QoS 2 exchange (§4.3.3), so a
/// PUBREL for a publish the ACL refused (PUBREC 0x87) names no exchange:
/// PUBCOMP 0x92, packet identifier not found. It must not release anything
/// else: rumqttd's router released the client's oldest held QoS 2 publish
/// for any PUBREL, whatever its packet id, so the refused publish's PUBREL
/// delivered another, still unreleased publish, and that one's own PUBREL
/// then found nothing and got the client dropped. With the router on its
/// thread and on the event loop.
#[test]
fn a_pubrel_for_a_refused_publish_releases_nothing_else() {
    let dir = Dir::new("pubrel");
    let passwords = dir.path("passwd");
    add_user(&passwords, "alice", "alice-pw");
    let acl = dir.file("acl", ACL);
    for on_the_loop in [false, true] {
        let mut env =
            vec![("ECHO_MQTT_PASSWORD_FILE", passwords.as_str()), ("ECHO_MQTT_ACL_FILE", acl.as_str())];
        if on_the_loop {
            env.extend(common::ROUTER_ON_THE_LOOP);
        }
        let server = TestServer::start_with_env(&[], &env);
        let mut sub = login(&server, 5, "alice-reader", "alice", "alice-pw");
        sub.send(&mqtt_raw::subscribe(5, 1, "alice/x"));
        assert_eq!(sub.read_packet().unwrap().suback_codes(5), vec![0]);
        let mut c = login(&server, 5, "alice-writer", "alice", "alice-pw");
        c.send(&mqtt_raw::publish_qos(5, "alice/x", 2, 1, b"held"));
        c.send(&mqtt_raw::publish_qos(5, "alice/secret/x", 2, 2, b"refused"));
        assert_eq!(acks(&mut c, 2), [(5, 1, 0), (5, 2, 0x87)], "loop {on_the_loop}");
        // The refused publish's PUBREL, which a conforming client would not
        // send.
        c.send(&mqtt_raw::ack(0x62, 2));
        assert_eq!(acks(&mut c, 1), [(7, 2, 0x92)], "loop {on_the_loop}");
        assert!(sub.silent_for(Duration::from_millis(300)), "publish 1 is not released yet");
        // Publish 1's own PUBREL completes it, and delivers it, once.
        c.send(&mqtt_raw::ack(0x62, 1));
        assert_eq!(acks(&mut c, 1), [(7, 1, 0)], "loop {on_the_loop}");
        assert_eq!(topic_payload(5, &sub.read_packet().unwrap()), ("alice/x".to_owned(), b"held".to_vec()));
        assert!(sub.silent_for(Duration::from_millis(300)), "delivered once");
        c.send(&mqtt_raw::PINGREQ);
        assert_eq!(c.read_packet().unwrap().packet_type(), 13, "still connected");
    }
}
