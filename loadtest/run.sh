#!/usr/bin/env bash
# The benchmark suite: builds release binaries, installs the peers, and runs
# the standard scenarios against echo-server and the peers with the same
# generator settings, writing results, charts and comparison tables under
# loadtest/results/<date>/.
#
#   loadtest/run.sh                 # everything (~30 minutes)
#   loadtest/run.sh --only ws       # only WebSocket scenarios
#   loadtest/run.sh --only threads  # threads or one event loop? (~10 minutes)
#   loadtest/run.sh --only mqtt-fanout  # 1 publisher to 50 subscribers per topic, QoS 0 and 1 (~5 minutes)
#   ROUTERS="event-loop thread" loadtest/run.sh --only mqtt-fanout  # echo-server once per MQTT router placement
#   LOADTEST_HOLD=5s loadtest/run.sh  # shorter holds, for a quick look
#   LOADTEST_STEPS=200 LOADTEST_HOLD=2s loadtest/run.sh --out /tmp/r   # the whole suite in miniature (CI)
#
# Options:
#   --only ws|mqtt|mqtt-fanout|threads  run only one protocol's scenarios
#                         (mqtt includes the fan-out ones), only the MQTT
#                         fan-out scenarios, or only threads-vs-loop (the
#                         thread-per-connection peers)
#   --servers "a b"       only these servers (echo-server node-ws python-websockets mosquitto
#                         rust-threads rust-threads-64k tokio-mt python-threads;
#                         echo-server-thread echo-server-event-loop with ROUTERS)
#   --out DIR             where results go (default loadtest/results/<date>)
#   --no-pin              do not pin server and generator to separate CPUs
#
# ROUTERS="event-loop thread" runs the MQTT scenarios against echo-server
# once per placement of its MQTT router (mqtt.router), labelled
# echo-server-<placement>; unset, once as configured by default.
#
# The generator and the server share this machine. With 2 or more CPUs the
# server runs on CPU 1 and the generator on CPU 0 (taskset), so neither
# steals the other's core; the report's "gen CPU" column shows whether the
# generator was the bottleneck.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ONLY=""; SERVERS=""; OUT=""; PIN=1
while [ $# -gt 0 ]; do
  case $1 in
    --only) ONLY=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$LOADTEST/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

log "building release binaries"
(cd "$ROOT" && cargo build --release --locked -p echo-server -p echo-loadgen -p echo-peers)
ECHO_SERVER=${LOADTEST_ECHO_SERVER:-$ROOT/target/release/echo-server}
LOADGEN=$ROOT/target/release/echo-loadgen
setup_peers

PIN_SERVER=""; PIN_GEN=""; THREADS=()
if [ $PIN = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_SERVER="taskset -c 1"; PIN_GEN="taskset -c 0"; THREADS=(--threads 1)
fi
HOLD=(); [ -n "${LOADTEST_HOLD:-}" ] && HOLD=(--hold "$LOADTEST_HOLD")
STEPS=(); [ -n "${LOADTEST_STEPS:-}" ] && STEPS=(--steps "$LOADTEST_STEPS")
# Several source addresses: with one, the kernel's search for a free
# ephemeral port slows connect() down once tens of thousands of ports are in
# use or in TIME_WAIT, and that would show up as the server's connect time.
SOURCES=127.0.0.2-127.0.0.9

want_server() { [ -z "$SERVERS" ] || [[ " $SERVERS " == *" $1 "* ]]; }

trap 'stop_server' EXIT
FAILED=(); DIED=()
run_scenario() { # scenario proto servers...
  local scenario=$1 proto=$2; shift 2
  local dir=$OUT/$scenario files=()
  mkdir -p "$dir"
  if [ "$scenario" = threads-vs-loop ]; then
    printf '| server | process at the end | thread_spawn_failed lines | accept_failed lines |\n|---|---|---:|---:|\n' >"$dir/peers.md"
  fi
  local steps=(${STEPS[@]+"${STEPS[@]}"}) fanout
  fanout=$(sed -n 's/^fanout *= *\([0-9]*\).*/\1/p' "$LOADTEST/scenarios/$scenario.toml")
  if [ -n "$fanout" ] && [ ${#steps[@]} -gt 0 ]; then
    # Fan-out clients come in whole groups (1 publisher, $fanout
    # subscribers): LOADTEST_STEPS rounded down to whole groups, at least one.
    steps=(--steps "$(fanout_steps "$LOADTEST_STEPS" $((fanout + 1)))")
  fi
  for server in "$@"; do
    want_server "$server" || continue
    log "$scenario against $server"
    start_server "$server" "$proto"
    local rc=0
    $PIN_GEN "$LOADGEN" run --scenario "$LOADTEST/scenarios/$scenario.toml" "$SERVER_URL" \
      --label "$server" --server-pid "$SERVER_PID" --server-log "$SERVER_LOG" --source "$SOURCES" ${THREADS[@]+"${THREADS[@]}"} ${HOLD[@]+"${HOLD[@]}"} ${steps[@]+"${steps[@]}"} \
      --json "$dir/$server.json" --csv "$dir/$server.csv" --chart "$dir/$server.svg" \
      >"$dir/$server.txt" || rc=$?
    if [ -n "$fanout" ] && [ -n "$SERVER_METRICS" ]; then
      # What the broker says it skipped or dropped: a subscriber that fell
      # behind its topic's log skips messages (QoS 1 too). The router's
      # counters are read once a second.
      sleep 1.2
      curl -s "$SERVER_METRICS" | grep -E '^echo_mqtt_(slow_subscriber_skips|dropped)' >"$dir/$server.prom" || true
    fi
    local log=$SERVER_LOG
    stop_server
    cat "$dir/$server.txt"
    if [ "$scenario" = threads-vs-loop ]; then
      # How the peer failed, from its side: threads it could not create,
      # accepts that failed, and whether it was still running at the end.
      cp "$log" "$dir/$server.log"
      printf '| %s | %s | %s | %s |\n' "$server" "$SERVER_EXIT" \
        "$(grep -c thread_spawn_failed "$log" || true)" "$(grep -c accept_failed "$log" || true)" >>"$dir/peers.md"
    fi
    rm -f "$log"
    if [ $rc -eq 3 ] && [ "$scenario" = threads-vs-loop ] && [ "$SERVER_EXIT" != stopped ]; then
      # A peer that dies under load is what this scenario looks for: a
      # result (peers.md says how), not a failure of the suite.
      DIED+=("$server ($SERVER_EXIT)")
    elif [ $rc -ne 0 ]; then
      FAILED+=("$scenario/$server (exit $rc)")
    fi
    [ -f "$dir/$server.json" ] && files+=("$dir/$server.json")
  done
  if [ ${#files[@]} -gt 0 ]; then
    "$LOADGEN" compare "${files[@]}" --chart "$dir/compare.svg" --markdown "$dir/compare.md" >/dev/null
  fi
  if [ "$scenario" = threads-vs-loop ]; then
    python3 "$LOADTEST/threads-summary.py" "$dir" >"$dir/summary.md"
  elif [ -n "$fanout" ] && [ ${#files[@]} -gt 0 ]; then
    python3 "$LOADTEST/fanout-summary.py" "$dir" >"$dir/summary.md"
  fi
}

# Each of a comma-separated list of connection counts rounded down to a
# multiple of $2, at least $2 (LOADTEST_STEPS for the fan-out scenarios).
fanout_steps() { # steps group
  local out=() n
  IFS=, read -ra list <<<"$1"
  for n in "${list[@]}"; do n=$((n / $2 * $2)); out+=($((n < $2 ? $2 : n))); done
  (IFS=,; echo "${out[*]}")
}

if [ -z "$ONLY" ] || [ "$ONLY" = ws ]; then
  for s in ws-idle-scaling ws-latency-10k ws-throughput; do
    run_scenario "$s" ws echo-server node-ws python-websockets
  done
fi
if [ -z "$ONLY" ] || [ "$ONLY" = threads ]; then
  # A thread per connection against one event loop: every peer on one
  # pinned core, like the rest (tokio-mt then has one worker).
  run_scenario threads-vs-loop ws echo-server rust-threads rust-threads-64k tokio-mt python-threads python-websockets
fi
if [ -z "$ONLY" ] || [ "$ONLY" = mqtt ] || [ "$ONLY" = mqtt-fanout ]; then
  MQTT_SERVERS=(mosquitto)
  if echo_server_has_mqtt; then
    MQTT_SERVERS=()
    if [ -n "${ROUTERS:-}" ]; then
      for router in $ROUTERS; do MQTT_SERVERS+=("echo-server-$router"); done
    else
      MQTT_SERVERS=(echo-server)
    fi
    MQTT_SERVERS+=(mosquitto)
  else
    log "this echo-server has no MQTT listener yet: MQTT scenarios run against mosquitto only"
  fi
  MQTT_SCENARIOS=(mqtt-idle-scaling mqtt-latency-10k mqtt-throughput)
  [ "$ONLY" = mqtt-fanout ] && MQTT_SCENARIOS=()
  # Fan-out: 1 publisher to 50 subscribers per topic, QoS 0 and QoS 1,
  # stepping up the groups until the brokers saturate.
  for s in "${MQTT_SCENARIOS[@]}" mqtt-fanout-qos0 mqtt-fanout-qos1; do
    run_scenario "$s" mqtt "${MQTT_SERVERS[@]}"
  done
fi

# The summary: machine, versions, and every comparison table.
{
  echo "# Load test results $(basename "$OUT")"
  echo
  echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, Linux $(uname -r)."
  if [ -n "$PIN_SERVER" ]; then echo "Server pinned to CPU 1, generator to CPU 0 (one runtime thread)."; fi
  echo
  echo "Versions: echo-server $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), node $(node --version), ws $(node -p "require('$LOADTEST/peers/node/node_modules/ws/package.json').version"), python $("$LOADTEST/peers/python/.venv/bin/python" -c 'import sys, websockets; print(sys.version.split()[0], "websockets", websockets.__version__)'), $("$(command -v mosquitto || echo /usr/sbin/mosquitto)" -h 2>/dev/null | head -1)."
  [ -n "${LOADTEST_HOLD:-}" ] && echo && echo "Holds shortened to $LOADTEST_HOLD (LOADTEST_HOLD)."
  [ -n "${LOADTEST_STEPS:-}" ] && echo && echo "Connection steps replaced by $LOADTEST_STEPS (LOADTEST_STEPS)."
  for md in "$OUT"/*/compare.md; do
    [ -f "$md" ] || continue
    echo; echo "## $(basename "$(dirname "$md")")"; echo
    echo "Last step of each run; ratios are to the first row. Chart: [compare.svg]($(basename "$(dirname "$md")")/compare.svg)."
    echo; cat "$md"
    if [ -f "$(dirname "$md")/peers.md" ]; then
      echo; echo "How each process ended (\"stopped\": still running when the run ended; \"signal 9\": killed, e.g. by the OOM killer), and the failures its log reports:"
      echo; cat "$(dirname "$md")/peers.md"
    fi
    if [ -f "$(dirname "$md")/summary.md" ]; then
      case $(basename "$(dirname "$md")") in
        threads-vs-loop) echo; echo "Each peer's largest step served cleanly, and its first failure (loadtest/threads-summary.py):" ;;
        *) echo; echo "Every step, each server beside Mosquitto (loadtest/fanout-summary.py):" ;;
      esac
      echo; cat "$(dirname "$md")/summary.md"
    fi
  done
  if [ ${#DIED[@]} -gt 0 ]; then echo; echo "Peers whose process died in threads-vs-loop (a result; see its peers.md): ${DIED[*]}"; fi
  if [ ${#FAILED[@]} -gt 0 ]; then echo; echo "Runs that did not finish cleanly: ${FAILED[*]}"; fi
} >"$OUT/README.md"
log "results in $OUT (summary: $OUT/README.md)"
[ ${#FAILED[@]} -eq 0 ]
