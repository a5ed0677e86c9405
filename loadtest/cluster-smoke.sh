#!/usr/bin/env bash
# End-to-end check of the compose cluster (compose.yaml): NATS, three
# echo-server replicas bridged over it, HAProxy in front, the load generator.
#
#   loadtest/cluster-smoke.sh
#
# 1. builds the images that are missing (the server's from the Dockerfile,
#    unless IMAGE names one already built, as CI does after
#    container-smoke.sh; NATS and HAProxy from deploy/, on Debian's
#    packages) and starts the cluster with podman-compose or docker compose;
# 2. waits for every replica's /readyz and for HAProxy to have all of them
#    up (its own health checks: /readyz on the admin port);
# 3. MQTT across replicas: a subscriber on echo-1 gets what a publisher on
#    echo-3 sends (QoS 0 and 1), directly on their own ports;
# 4. the load generator's container, on the compose network, puts WebSocket
#    and MQTT clients on HAProxy, zero errors allowed, and every replica gets
#    a share;
# 5. with WebSocket and MQTT clients held through HAProxy (and a publisher
#    on echo-3 feeding a subscriber on echo-1), stops echo-2: HAProxy takes
#    it out, exactly its clients are disconnected and all of them reconnect
#    to the others and go on echoing, and no other client misses a message.
#
# With no container engine or no compose it skips with a loud message and
# exits 0, unless REQUIRE_CONTAINER=1 (CI), which makes that an error.
# Needs on the host: curl, python3 with websockets and paho-mqtt.
# Environment: ENGINE=docker|podman, IMAGE=name:tag of a server image to
# use as it is (else it is built from the Dockerfile), KEEP=1 to leave the
# cluster running afterwards.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# An image named by the caller is used as it is (CI: the one just built
# and checked); otherwise the server's image is built, as NATS's and
# HAProxy's always are (the layer cache makes that seconds when nothing
# changed, and an edited haproxy.cfg is never left out).
REUSE=0
[ -n "${IMAGE:-}" ] && REUSE=1
IMAGE=${IMAGE:-localhost/echo-server:latest}
PROJECT=echo-cluster-smoke-$$
CLIENTS=${CLIENTS:-30}

log() { printf '[cluster-smoke] %s\n' "$*"; }
die() { printf '[cluster-smoke] FAILED: %s\n' "$*" >&2; exit 1; }
skip() {
  if [ "${REQUIRE_CONTAINER:-0}" = 1 ]; then die "$1 (REQUIRE_CONTAINER=1)"; fi
  printf '\n*** SKIPPED: %s; the compose cluster was not checked. ***\n\n' "$1" >&2
  exit 0
}

engine_works() { command -v "$1" >/dev/null && "$1" info >/dev/null 2>&1; }
if [ -z "${ENGINE:-}" ]; then
  if engine_works docker; then ENGINE=docker
  elif engine_works podman; then ENGINE=podman
  fi
fi
[ -n "${ENGINE:-}" ] || skip "neither docker nor podman can run containers here"
# docker compose (the plugin) with docker; podman-compose (PyPI) with podman.
if [ "$ENGINE" = docker ] && docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v podman-compose >/dev/null; then
  COMPOSE=(podman-compose)
else
  skip "no compose for $ENGINE (docker compose, or pip install podman-compose)"
fi
missing=()
command -v curl >/dev/null || missing+=(curl)
python3 -c 'import websockets, paho.mqtt' 2>/dev/null || missing+=("python3 with websockets and paho-mqtt")
[ ${#missing[@]} = 0 ] || die "needs on the host: $(printf '%s, ' "${missing[@]}" | sed 's/, $//')"
PODMAN=0
{ [ "$ENGINE" = podman ] || "$ENGINE" --version 2>/dev/null | grep -qi podman; } && PODMAN=1

WORK=$(mktemp -d)
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/compose.yaml" "$@"; }
cleanup() {
  local status=$?
  [ -n "${CLIENTS_PID:-}" ] && kill "$CLIENTS_PID" 2>/dev/null
  if [ $status != 0 ] && [ -n "${UP:-}" ]; then
    for s in lb echo-1 echo-2 echo-3 nats; do
      printf -- '--- %s (last lines) ---\n' "$s" >&2
      compose logs "$s" 2>&1 | tail -15 >&2 || true
    done
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    log "KEEP=1: the cluster stays up (project $PROJECT)"
  elif [ -n "${UP:-}" ]; then
    compose down -t 5 >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
# HAProxy's ports on any free port: nothing on this machine is disturbed.
export ECHO_IMAGE=$IMAGE ECHO_LB_WS_PORT='' ECHO_LB_MQTT_PORT='' ECHO_LB_STATS_PORT=''

build() { # image, context, reuse (1: use the image if it exists)
  if [ "$3" = 1 ] && "$ENGINE" image inspect "$1" >/dev/null 2>&1; then
    log "image $1: given, used as it is"
    return
  fi
  local from=${2#"$ROOT"}; log "building $1 from ./${from#/}"
  local flags=()
  [ $PODMAN = 1 ] && flags=(--format docker)
  "$ENGINE" build ${flags[@]+"${flags[@]}"} -t "$1" "$2" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; die "building $1"; }
}
start=$(date +%s)
build "$IMAGE" "$ROOT" $REUSE
build localhost/echo-nats:latest "$ROOT/deploy/nats" 0
build localhost/echo-haproxy:latest "$ROOT/deploy/haproxy" 0

log "starting the cluster with ${COMPOSE[*]} (project $PROJECT)"
UP=1
compose up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "${COMPOSE[*]} up"; }

# Published host ports, found by the compose labels both tools set.
container() {
  "$ENGINE" ps -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -1
}
host_port() { "$ENGINE" port "$(container "$1")" "$2/tcp" | head -1 | sed 's/.*://'; }
for s in echo-1 echo-2 echo-3; do
  [ -n "$(container "$s")" ] || die "no running container for $s: $(cat "$WORK/up.log")"
done
declare -A ADMIN MQTT
for s in echo-1 echo-2 echo-3; do ADMIN[$s]=$(host_port "$s" 9090); MQTT[$s]=$(host_port "$s" 1883); done
LB_WS=$(host_port lb 8080); LB_MQTT=$(host_port lb 1883); LB_STATS=$(host_port lb 8404)
log "HAProxy: ws=127.0.0.1:$LB_WS mqtt=127.0.0.1:$LB_MQTT stats=127.0.0.1:$LB_STATS"

# HAProxy's view of one server: UP, DOWN, ... (its CSV statistics).
lb_status() { # backend server
  curl -fsS "http://127.0.0.1:$LB_STATS/stats;csv" 2>/dev/null | awk -F, -v b="$1" -v s="$2" '$1==b && $2==s {print $18}'
}
log "waiting for every replica's /readyz (joined to NATS) and for HAProxy to have them all up"
ready=0
for _ in $(seq 120); do
  ready=1
  for s in echo-1 echo-2 echo-3; do
    curl -fsS -o /dev/null "http://127.0.0.1:${ADMIN[$s]}/readyz" 2>/dev/null || ready=0
    for b in echo_mqtt echo_websocket; do [ "$(lb_status $b "$s")" = UP ] || ready=0; done
  done
  [ $ready = 1 ] && break
  sleep 0.5
done
[ $ready = 1 ] || die "the cluster never became ready"
log "up and ready in $(( $(date +%s) - start )) s"

metric() { # replica name: the value of an unlabelled metric
  curl -fsS "http://127.0.0.1:${ADMIN[$1]}/metrics" | awk -v m="$2" '$1==m {print $2}'
}

log "MQTT across replicas: subscriber on echo-1, publisher on echo-3 (QoS 0 and 1)"
python3 - "${MQTT[echo-1]}" "${MQTT[echo-3]}" <<'PY' || die "a message from echo-3 did not reach echo-1"
import sys, threading, time
import paho.mqtt.client as mqtt
sub_port, pub_port = int(sys.argv[1]), int(sys.argv[2])
got, subscribed = [], threading.Event()
sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke-sub")
sub.on_subscribe = lambda *a: subscribed.set()
sub.on_message = lambda c, u, m: got.append((m.topic, m.payload, m.qos))
sub.connect("127.0.0.1", sub_port)
sub.loop_start()
sub.subscribe("smoke/+/across", qos=1)
assert subscribed.wait(5), "no SUBACK"
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke-pub")
pub.connect("127.0.0.1", pub_port)
pub.loop_start()
# The subscription travels to the other replicas over NATS: retry until
# the first message crosses, then every one must.
deadline = time.time() + 10
while not got and time.time() < deadline:
    pub.publish("smoke/0/across", b"probe", qos=0)
    time.sleep(0.2)
assert got, "nothing crossed from echo-3 to echo-1 in 10 s"
got.clear()
for i in range(20):
    pub.publish(f"smoke/{i % 3}/across", f"m{i}".encode(), qos=i % 2).wait_for_publish(5)
deadline = time.time() + 5
while len(got) < 20 and time.time() < deadline:
    time.sleep(0.05)
assert sorted(p for _, p, _ in got) == sorted(f"m{i}".encode() for i in range(20)), got
print(f"[cluster-smoke] 20 of 20 messages crossed (QoS 0 and 1)")
PY

log "the load generator's container on the compose network: WebSocket and MQTT through HAProxy"
before=()
for s in echo-1 echo-2 echo-3; do before+=("$(metric "$s" echo_websocket_accepted_total)"); done
compose --profile loadgen run --rm loadgen ws://lb:8080/ -q --steps 90 --hold 3s --rate 10 --max-error-rate 0 \
  >"$WORK/lg-ws.log" 2>&1 || { cat "$WORK/lg-ws.log" >&2; die "echo-loadgen (WebSocket) through HAProxy"; }
compose --profile loadgen run --rm loadgen mqtt://lb:1883 -q --steps 90 --hold 3s --rate 10 --qos 1 --max-error-rate 0 \
  >"$WORK/lg-mqtt.log" 2>&1 || { cat "$WORK/lg-mqtt.log" >&2; die "echo-loadgen (MQTT) through HAProxy"; }
i=0
for s in echo-1 echo-2 echo-3; do
  got=$(metric "$s" echo_websocket_accepted_total)
  n=$(( ${got%.*} - ${before[$i]%.*} )); i=$((i + 1))
  [ "$n" -ge 15 ] || die "$s accepted only $n of the 90 WebSocket connections: HAProxy did not spread them"
  log "$s took $n of the load generator's 90 WebSocket connections"
done
grep -E '^ *90 ' "$WORK/lg-ws.log" | head -1 | sed 's/^/[cluster-smoke] ws:   /' || true
grep -E '^ *90 ' "$WORK/lg-mqtt.log" | head -1 | sed 's/^/[cluster-smoke] mqtt: /' || true

log "stopping echo-2 with $CLIENTS WebSocket and $CLIENTS MQTT clients held through HAProxy"
cat >"$WORK/clients.py" <<'PY'
# Clients through HAProxy that echo all the time and count what they miss.
import asyncio, json, os, sys, threading, time, urllib.request
import paho.mqtt.client as mqtt
import websockets

lb_ws, lb_mqtt, pin_sub, pin_pub, victim_admin, n, work = sys.argv[1:8]
n = int(n)
PERIOD = 0.1

def gauge(name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{victim_admin}/metrics", timeout=3).read().decode()
    # Summed over labels (MQTT sessions are counted by protocol version).
    return int(sum(float(l.split()[-1]) for l in text.splitlines()
                   if l.split(" ")[0].split("{")[0] == name))

class Ws:
    def __init__(self, i):
        self.i, self.disconnects, self.missed, self.echoes_after, self.connected = i, 0, 0, 0, False
        self.gone_at, self.gap = None, None  # disconnected at; until the first echo after
    async def run(self, stop):
        seq = 0
        while not stop.is_set():
            try:
                async with websockets.connect(f"ws://127.0.0.1:{lb_ws}/", open_timeout=5) as ws:
                    self.connected = True
                    while not stop.is_set():
                        seq += 1
                        await ws.send(f"{self.i}:{seq}")
                        try:
                            echo = await asyncio.wait_for(ws.recv(), 2)
                        except asyncio.TimeoutError:
                            self.missed += 1
                            continue
                        if echo != f"{self.i}:{seq}":
                            self.missed += 1
                        elif self.disconnects:
                            self.echoes_after += 1
                            if self.gap is None:
                                self.gap = time.monotonic() - self.gone_at
                        await asyncio.sleep(PERIOD)
            except (websockets.exceptions.WebSocketException, OSError, asyncio.TimeoutError):
                pass
            if stop.is_set():
                return
            # Gone (close 1001 from a replica that stops): reconnect. A
            # failed attempt is not another disconnection.
            if self.connected:
                self.disconnects += 1
                self.gone_at = time.monotonic()
            self.connected = False
            await asyncio.sleep(0.2)

class Mq:
    def __init__(self, i, port=lb_mqtt, topic=None, publish_to=None):
        self.i, self.disconnects, self.sent, self.received, self.after = i, 0, 0, 0, 0
        self.gone_at, self.gap = None, None
        self.topic = topic or f"smoke/held/{os.getpid()}/{i}"
        self.connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"held-{os.getpid()}-{i}")
        self.c.reconnect_delay_set(min_delay=1, max_delay=2)
        self.c.on_connect = self.on_connect
        self.c.on_disconnect = self.on_disconnect
        self.c.on_message = self.on_message
        self.subscribe = publish_to is None
        self.c.connect_async("127.0.0.1", int(port), keepalive=30)
        self.c.loop_start()
    def on_connect(self, c, u, flags, rc, props):
        if self.subscribe:
            c.subscribe(self.topic, qos=1)
        self.connected.set()
    def on_disconnect(self, c, u, flags, rc, props):
        if self.connected.is_set():
            self.disconnects += 1
            self.gone_at = time.monotonic()
        self.connected.clear()
    def on_message(self, c, u, m):
        self.received += 1
        if self.disconnects:
            self.after += 1
            if self.gap is None:
                self.gap = time.monotonic() - self.gone_at
    def tick(self):
        if self.connected.is_set():
            self.c.publish(self.topic, b"x", qos=1)
            self.sent += 1

async def main():
    stop = asyncio.Event()
    ws = [Ws(i) for i in range(n)]
    tasks = [asyncio.create_task(w.run(stop)) for w in ws]
    mq = [Mq(i) for i in range(n)]
    # Across replicas all along: published on echo-3, subscribed on echo-1.
    across_sub = Mq("across-sub", port=pin_sub, topic=f"smoke/across/{os.getpid()}")
    across_pub = Mq("across-pub", port=pin_pub, topic=f"smoke/across/{os.getpid()}", publish_to=True)
    await asyncio.sleep(3)
    assert all(w.connected for w in ws) and all(m.connected.is_set() for m in mq), "clients did not connect"
    victim = (gauge("echo_websocket_connections"), gauge("echo_mqtt_connections"))
    start_counts = [(m.sent, m.received) for m in mq]
    print(json.dumps({"ready": True, "victim": victim}), flush=True)
    # The shell stops echo-2 now; the clients keep going until it says so.
    while not os.path.exists(os.path.join(work, "stopped")):
        for m in mq + [across_pub]:
            m.tick()
        await asyncio.sleep(PERIOD)
    for _ in range(int(6 / PERIOD)):  # after the stop: reconnected and echoing again
        for m in mq + [across_pub]:
            m.tick()
        await asyncio.sleep(PERIOD)
    await asyncio.sleep(1)  # the last QoS 1 messages land
    stop.set()
    await asyncio.gather(*tasks)
    out = {
        "victim": {"websocket": victim[0], "mqtt": victim[1]},
        "ws": [{"disconnects": w.disconnects, "missed": w.missed, "after": w.echoes_after,
                "connected": w.connected, "gap": w.gap} for w in ws],
        "mqtt": [{"disconnects": m.disconnects, "sent": m.sent, "received": m.received, "after": m.after,
                  "connected": m.connected.is_set(), "gap": m.gap} for m in mq],
        "across": {"sent": across_pub.sent, "received": across_sub.received,
                   "disconnects": across_sub.disconnects + across_pub.disconnects},
    }
    print(json.dumps(out), flush=True)

asyncio.run(main())
PY
python3 "$WORK/clients.py" "$LB_WS" "$LB_MQTT" "${MQTT[echo-1]}" "${MQTT[echo-3]}" "${ADMIN[echo-2]}" \
  "$CLIENTS" "$WORK" >"$WORK/clients.out" 2>"$WORK/clients.err" &
CLIENTS_PID=$!
for _ in $(seq 100); do grep -q '"ready"' "$WORK/clients.out" && break; sleep 0.1; done
grep -q '"ready"' "$WORK/clients.out" || { cat "$WORK/clients.err" >&2; die "the held clients never got going"; }
VICTIM=$(container echo-2)
stop_start=$(date +%s%N)
# (podman complains here that it has no systemd for its health-check
# timers; that is its business, not the cluster's.)
"$ENGINE" stop -t 10 "$VICTIM" >/dev/null 2>"$WORK/stop.err" || { cat "$WORK/stop.err" >&2; die "stopping echo-2"; }
stop_ms=$(( ($(date +%s%N) - stop_start) / 1000000 ))
exit_code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$VICTIM")
down=0
for _ in $(seq 20); do
  [ "$(lb_status echo_mqtt echo-2)" != UP ] && [ "$(lb_status echo_websocket echo-2)" != UP ] && { down=1; break; }
  sleep 0.25
done
[ $down = 1 ] || die "HAProxy still has echo-2 up after it stopped"
touch "$WORK/stopped"
wait "$CLIENTS_PID" || { cat "$WORK/clients.err" >&2; die "the held clients failed"; }
CLIENTS_PID=""
log "echo-2 stopped in ${stop_ms} ms (exit $exit_code); HAProxy: echo_mqtt/echo-2 $(lb_status echo_mqtt echo-2), echo_websocket/echo-2 $(lb_status echo_websocket echo-2)"
[ "$exit_code" = 0 ] || die "echo-2 exited with $exit_code"

python3 - "$(tail -1 "$WORK/clients.out")" <<'PY' || die "the stop of echo-2 was noticed where it should not be, or its clients did not come back"
import json, sys
r = json.loads(sys.argv[1])
bad = []
for kind in ("ws", "mqtt"):
    clients = r[kind]
    hit = [c for c in clients if c["disconnects"]]
    spared = [c for c in clients if not c["disconnects"]]
    on_victim = r["victim"]["websocket" if kind == "ws" else "mqtt"]
    # Exactly the clients echo-2 held were disconnected, once each.
    if len(hit) != on_victim or any(c["disconnects"] != 1 for c in hit):
        bad.append(f"{kind}: echo-2 held {on_victim} clients but {len(hit)} were disconnected "
                   f"({[c['disconnects'] for c in hit]} times)")
    if on_victim == 0:
        bad.append(f"{kind}: HAProxy gave echo-2 no client, nothing was tested")
    # They all came back through HAProxy and echo again.
    for c in hit:
        if not c["connected"] or c["after"] == 0:
            bad.append(f"{kind}: a client of echo-2 did not reconnect and echo again: {c}")
    # Nobody else noticed: no miss, no loss.
    for c in spared:
        if kind == "ws" and c["missed"]:
            bad.append(f"ws: a client of another replica missed {c['missed']} echoes")
        if kind == "mqtt" and c["received"] != c["sent"]:
            bad.append(f"mqtt: a client of another replica got {c['received']} of its {c['sent']} messages")
    # Back within seconds: the WebSocket clients retry after 0.2 s, paho
    # after 1 s; HAProxy must not hold them on the replica that is gone.
    gaps = [c["gap"] for c in hit if c["gap"] is not None]
    worst = max(gaps, default=0.0)
    if worst > 3.0:
        bad.append(f"{kind}: a client of echo-2 took {worst:.1f} s to echo again (HAProxy kept it on echo-2?)")
    print(f"[cluster-smoke] {kind}: {len(clients)} clients, {len(hit)} on echo-2 disconnected and all back "
          f"(echoing again after {min(gaps, default=0):.2f}-{worst:.2f} s, "
          f"{min((c['after'] for c in hit), default=0)}+ echoes each), {len(spared)} others: nothing missed")
a = r["across"]
if a["disconnects"] or a["received"] != a["sent"] or a["sent"] < 50:
    bad.append(f"across echo-3 -> echo-1 during the stop: {a}")
print(f"[cluster-smoke] across replicas during the stop: {a['received']} of {a['sent']} QoS 1 messages")
for b in bad:
    print(f"[cluster-smoke] {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
log "passed in $(( $(date +%s) - start )) s"
