#!/usr/bin/env bash
# echo-server's worker processes at scale (`--workers N`, issue 11): what
# several single-threaded workers on the same ports hold and serve, measured
# with echo-loadgen against the supervisor's ports on loopback.
#
#   bash loadtest/workers-scale.sh [--quick] [--out DIR] [--only PART]
#
# PART: conns (conns-ws, conns-over, conns-mqtt), throughput or fanout.
# Environment: WS_WORKERS, WS_STEPS, OVER_STEPS, MQTT_WORKERS, MQTT_STEPS,
# IDLE_RATE, CONNECT_RATE (connections/s while ramping, default 2000),
# CONNS_LAYOUT (part 1: shared, or pinned), LAYOUTS (parts 2 and 3:
# "pinned shared"), FANOUT, FAN_STEPS, FAN_RATE.
#
# 1. conns: idle connections with a low echo rate (one echo per client
#    every 10 s, as issue 11 asks) across workers, in steps:
#    WebSocket on WS_WORKERS workers (default 6: 100,000 connections need six
#    processes' open files, each capped at 20,000 here), then past the fd
#    ceiling of 2 workers (~39,870) to see what stops it, then MQTT clients
#    (subscribed, same low rate) on MQTT_WORKERS workers (default 3).
#    Per-worker connection counts, open fds and accept_fd_exhausted are
#    read from the supervisor's /metrics (`worker="N"` series) once a second
#    by a sampler beside the run; memory is the supervisor's and every
#    worker's RSS summed (echo-loadgen --server-pid counts a process and the
#    processes under it).
# 2. throughput: loadtest/scenarios/ws-throughput.toml and
#    mqtt-throughput.toml (closed loop) against 1 worker, then 2 workers,
#    back to back in one run, in two CPU layouts: `pinned` (lib.sh's: the
#    server, all its workers, on CPU 1, the generator on CPU 0) and `shared`
#    (nothing pinned: the only layout in which two workers can use two
#    cores on a 2-CPU machine, sharing them with the generator).
# 3. fanout: MQTT fan-out (1 publisher + FANOUT subscribers per topic,
#    echo-loadgen --pattern fanout) against 1 worker, 1 worker with the NATS
#    bridge on, and 2 workers bridged over NATS (nats-server on loopback, on
#    the server's side of the pinning). The kernel spreads the clients over
#    the workers (SO_REUSEPORT), so with 2 workers about half of each
#    group's subscribers are on the other worker than their publisher: the
#    bridge's counters (echo_cluster_*) say how many deliveries crossed.
#
# --quick: every part in miniature (a few hundred clients, 2 s holds; under
# 2 minutes: CI runs it). Every run is bounded (connections, holds,
# timeouts); every generator run connects from source addresses no earlier
# run of this script used (127.A.B.2-6, B counting runs), so TIME_WAIT
# ports of a previous run are never in the way. Needs a release build
# (cargo build --release -p echo-server -p echo-loadgen) and nats-server for
# part 3 (skipped, loudly, without it). Results: DIR (default
# loadtest/results/workers-scale-DATE): per run the generator's table
# (.txt) and JSON, the sampler's per-worker series (.workers.tsv), and
# summary.md with every table.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

QUICK=0; OUT=""; ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --only) ONLY=$2; shift ;;
    *) echo "usage: $0 [--quick] [--out DIR] [--only conns|conns-ws|conns-over|conns-mqtt|throughput|fanout]" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$LOADTEST/results/workers-scale-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
ECHO_SERVER=${LOADTEST_ECHO_SERVER:-$ROOT/target/release/echo-server}
LOADGEN=$ROOT/target/release/echo-loadgen
NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server)
for bin in "$ECHO_SERVER" "$LOADGEN"; do
  [ -x "$bin" ] || { echo "no $bin: cargo build --release -p echo-server -p echo-loadgen" >&2; exit 2; }
done

if [ $QUICK = 1 ]; then
  WS_WORKERS=${WS_WORKERS:-3}; WS_STEPS=${WS_STEPS:-300,600}
  OVER_STEPS=""  # the fd ceiling of 2 workers is 40,000 sockets: not in miniature
  MQTT_WORKERS=${MQTT_WORKERS:-3}; MQTT_STEPS=${MQTT_STEPS:-300}
  IDLE_HOLD=2s; IDLE_RATE=${IDLE_RATE:-1}
  TP_HOLD=2s; TP_STEPS=(--steps 200); TP_REPEATS=1; LAYOUTS=${LAYOUTS:-pinned}
  FANOUT=${FANOUT:-10}; FAN_STEPS=${FAN_STEPS:-110}; FAN_RATE=${FAN_RATE:-5}; FAN_HOLD=2s
  # In miniature nothing may fail: an error is exit 3, which fails the script.
  THRESHOLDS=(--max-error-rate 0)
else
  WS_WORKERS=${WS_WORKERS:-6}; WS_STEPS=${WS_STEPS:-20000,50000,80000,100000}
  OVER_STEPS=${OVER_STEPS:-30000,39000,42000}
  MQTT_WORKERS=${MQTT_WORKERS:-3}; MQTT_STEPS=${MQTT_STEPS:-10000,20000,40000}
  IDLE_HOLD=10s; IDLE_RATE=${IDLE_RATE:-0.1}
  TP_HOLD=10s; TP_STEPS=(); TP_REPEATS=${TP_REPEATS:-3}; LAYOUTS=${LAYOUTS:-pinned shared}
  FANOUT=${FANOUT:-20}; FAN_STEPS=${FAN_STEPS:-2100}; FAN_RATE=${FAN_RATE:-5}; FAN_HOLD=10s
  THRESHOLDS=()
fi

PIN=0
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then PIN=1; fi
PIN_SERVER=""; PIN_GEN=()
set_layout() { # pinned | shared
  if [ "$1" = pinned ] && [ $PIN = 1 ]; then PIN_SERVER="taskset -c 1"; PIN_GEN=(taskset -c 0); else PIN_SERVER=""; PIN_GEN=(); fi
}

# Fresh source addresses for every generator run: 127.A.B.2-127.A.B.6, A
# drawn once per invocation, B counting runs (5 addresses: 140,000 ports).
SRC_A=$((RANDOM % 200 + 20)); SRC_B=0
fresh_sources() { SRC_B=$((SRC_B + 1)); SOURCES="127.$SRC_A.$SRC_B.2-127.$SRC_A.$SRC_B.6"; }

NATS_PID=""; SAMPLER_PID=""
TMP=$(mktemp -d)  # the running server's and NATS's logs (each run's server log is kept in OUT)
cleanup() {
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
  stop_server
  if [ -n "$NATS_PID" ]; then kill "$NATS_PID" 2>/dev/null; wait "$NATS_PID" 2>/dev/null; fi
  rm -rf "$TMP"
  return 0
}
trap cleanup EXIT

# start_workers N [VAR=value ...]: echo-server --workers N on loopback,
# ready once the supervisor (not only a worker) says so.
start_workers() {
  local n=$1; shift
  start_echo_server "$TMP/server.log" "$@" -- --workers "$n" --mqtt-listen 127.0.0.1:0 --shutdown-grace 1s
  for _ in $(seq 300); do grep -q '^{"timestamp[^}]*"message":"ready"' "$TMP/server.log" && return 0; sleep 0.1; done
  cat "$TMP/server.log" >&2; echo "the supervisor did not become ready" >&2; return 1
}

# Samples the supervisor's /metrics once a second into FILE (TSV): unix
# time, then per worker: WebSocket connections, MQTT connections, open fds,
# accept_fd_exhausted (both listeners), RSS bytes, connections refused
# (echo_websocket_rejected_total, echo_mqtt_refused_total: all reasons).
start_sampler() { # FILE
  python3 - "http://$ADMIN_ADDR/metrics" "$1" <<'PY' &
import re, sys, time, urllib.request
url, path = sys.argv[1], sys.argv[2]
metrics = {"echo_websocket_connections": "ws", "echo_mqtt_connections": "mqtt", "process_open_fds": "fds",
           "echo_accept_fd_exhausted_total": "fd_exhausted", "process_resident_memory_bytes": "rss",
           "echo_websocket_rejected_total": "ws_rejected", "echo_mqtt_refused_total": "mqtt_refused"}
line = re.compile(r'^(\w+)\{([^}]*)\} (\S+)')
with open(path, "w") as out:
    out.write("time\tworker\t" + "\t".join(metrics.values()) + "\n")
    while True:
        try:
            text = urllib.request.urlopen(url, timeout=3).read().decode()
        except Exception:
            time.sleep(1); continue
        rows = {}
        for l in text.splitlines():
            m = line.match(l)
            if not m or m.group(1) not in metrics: continue
            w = re.search(r'worker="(\d+)"', m.group(2))
            if not w: continue
            row = rows.setdefault(int(w.group(1)), dict.fromkeys(metrics.values(), 0.0))
            row[metrics[m.group(1)]] += float(m.group(3))
        now = time.time()
        for w in sorted(rows):
            r = rows[w]
            out.write(f"{now:.1f}\t{w}\t" + "\t".join(str(int(r[k])) for k in metrics.values()) + "\n")
        out.flush()
        time.sleep(1)
PY
  SAMPLER_PID=$!
}
stop_sampler() { [ -n "$SAMPLER_PID" ] && { kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null || true; }; SAMPLER_PID=""; }

# The kernel's count of connections dropped because a listen queue was
# full (machine-wide: every listener on this machine, not only ours).
listen_overflows() {
  awk '/^TcpExt:/ { if (!n) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; n = 1 } else print $c }' /proc/net/netstat
}

# gen NAME URL ARGS...: one generator run, its table in NAME.txt, its
# result in NAME.json; exit status in NAME.rc (3: a threshold, errors
# expected past the fd ceiling).
gen() {
  local name=$1 url=$2 rc=0 overflows; shift 2
  fresh_sources
  overflows=$(listen_overflows)
  log "$name: echo-loadgen $url $* --source $SOURCES"
  ${PIN_GEN[@]+"${PIN_GEN[@]}"} "$LOADGEN" run "$url" "$@" --source "$SOURCES" --server-pid "$SERVER_PID" \
    --label "$name" --json "$OUT/$name.json" ${THRESHOLDS[@]+"${THRESHOLDS[@]}"} --quiet >"$OUT/$name.txt" 2>&1 || rc=$?
  echo $rc >"$OUT/$name.rc"
  { echo "listen queue overflows during the run (machine-wide): $(($(listen_overflows) - overflows))"
    echo "load average at the end (machine-wide, other work included): $(cut -d' ' -f1-3 /proc/loadavg)"; } | tee "$OUT/$name.kernel.txt"
  cat "$OUT/$name.txt"
}

# server_end NAME: stops the server; a server that had died fails the run.
server_end() {
  stop_sampler
  cp "$TMP/server.log" "$OUT/$1.server.log"
  stop_server
  [ "$SERVER_EXIT" = stopped ] || { echo "$1: echo-server had ended by itself ($SERVER_EXIT)" >&2; exit 1; }
}

# want PART: --only names it, or the group it is in (conns-ws is in conns).
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ] || [ "$ONLY" = "${1%%-*}" ]; }

# 1. Connections across workers.
# Part 1 asks what the machine holds, not what one core does: the workers
# may use both CPUs (pinned, six workers on one core and six generator
# processes on the other ran out of CPU at ~75,000 connections, the SYNs
# the full listen queues dropped retried past the connect timeout), and
# connections come at 2,000/s (at 5,000/s the same).
CONNS_LAYOUT=${CONNS_LAYOUT:-shared}; CONNECT_RATE=${CONNECT_RATE:-2000}
idle=(--rate "$IDLE_RATE" --hold "$IDLE_HOLD" --connect-rate "$CONNECT_RATE" --connect-concurrency 1000)
if want conns-ws; then
  set_layout "$CONNS_LAYOUT"
  start_workers "$WS_WORKERS"
  start_sampler "$OUT/conns-ws-$WS_WORKERS.workers.tsv"
  gen "conns-ws-$WS_WORKERS" "ws://$WS_ADDR/" --steps "$WS_STEPS" "${idle[@]}"
  server_end "conns-ws-$WS_WORKERS"
fi
if want conns-over && [ -n "$OVER_STEPS" ]; then
  set_layout "$CONNS_LAYOUT"
  start_workers 2
  start_sampler "$OUT/conns-ws-2-over.workers.tsv"
  gen conns-ws-2-over "ws://$WS_ADDR/" --steps "$OVER_STEPS" "${idle[@]}"
  server_end conns-ws-2-over
fi
if want conns-mqtt; then
  set_layout "$CONNS_LAYOUT"
  start_workers "$MQTT_WORKERS"
  start_sampler "$OUT/conns-mqtt-$MQTT_WORKERS.workers.tsv"
  gen "conns-mqtt-$MQTT_WORKERS" "mqtt://$MQTT_ADDR" --steps "$MQTT_STEPS" "${idle[@]}" --pipeline-subscribe
  server_end "conns-mqtt-$MQTT_WORKERS"
fi

# 2. One worker against two, closed loop: 1, 2, 1, 2, ... (TP_REPEATS
# pairs), so that a neighbour's load on this shared machine falls on both.
if want throughput; then
  for layout in $LAYOUTS; do
    set_layout "$layout"
    for proto in ws mqtt; do
      for round in $(seq "$TP_REPEATS"); do
        for n in 1 2; do
          start_workers "$n"
          url="ws://$WS_ADDR/"; [ $proto = mqtt ] && url="mqtt://$MQTT_ADDR"
          name="tp-$proto-$layout-$n-$round"
          start_sampler "$OUT/$name.workers.tsv"
          gen "$name" "$url" --scenario "$LOADTEST/scenarios/$proto-throughput.toml" --hold "$TP_HOLD" \
            ${TP_STEPS[@]+"${TP_STEPS[@]}"}
          server_end "$name"
        done
      done
    done
  done
fi

# 3. MQTT fan-out across workers over NATS.
if want fanout; then
  if [ ! -x "$NATS_SERVER" ]; then
    printf '\n*** SKIPPED: no nats-server (apt-get install nats-server): no fan-out across workers. ***\n\n' >&2
  else
    for layout in $LAYOUTS; do
      set_layout "$layout"
      NPORT=$(free_port)
      $PIN_SERVER "$NATS_SERVER" -a 127.0.0.1 -p "$NPORT" >"$TMP/nats.log" 2>&1 &
      NATS_PID=$!
      wait_port 127.0.0.1 "$NPORT"
      for run in 1:off 1:nats 2:nats; do
        n=${run%:*}; env=()
        [ "${run#*:}" = nats ] && env=(ECHO_CLUSTER_NATS_URL="nats://127.0.0.1:$NPORT")
        name="fanout-$layout-$n-${run#*:}"
        start_workers "$n" ${env[@]+"${env[@]}"}
        if [ ${#env[@]} -gt 0 ]; then  # every worker joined NATS
          for _ in $(seq 100); do curl -fsS -o /dev/null "http://$ADMIN_ADDR/readyz" && break; sleep 0.1; done
        fi
        start_sampler "$OUT/$name.workers.tsv"
        gen "$name" "mqtt://$MQTT_ADDR" --steps "$FAN_STEPS" --pattern fanout --fanout "$FANOUT" --rate "$FAN_RATE" \
          --hold "$FAN_HOLD" --connect-rate 2000 --pipeline-subscribe
        curl -fsS "http://$ADMIN_ADDR/metrics" | grep -E '^echo_cluster_[a-z_]*(total)?\{' >"$OUT/$name.cluster.txt" || true
        server_end "$name"
      done
      kill "$NATS_PID"; wait "$NATS_PID" 2>/dev/null || true; NATS_PID=""
    done
  fi
fi

python3 "$LOADTEST/workers-scale-summary.py" "$OUT" | tee "$OUT/summary.md"
# A server that died exited above; a generator that failed (exit 1, 2 or
# 130) fails the script, and so does an error in miniature (exit 3); in a
# full run errors are measured (past the fd ceiling they are the point).
for f in "$OUT"/*.rc; do
  rc=$(cat "$f")
  [ "$rc" = 0 ] || { [ "$rc" = 3 ] && [ $QUICK = 0 ]; } || { echo "$(basename "$f" .rc): echo-loadgen exited $rc" >&2; exit 1; }
done
