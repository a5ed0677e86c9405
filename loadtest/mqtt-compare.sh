#!/usr/bin/env bash
# Side-by-side MQTT measurement: echo-server and Mosquitto under the same
# load, one after the other, in the same run. Bounded: N clients, S seconds.
#
#   bash loadtest/mqtt-compare.sh [CLIENTS] [SECONDS] [CONCURRENCY]
#
# Needs a release build (cargo build --release -p echo-server --bin
# echo-server --example mqtt_load) and Debian's `mosquitto`.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-10000}
SECONDS_=${2:-30}
CONC=${3:-256}
BENCH=./target/release/examples/mqtt_load
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT

# echo-server, all listeners on loopback ports the OS picks.
./target/release/echo-server --ws-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --log-format json 2>"$TMP/echo.log" &
ECHO=$!
for _ in $(seq 100); do grep -q '"ready"' "$TMP/echo.log" && break; sleep 0.1; done
PORT=$(grep '"protocol":"mqtt"' "$TMP/echo.log" | grep -o '"addr":"[^"]*"' | head -1 | cut -d'"' -f4)
ADMIN=$(grep '"protocol":"admin"' "$TMP/echo.log" | grep -o '"addr":"[^"]*"' | head -1 | cut -d'"' -f4)
$BENCH mqtt --addr "$PORT" --clients "$CLIENTS" --concurrency "$CONC" --seconds "$SECONDS_" --pid $ECHO --label echo-server
curl -s "http://$ADMIN/metrics" | grep -E '^echo_mqtt_link_build_seconds_(sum|count)' || true
kill -TERM $ECHO; wait $ECHO || true

# Mosquitto with an equivalent setup: anonymous, loopback, no persistence.
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_type error\n' "$MPORT" > "$TMP/mosquitto.conf"
mosquitto -c "$TMP/mosquitto.conf" &
MOSQ=$!
sleep 0.5
$BENCH mqtt --addr "127.0.0.1:$MPORT" --clients "$CLIENTS" --concurrency "$CONC" --seconds "$SECONDS_" --pid $MOSQ --label mosquitto
kill -TERM $MOSQ; wait $MOSQ || true
