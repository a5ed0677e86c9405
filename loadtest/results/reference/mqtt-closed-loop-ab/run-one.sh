#!/usr/bin/env bash
# One closed-loop run as recorded here: the server pinned to CPU 0, the
# generator to CPU 1, loadtest/scenarios/mqtt-throughput.toml (1,000
# clients, QoS 0, 64 bytes, 20 s), fresh 127.B.C.1 source address, and
# `perf stat` counting the server's syscalls over 8 s in the middle.
#
#   run-one.sh LABEL SERVER ROUTER     SERVER: an echo-server binary, or mosquitto
#
# Writes $OUT/LABEL.json (echo-loadgen's report) and $OUT/LABEL.perf, and
# prints one line: messages/s, server CPU per message, p99, syscalls per
# message.
set -euo pipefail
OUT=${OUT:-/tmp/closed-loop-ab}
mkdir -p "$OUT"
cd "$(dirname "$0")/../../../.."
# shellcheck source=SCRIPTDIR/../../../lib.sh
source loadtest/lib.sh
# shellcheck disable=SC2034 # read by lib.sh's start_echo_server
PIN_SERVER="taskset -c 0"
if [ "$2" = mosquitto ]; then
  start_server mosquitto mqtt; MQTT_ADDR=${SERVER_URL#mqtt://}
else
  # shellcheck disable=SC2034 # read by lib.sh's start_echo_server
  ECHO_SERVER=$2
  start_echo_server "$OUT/$1.log" ECHO_MQTT_ROUTER="$3" -- --mqtt-listen 127.0.0.1:0
fi
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
B=$(( (RANDOM % 200) + 20 )); C=$(( (RANDOM % 200) + 20 ))
taskset -c 1 ./target/release/echo-loadgen run --scenario loadtest/scenarios/mqtt-throughput.toml "mqtt://$MQTT_ADDR" \
  --server-pid "$SERVER_PID" --source "127.$B.$C.1" --quiet --json "$OUT/$1.json" >/dev/null 2>&1 &
LG=$!
sleep 8
perf stat -x, -e syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_pwait,context-switches \
  -p "$SERVER_PID" -- sleep 8 2>"$OUT/$1.perf"
wait $LG || true
python3 - "$OUT/$1.json" "$OUT/$1.perf" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["steps"][0]; d = s["derived"]; r = d["received_per_sec"]
c = {l.split(",")[2].split(":")[1]: int(l.split(",")[0]) for l in open(sys.argv[2]) if "syscalls" in l and l.split(",")[0].isdigit()}
print(f"{sys.argv[3]:20s} {r:7.0f}/s {d['server_cpu_us_per_message']:5.2f}us p99 {s['hold']['latency']['p99_us']/1000:6.2f}ms "
      f"srv {d['server_cpu_percent']:4.0f}% gen {d['generator_cpu_percent']:4.0f}% err {d['errors']} "
      + " ".join(f"{k[10:]}={v/(8*r):.2f}" for k, v in c.items()))
PY
