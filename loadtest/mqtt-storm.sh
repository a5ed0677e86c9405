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
# Other ECHO_* variables do not reach the server (lib.sh's start_echo_server).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
RUNS=${1:-3}
PIN=1; [ "${2:-}" = --no-pin ] && PIN=0
LOADGEN=./target/release/echo-loadgen
ECHO_SERVER=./target/release/echo-server
TMP=$(mktemp -d)
trap 'stop_server; kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
PIN_SERVER=(); PIN_GEN=(); NICE=0
if [ $PIN = 1 ] && [ "$(nproc)" -ge 2 ]; then PIN_SERVER=(taskset -c 0); PIN_GEN=(taskset -c 1); NICE=19; fi

for run in $(seq "$RUNS"); do
for router in ${ROUTERS:-${ECHO_MQTT_ROUTER:-default}}; do
  router_env=(); [ "$router" != default ] && router_env=(ECHO_MQTT_ROUTER="$router")
  start_echo_server "$TMP/echo.log" ${router_env[@]+"${router_env[@]}"} \
    -- --mqtt-listen 127.0.0.1:0 --log-level "${STORM_LOG_LEVEL:-warn,echo_server=info}"
  echo "run $run/$RUNS (router: $router)"
  "${PIN_GEN[@]}" $LOADGEN mixed "ws://$WS_ADDR/" "mqtt://$MQTT_ADDR" \
    --ws-clients "${STORM_WS_CLIENTS:-5000}" --mqtt-clients "${STORM_MQTT_CLIENTS:-5000}" --before "${STORM_BEFORE:-10s}" \
    --pipeline-subscribe --server-pid "$SERVER_PID" --server-metrics "http://$ADMIN_ADDR/metrics" --mqtt-nice $NICE --quiet
  [ -n "${STORM_LOG_LEVEL:-}" ] && cp "$TMP/echo.log" "/tmp/storm-run$run-$router.log"
  stop_server
  [ "$SERVER_EXIT" = stopped ] || { echo "the server had exited:"; tail -5 "$TMP/echo.log"; }
done
done
