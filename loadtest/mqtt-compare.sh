#!/usr/bin/env bash
# Side-by-side MQTT measurement: echo-server and Mosquitto under the same
# load, one after the other, in the same run. Bounded: N clients, S seconds.
#
#   bash loadtest/mqtt-compare.sh [CLIENTS] [SECONDS] [CONCURRENCY] [--no-pin]
#
# RATE sets the messages per second per client (default 1).
#
# ROUTERS="event-loop thread" runs echo-server once per placement of its
# MQTT router (mqtt.router), back to back, before Mosquitto; unset, the
# configured one (ECHO_MQTT_ROUTER, else the default) runs once. Other
# ECHO_* variables do not reach the server (lib.sh's start_echo_server).
#
# By default each server runs on CPU 0 and the generator on CPU 1 (taskset),
# as in mqtt-storm.sh; --no-pin lets everything share the CPUs.
#
# Per server (fresh process), two `echo-loadgen run`s: CLIENTS idle MQTT
# clients, each subscribed to its own topic (SUBSCRIBE written with
# CONNECT), connected with CONCURRENCY
# attempts in flight (the broker's pace sets the ramp: connects/s) and held
# 3 s (server memory per idle connection: ΔRSS/conn); then CLIENTS clients
# publishing RATE messages/s each (default 1) to their own topic for SECONDS (QoS 0,
# latency from the scheduled send time, every delivery checked; lost ones
# are echo_lost/echo_timeout errors).
#
# Needs a release build (cargo build --release -p echo-server -p
# echo-loadgen) and Debian's `mosquitto`. ECHO_SERVER=PATH runs another
# build of echo-server (a before/after comparison); SKIP_MOSQUITTO=1 leaves
# Mosquitto out.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
CLIENTS=${1:-10000}
SECONDS_=${2:-30}
CONC=${3:-256}
PIN=1; [ "${4:-}" = --no-pin ] && PIN=0
LOADGEN=./target/release/echo-loadgen
ECHO_SERVER=${ECHO_SERVER:-./target/release/echo-server}
TMP=$(mktemp -d)
trap 'stop_server; kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
PIN_SERVER=(); PIN_GEN=()
if [ $PIN = 1 ] && [ "$(nproc)" -ge 2 ]; then PIN_SERVER=(taskset -c 0); PIN_GEN=(taskset -c 1); fi

# $1 label, $2 URL, $3 server PID
measure() {
  local common=(--steps "$CLIENTS" --connect-rate 1000000 --connect-concurrency "$CONC" --pipeline-subscribe
    --server-pid "$3" --quiet)
  ${PIN_GEN[@]+"${PIN_GEN[@]}"} $LOADGEN run "$2" "${common[@]}" --rate 0 --hold 3s --label "$1 (idle)" --json "$TMP/$1-idle.json"
  python3 - "$TMP/$1-idle.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["steps"][0]
print(f"connects/s over the ramp: {s['ramp']['connected'] / s['ramp_secs']:.0f} "
      f"({s['ramp']['connected']} connected in {s['ramp_secs']:.2f} s)")
PY
  ${PIN_GEN[@]+"${PIN_GEN[@]}"} $LOADGEN run "$2" "${common[@]}" --rate "${RATE:-1}" --hold "${SECONDS_}s" --label "$1" --json "$TMP/$1.json"
}

# echo-server, all listeners on loopback ports the OS picks.
for router in ${ROUTERS:-${ECHO_MQTT_ROUTER:-default}}; do
  label=echo-server; router_env=()
  if [ "$router" != default ]; then label="echo-server-$router"; router_env=(ECHO_MQTT_ROUTER="$router"); fi
  start_echo_server "$TMP/echo.log" ${router_env[@]+"${router_env[@]}"} -- --mqtt-listen 127.0.0.1:0
  measure "$label" "mqtt://$MQTT_ADDR" "$SERVER_PID"
  curl -s "http://$ADMIN_ADDR/metrics" | grep -E '^echo_mqtt_(link_build_seconds_(sum|count)|log_messages) ' || true
  stop_server
  [ "$SERVER_EXIT" = stopped ] || { echo "echo-server had ended by itself ($SERVER_EXIT)" >&2; exit 1; }
done

[ "${SKIP_MOSQUITTO:-0}" = 1 ] && exit 0

# Mosquitto with an equivalent setup: anonymous, loopback, no persistence.
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_type error\n' "$MPORT" > "$TMP/mosquitto.conf"
${PIN_SERVER[@]+"${PIN_SERVER[@]}"} mosquitto -c "$TMP/mosquitto.conf" &
MOSQ=$!
sleep 0.5
measure mosquitto "mqtt://127.0.0.1:$MPORT" $MOSQ
kill -TERM $MOSQ; wait $MOSQ || true
