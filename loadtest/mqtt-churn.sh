#!/usr/bin/env bash
# What a broker keeps of clients that are gone: rounds of clients with fresh
# client ids (as mosquitto_sub and MQTT.js pick by default) that connect,
# optionally subscribe to a topic of their own, and leave
# (`echo-loadgen churn`). echo-server and Mosquitto, one after the other,
# same load, same run. A broker that frees what a client leaves behind stays
# flat from round to round.
#
#   bash loadtest/mqtt-churn.sh [CLIENTS_PER_ROUND] [ROUNDS]
#
# Needs a release build (cargo build --release -p echo-server -p
# echo-loadgen) and Debian's `mosquitto`. Bounded: about
# 4 × ROUNDS × CLIENTS / 4,000 seconds. The caller's ECHO_* variables do
# not reach echo-server (lib.sh's start_echo_server).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
CLIENTS=${1:-20000}
ROUNDS=${2:-3}
LOADGEN=./target/release/echo-loadgen
ECHO_SERVER=./target/release/echo-server
PIN_SERVER=()
TMP=$(mktemp -d)
trap 'stop_server; kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT

for topics in "" "--own-topic --pipeline-subscribe"; do
  start_echo_server "$TMP/echo.log" -- --mqtt-listen 127.0.0.1:0 --no-admin --log-level warn,echo_server=info
  $LOADGEN churn "mqtt://$MQTT_ADDR" --clients "$CLIENTS" --rounds "$ROUNDS" $topics --server-pid "$SERVER_PID" --label echo-server --quiet
  stop_server
  [ "$SERVER_EXIT" = stopped ] || { echo "echo-server had ended by itself ($SERVER_EXIT)" >&2; exit 1; }

  if command -v mosquitto >/dev/null; then
    MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_type error\n' \
      "$MPORT" > "$TMP/mosquitto.conf"
    mosquitto -c "$TMP/mosquitto.conf" &
    MOSQ=$!
    sleep 0.5
    $LOADGEN churn "mqtt://127.0.0.1:$MPORT" --clients "$CLIENTS" --rounds "$ROUNDS" $topics --server-pid $MOSQ \
      --label mosquitto --quiet
    kill -TERM $MOSQ; wait $MOSQ || true
  else
    echo "mosquitto not installed: echo-server only (apt-get install mosquitto)" >&2
  fi
done
