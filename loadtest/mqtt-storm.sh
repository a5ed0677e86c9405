#!/usr/bin/env bash
# What an MQTT connect storm costs the WebSocket clients of the same server:
# 5,000 WebSocket clients echo once a second while 5,000 MQTT clients connect
# (and subscribe) all at once. Prints, per run, the WebSocket echo latency
# before and during the storm, the storm's connects/s, and how long each
# server thread was runnable but waiting for a CPU during the storm.
#
#   bash loadtest/mqtt-storm.sh [RUNS] [--no-pin]
#
# By default the server runs on CPU 0 and the generator on CPU 1 (taskset),
# and the storm process at nice 19, so that the generator's own work does
# not take the server's core: what is measured is the server. With
# --no-pin everything shares both CPUs, which on a 2-CPU machine mostly
# measures the generator preempting the event loop (see the waiting_for_cpu
# figures). Needs a release build (cargo build --release -p echo-server
# --bin echo-server --example mqtt_load) and 2 CPUs. Each run takes ~45 s.
#
# ROUTERS="event-loop thread" runs each run once per placement of the MQTT
# router (mqtt.router), alternating, so that both see the same machine;
# unset, the configured one (ECHO_MQTT_ROUTER, else the default) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PIN=1; [ "${2:-}" = --no-pin ] && PIN=0
BENCH=./target/release/examples/mqtt_load
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
  "${PIN_GEN[@]}" $BENCH mixed --ws "ws://$(addr websocket)/" --addr "$(addr mqtt)" --ws-clients 5000 \
    --clients 5000 --concurrency 5000 --pid $ECHO --admin "$(addr admin)" --storm-nice $NICE 2>&1 \
    | grep -E '^(mixed|server CPU|server event loop|  storm )'
  [ -n "${STORM_LOG_LEVEL:-}" ] && cp "$TMP/echo.log" "/tmp/storm-run$run-$router.log"
  kill -TERM $ECHO 2>/dev/null || { echo "the server had exited:"; tail -5 "$TMP/echo.log"; }; wait $ECHO || true
done
done
