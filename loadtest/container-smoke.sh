#!/usr/bin/env bash
# End-to-end check of the container image, as a user meets it:
#
#   loadtest/container-smoke.sh
#
# 1. builds the image from the top-level Dockerfile with docker or podman
#    (whichever works here), timing the build;
# 2. runs it with its ports published on loopback and waits for its
#    HEALTHCHECK (`echo-server healthcheck`) to pass;
# 3. points the load generator, run from the host, at the published ports:
#    a few hundred WebSocket (and MQTT) connections for a few seconds, with
#    zero errors allowed;
# 4. loads the browser page over the published port (and, when Chromium is
#    installed, echoes through it);
# 5. stops the container with a client connected, and checks the client got
#    close 1001, the container exited 0 within the grace period, and its
#    log ends with the shutdown summary.
#
# With neither engine present it skips with a loud message and exits 0,
# unless REQUIRE_CONTAINER=1 (CI), which makes that an error. Besides an
# engine it needs, on the host, cargo (to build the load generator), curl
# and python3 with the `websockets` package (a client that watches the
# stop); it says so up front when one is missing.
# Environment: ENGINE=docker|podman to choose, IMAGE=name:tag,
# KEEP_IMAGE=1 to keep the image afterwards.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Portable milliseconds (BSD date has no %N).
now_ms() { python3 -c 'import time; print(int(time.time() * 1000))'; }
IMAGE=${IMAGE:-localhost/echo-server:smoke}
NAME=echo-smoke-$$
CLIENTS=${CLIENTS:-300}

log() { printf '[container-smoke] %s\n' "$*"; }
die() { printf '[container-smoke] FAILED: %s\n' "$*" >&2; exit 1; }

engine_works() { command -v "$1" >/dev/null && "$1" info >/dev/null 2>&1; }
if [ -z "${ENGINE:-}" ]; then
  if engine_works docker; then ENGINE=docker
  elif engine_works podman; then ENGINE=podman
  fi
fi
if [ -z "${ENGINE:-}" ]; then
  msg="neither docker nor podman can run containers here"
  if [ "${REQUIRE_CONTAINER:-0}" = 1 ]; then die "$msg (REQUIRE_CONTAINER=1)"; fi
  printf '\n*** SKIPPED: %s; the container image was not checked. ***\n\n' "$msg" >&2
  exit 0
fi
missing=()
command -v cargo >/dev/null || missing+=(cargo)
command -v curl >/dev/null || missing+=(curl)
python3 -c 'import websockets' 2>/dev/null || missing+=("python3 with websockets (pip install websockets)")
[ ${#missing[@]} = 0 ] || die "needs on the host: $(printf '%s, ' "${missing[@]}" | sed 's/, $//')"
# A `docker` that is podman underneath (Debian's podman-docker) behaves as
# podman: health checks need systemd timers, and images need the docker
# format to keep their HEALTHCHECK (podman writes OCI images by default).
PODMAN=0
{ [ "$ENGINE" = podman ] || "$ENGINE" --version 2>/dev/null | grep -qi podman; } && PODMAN=1
BUILD_FLAGS=()
[ $PODMAN = 1 ] && BUILD_FLAGS=(--format docker)

cleanup() {
  "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
  [ -n "${CLIENT_PID:-}" ] && kill "$CLIENT_PID" 2>/dev/null || true
  [ "${KEEP_IMAGE:-0}" = 1 ] || "$ENGINE" rmi -f "$IMAGE" >/dev/null 2>&1 || true
  rm -rf "${WORK:-}"
}
trap cleanup EXIT
WORK=$(mktemp -d)

log "building $IMAGE with $ENGINE"
start=$(now_ms)
# (The ${a[@]+...} form: an empty array under set -u in bash before 4.4.)
"$ENGINE" build ${BUILD_FLAGS[@]+"${BUILD_FLAGS[@]}"} -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; die "image build"; }
build_s=$(( ($(now_ms) - start) / 1000 ))
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
size_mb=$(( (size + 500000) / 1000000 ))
log "built in ${build_s}s; image size ${size_mb} MB"

log "configuration: a mounted file and an ECHO_ variable"
cat >"$WORK/custom.toml" <<'TOML'
[websocket]
idle_timeout = "42s"
TOML
chmod 644 "$WORK/custom.toml"
effective=$("$ENGINE" run --rm -v "$WORK/custom.toml:/etc/echo-server/server.toml:ro" \
  -e ECHO_WEBSOCKET_MAX_CONNECTIONS=1234 "$IMAGE" echo-server --print-config) \
  || die "echo-server --print-config in the container"
grep -qx 'idle_timeout = "42s"' <<<"$effective" || die "the mounted config file was not read: $effective"
grep -qx 'max_connections = 1234' <<<"$effective" || die "ECHO_WEBSOCKET_MAX_CONNECTIONS was not applied"
bad=$("$ENGINE" run --rm -e ECHO_WEBSOCKET_MAX_CONECTIONS=1 "$IMAGE" 2>&1) && die "a bad variable was accepted"
grep -q 'websocket.max_conections: unknown key' <<<"$bad" || die "a bad variable's error does not name it: $bad"

log "starting the container"
"$ENGINE" run -d --name "$NAME" \
  -p 127.0.0.1::8080 -p 127.0.0.1::1883 -p 127.0.0.1::9090 "$IMAGE" >/dev/null
host_port() { "$ENGINE" port "$NAME" "$1/tcp" | head -1 | sed 's/.*://'; }
WS_PORT=$(host_port 8080); MQTT_PORT=$(host_port 1883); ADMIN_PORT=$(host_port 9090)
log "published: ws=127.0.0.1:$WS_PORT mqtt=127.0.0.1:$MQTT_PORT admin=127.0.0.1:$ADMIN_PORT"

log "waiting for the HEALTHCHECK"
healthy=0
for _ in $(seq 60); do
  if [ $PODMAN = 1 ]; then
    # podman runs health checks from systemd timers, absent here: run it.
    podman healthcheck run "$NAME" >/dev/null 2>&1 && { healthy=1; break; }
  else
    [ "$(docker inspect --format '{{.State.Health.Status}}' "$NAME")" = healthy ] && { healthy=1; break; }
  fi
  sleep 0.5
done
[ $healthy = 1 ] || { "$ENGINE" logs "$NAME" >&2; die "the container never became healthy"; }
# (Logs are captured first: `logs | grep -q` under pipefail fails when grep
# stops reading early.)
logs() { "$ENGINE" logs "$NAME" 2>&1; }
startup=$(logs)
grep -q 'open_file_limit=' <<<"$startup" || die "no open-file limit line at start"
grep -q 'listening.*0.0.0.0:8080' <<<"$startup" || die "not listening on all interfaces"

log "building the load generator on the host"
(cd "$ROOT" && cargo build --release --locked -q -p echo-loadgen)
LOADGEN=$ROOT/target/release/echo-loadgen

log "WebSocket load: $CLIENTS connections, 5 msg/s each, for 5 s"
"$LOADGEN" run "ws://127.0.0.1:$WS_PORT/" -q --steps "$CLIENTS" --hold 5s --rate 5 --connect-rate 500 \
  --server-metrics "http://127.0.0.1:$ADMIN_PORT/metrics" --max-error-rate 0 --json "$WORK/ws.json" \
  || die "WebSocket load against the container"

grep -q 'protocol="mqtt"' <<<"$startup" || die "the server in the image has no MQTT listener"
log "MQTT load: $CLIENTS clients on their own topics, QoS 1, 5 msg/s each, for 5 s"
"$LOADGEN" run "mqtt://127.0.0.1:$MQTT_PORT" -q --steps "$CLIENTS" --hold 5s --rate 5 --qos 1 \
  --connect-rate 500 --server-metrics "http://127.0.0.1:$ADMIN_PORT/metrics" --max-error-rate 0 \
  --json "$WORK/mqtt.json" || die "MQTT load against the container"

log "the image's own load generator, from a second container in the server's network namespace"
"$ENGINE" run --rm --network "container:$NAME" "$IMAGE" \
  echo-loadgen run ws://127.0.0.1:8080/ -q --steps 50 --hold 2s --rate 10 --max-error-rate 0 \
  --server-metrics http://127.0.0.1:9090/metrics \
  || die "echo-loadgen in the image against the server"

log "loading the browser page"
page=$(curl -fsS "http://127.0.0.1:$WS_PORT/.ws") || die "GET /.ws over the published port"
grep -q 'new WebSocket(' <<<"$page" || die "the page is not the echo page"
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -n "$CHROMIUM" ] && python3 -c 'import websockets' 2>/dev/null; then
  python3 "$ROOT/crates/echo-server/tests/clients/browser_echo.py" "$CHROMIUM" "http://127.0.0.1:$WS_PORT/.ws" \
    || die "echo through the page in Chromium"
else
  log "Chromium or Python websockets missing: page fetched but not driven"
fi

log "stopping the container with a client connected"
cat >"$WORK/hold.py" <<'PY'
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        print("connected", flush=True)
        try:
            await ws.recv()
        except websockets.ConnectionClosed as e:
            print(f"close {e.rcvd.code if e.rcvd else None}", flush=True)
asyncio.run(main())
PY
python3 "$WORK/hold.py" "ws://127.0.0.1:$WS_PORT/" >"$WORK/hold.out" 2>&1 &
CLIENT_PID=$!
for _ in $(seq 50); do grep -q connected "$WORK/hold.out" && break; sleep 0.1; done
start=$(now_ms)
"$ENGINE" stop -t 10 "$NAME" >/dev/null
stop_ms=$(( $(now_ms) - start ))
wait "$CLIENT_PID" || true; CLIENT_PID=""
exit_code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$NAME")
grep -q 'close 1001' "$WORK/hold.out" || die "the client did not get close 1001: $(cat "$WORK/hold.out")"
[ "$exit_code" = 0 ] || die "the container exited with $exit_code"
# The server's grace is 5 s; its stop, the engine's own work included,
# must fit inside it (a client that answers the close takes milliseconds).
[ "$stop_ms" -le 5000 ] || die "stopping took ${stop_ms} ms (grace is 5 s)"
logs | tail -3 | grep 'shutdown complete' >/dev/null || die "no shutdown summary in the log"

python3 - "$WORK" "$build_s" "$size_mb" "$stop_ms" <<'PY'
import json, os, sys
work, build_s, size_mb, stop_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"[container-smoke] image {size_mb} MB, build {build_s} s, stop {stop_ms} ms (exit 0, client got 1001)")
for name in ("ws", "mqtt"):
    path = os.path.join(work, f"{name}.json")
    if not os.path.exists(path):
        continue
    step = json.load(open(path))["steps"][-1]
    hold, derived = step["hold"], step["derived"]
    lat = hold["latency"]
    ms = lambda us: "-" if us is None else f"{us / 1000:.2f} ms"  # null: no samples
    print(f"[container-smoke] {name}: {step['open_connections']} connections, {hold['received']} echoes, "
          f"{derived['errors']} errors, {derived['received_per_sec']:.0f} echoes/s, "
          f"p50 {ms(lat['p50_us'])}, p99 {ms(lat['p99_us'])}")
PY
log "passed"
