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
# configured one (ECHO_MQTT_ROUTER, else the default) runs once.
#
# By default each server runs on CPU 0 and the generator on CPU 1 (taskset),
# as in mqtt-storm.sh; --no-pin lets everything share the CPUs.
#
# Needs a release build (cargo build --release -p echo-server --bin
# echo-server --example mqtt_load) and Debian's `mosquitto`.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-10000}
SECONDS_=${2:-30}
CONC=${3:-256}
PIN=1; [ "${4:-}" = --no-pin ] && PIN=0
BENCH=./target/release/examples/mqtt_load
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
PIN_SERVER=(); PIN_GEN=()
if [ $PIN = 1 ] && [ "$(nproc)" -ge 2 ]; then PIN_SERVER=(taskset -c 0); PIN_GEN=(taskset -c 1); fi

# echo-server, all listeners on loopback ports the OS picks.
for router in ${ROUTERS:-${ECHO_MQTT_ROUTER:-default}}; do
  label=echo-server; router_env=()
  if [ "$router" != default ]; then label="echo-server ($router)"; router_env=(ECHO_MQTT_ROUTER="$router"); fi
  ${PIN_SERVER[@]+"${PIN_SERVER[@]}"} env ${router_env[@]+"${router_env[@]}"} ./target/release/echo-server \
    --ws-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --log-format json 2>"$TMP/echo.log" &
  ECHO=$!
  for _ in $(seq 100); do grep -q '"ready"' "$TMP/echo.log" && break; sleep 0.1; done
  PORT=$(grep '"protocol":"mqtt"' "$TMP/echo.log" | grep -o '"addr":"[^"]*"' | head -1 | cut -d'"' -f4)
  ADMIN=$(grep '"protocol":"admin"' "$TMP/echo.log" | grep -o '"addr":"[^"]*"' | head -1 | cut -d'"' -f4)
  ${PIN_GEN[@]+"${PIN_GEN[@]}"} $BENCH mqtt --addr "$PORT" --clients "$CLIENTS" --concurrency "$CONC" --rate "${RATE:-1}" \
    --seconds "$SECONDS_" --pid $ECHO --label "$label"
  curl -s "http://$ADMIN/metrics" | grep -E '^echo_mqtt_link_build_seconds_(sum|count)' || true
  kill -TERM $ECHO; wait $ECHO || true
done

# Mosquitto with an equivalent setup: anonymous, loopback, no persistence.
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_type error\n' "$MPORT" > "$TMP/mosquitto.conf"
${PIN_SERVER[@]+"${PIN_SERVER[@]}"} mosquitto -c "$TMP/mosquitto.conf" &
MOSQ=$!
sleep 0.5
${PIN_GEN[@]+"${PIN_GEN[@]}"} $BENCH mqtt --addr "127.0.0.1:$MPORT" --clients "$CLIENTS" --concurrency "$CONC" --rate "${RATE:-1}" --seconds "$SECONDS_" --pid $MOSQ --label mosquitto
kill -TERM $MOSQ; wait $MOSQ || true
