#!/usr/bin/env bash
# What an MQTT connect storm costs the WebSocket clients of the same server:
# 5,000 WebSocket clients echo once a second while 5,000 MQTT clients connect
# (and subscribe, SUBSCRIBE written with CONNECT) all at once, stay 3 s and
# disconnect together (`echo-loadgen mixed`). Prints, per run, the WebSocket echo latency per
# phase (before the storm, during it, while the MQTT clients stay, while
# they disconnect), the storm's connects/s, the CPU time of each server
# thread and how long it was runnable but waiting for a CPU
# (/proc/PID/task/*/schedstat), and the server's event-loop lag, from the
# storm's first connect to the end of the disconnect.
#
#   bash loadtest/mqtt-storm.sh [RUNS] [--no-pin]
#   STORM_WS_CLIENTS=500 STORM_MQTT_CLIENTS=500 STORM_BEFORE=3s bash loadtest/mqtt-storm.sh 1   # short form
#
# By default the server runs on CPU 0 and the generator on CPU 1 (taskset),
# and the storm's worker process at nice 19, so that the generator's own
# work does not take the server's core: what is measured is the server. With
# --no-pin everything shares both CPUs, which on a 2-CPU machine mostly
# measures the generator preempting the event loop (see the waiting-for-a-CPU
# figures). Needs a release build (cargo build --release -p echo-server
# -p echo-loadgen) and 2 CPUs. Each run takes ~25 s.
#
# ROUTERS="event-loop thread" runs each run once per placement of the MQTT
# router (mqtt.router), alternating, so that both see the same machine;
# unset, the configured one (ECHO_MQTT_ROUTER, else the default) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PIN=1; [ "${2:-}" = --no-pin ] && PIN=0
LOADGEN=./target/release/echo-loadgen
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
PIN_SERVER=(); PIN_GEN=(); NICE=0
if [ $PIN = 1 ] && [ "$(nproc)" -ge 2 ]; then PIN_SERVER=(taskset -c 0); PIN_GEN=(taskset -c 1); NICE=19; fi

addr() { grep "\"protocol\":\"$1\"" "$TMP/echo.log" | grep -o '"addr":"[^"]*"' | head -1 | cut -d'"' -f4; }
for run in $(seq "$RUNS"); do
for router in ${ROUTERS:-${ECHO_MQTT_ROUTER:-default}}; do
  router_env=(); [ "$router" != default ] && router_env=(ECHO_MQTT_ROUTER="$router")
  env -u ECHO_CONFIG ${router_env[@]+"${router_env[@]}"} ${PIN_SERVER[@]+"${PIN_SERVER[@]}"} \
    ./target/release/echo-server --ws-listen 127.0.0.1:0 \
    --mqtt-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format json --log-level "${STORM_LOG_LEVEL:-warn,echo_server=info}" \
    2>"$TMP/echo.log" &
  ECHO=$!
  for _ in $(seq 100); do grep -q '"ready"' "$TMP/echo.log" && break; sleep 0.1; done
  echo "run $run/$RUNS (router: $router)"
  "${PIN_GEN[@]}" $LOADGEN mixed "ws://$(addr websocket)/" "mqtt://$(addr mqtt)" \
    --ws-clients "${STORM_WS_CLIENTS:-5000}" --mqtt-clients "${STORM_MQTT_CLIENTS:-5000}" --before "${STORM_BEFORE:-10s}" \
    --pipeline-subscribe --server-pid $ECHO --server-metrics "http://$(addr admin)/metrics" --mqtt-nice $NICE --quiet
  [ -n "${STORM_LOG_LEVEL:-}" ] && cp "$TMP/echo.log" "/tmp/storm-run$run-$router.log"
  kill -TERM $ECHO 2>/dev/null || { echo "the server had exited:"; tail -5 "$TMP/echo.log"; }; wait $ECHO || true
done
done
