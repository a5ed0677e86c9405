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
# 4 × ROUNDS × CLIENTS / 4,000 seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-20000}
ROUNDS=${2:-3}
LOADGEN=./target/release/echo-loadgen
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT

for topics in "" "--own-topic --pipeline-subscribe"; do
  env -u ECHO_CONFIG ./target/release/echo-server --ws-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --no-admin \
    --log-format json --log-level warn,echo_server=info 2>"$TMP/echo.log" &
  ECHO=$!
  for _ in $(seq 100); do grep -q '"ready"' "$TMP/echo.log" && break; sleep 0.1; done
  PORT=$(grep '"protocol":"mqtt"' "$TMP/echo.log" | grep -o '"addr":"[^"]*"' | head -1 | cut -d'"' -f4)
  $LOADGEN churn "mqtt://$PORT" --clients "$CLIENTS" --rounds "$ROUNDS" $topics --server-pid $ECHO --label echo-server --quiet
  kill -TERM $ECHO; wait $ECHO || true

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
