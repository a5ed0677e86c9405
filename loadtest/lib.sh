# Shared by the loadtest scripts (run.sh, smoke.sh, hostile.sh, mqtt-*.sh):
# starting and stopping the servers under test on loopback, each on a port
# of its own.
# shellcheck shell=bash

LOADTEST=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$LOADTEST/.." && pwd)

log() { printf '==> %s\n' "$*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # host port [seconds]
  local deadline=$((SECONDS + ${3:-20}))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "nothing listens on $1:$2" >&2; return 1; }
    sleep 0.1
  done
}

# Sets SERVER_PID, SERVER_URL, SERVER_LOG (the server's stdout and stderr)
# and SERVER_METRICS (echo-server only).
# $1: echo-server | node-ws | python-websockets | mosquitto, or one of the
#     threads-vs-loop peers: rust-threads | rust-threads-64k | tokio-mt |
#     python-threads; echo-server-thread and echo-server-event-loop are
#     echo-server with its MQTT router in that place (mqtt.router);
#     $2: ws | mqtt
start_server() {
  local name=$1 proto=$2 port logf
  SERVER_METRICS=""
  logf=$(mktemp)
  SERVER_LOG=$logf
  case $name in
    echo-server|echo-server-thread|echo-server-event-loop)
      local args=() env=()
      [ "$name" != echo-server ] && env=(ECHO_MQTT_ROUTER="${name#echo-server-}")
      if [ "$proto" = mqtt ]; then args+=(--mqtt-listen 127.0.0.1:0); elif echo_server_has_mqtt; then args+=(--no-mqtt); fi
      start_echo_server "$logf" ${env[@]+"${env[@]}"} -- ${args[@]+"${args[@]}"} || return 1
      if [ "$proto" = ws ]; then SERVER_URL="ws://$WS_ADDR/"; else SERVER_URL="mqtt://$MQTT_ADDR"; fi
      SERVER_METRICS="http://$ADMIN_ADDR/metrics"
      ;;
    node-ws)
      port=$(free_port)
      HOST=127.0.0.1 PORT=$port $PIN_SERVER node "$LOADTEST/peers/node/echo.js" 2>"$logf" &
      SERVER_PID=$!
      wait_port 127.0.0.1 "$port"
      SERVER_URL="ws://127.0.0.1:$port/"
      ;;
    python-websockets)
      port=$(free_port)
      $PIN_SERVER "$LOADTEST/peers/python/.venv/bin/python" "$LOADTEST/peers/python/echo.py" 127.0.0.1 "$port" 2>"$logf" &
      SERVER_PID=$!
      wait_port 127.0.0.1 "$port"
      SERVER_URL="ws://127.0.0.1:$port/"
      ;;
    rust-threads|rust-threads-64k|tokio-mt)
      # loadtest/peers/rust (built by run.sh with the rest of the workspace).
      local bin=threaded-echo extra=()
      [ "$name" = tokio-mt ] && bin=tokio-mt-echo
      [ "$name" = rust-threads-64k ] && extra=(--stack-size 64k)
      port=$(free_port)
      $PIN_SERVER "$ROOT/target/release/$bin" --listen "127.0.0.1:$port" ${extra[@]+"${extra[@]}"} >"$logf" 2>&1 &
      SERVER_PID=$!
      wait_port 127.0.0.1 "$port"
      SERVER_URL="ws://127.0.0.1:$port/"
      ;;
    python-threads)
      port=$(free_port)
      $PIN_SERVER "$LOADTEST/peers/python/.venv/bin/python" "$LOADTEST/peers/python/echo_threads.py" 127.0.0.1 "$port" >"$logf" 2>&1 &
      SERVER_PID=$!
      wait_port 127.0.0.1 "$port"
      SERVER_URL="ws://127.0.0.1:$port/"
      ;;
    mosquitto)
      port=$(free_port)
      local conf; conf=$(mktemp --suffix=.conf)
      sed "s/@PORT@/$port/" "$LOADTEST/peers/mosquitto.conf.in" >"$conf"
      $PIN_SERVER "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$conf" 2>"$logf" &
      SERVER_PID=$!
      wait_port 127.0.0.1 "$port"
      SERVER_URL="mqtt://127.0.0.1:$port"
      ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
}

# Starts $ECHO_SERVER on loopback ports the OS picks and reads its addresses
# from its JSON log:
#
#   start_echo_server LOGFILE [VAR=value ...] [-- EXTRA_ARGS ...]
#
# The server runs with --ws-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
# (left out when EXTRA_ARGS have --no-admin) --log-format json and
# EXTRA_ARGS (e.g. --mqtt-listen 127.0.0.1:0, --no-mqtt, --shutdown-grace 1s),
# its stderr in LOGFILE. It reads ECHO_<SECTION>_<KEY> variables as
# configuration: the caller's are kept away from it (CI's REQUIRE_TEST_TOOLS
# and the like), only the VAR=value given here reach it. $PIN_SERVER, if
# set, is the command that pins it ("taskset -c 1", a string or an array).
# Sets SERVER_PID and WS_ADDR, MQTT_ADDR, ADMIN_ADDR (host:port, empty when
# that listener is off); fails, with the log printed, if the server is not
# ready within 10 s.
start_echo_server() {
  local logf=$1 env=() args=(--ws-listen 127.0.0.1:0) pin=() unset=() var admin=1 a
  shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do env+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  for a in "$@"; do [ "$a" = --no-admin ] && admin=0; done
  [ $admin = 1 ] && args+=(--admin-listen 127.0.0.1:0)
  args+=(--log-format json "$@")
  read -ra pin <<<"${PIN_SERVER[*]-}"
  while IFS= read -r var; do unset+=(-u "$var"); done < <(compgen -e | grep '^ECHO_' || true)
  # RUST_LOG would be its log level (as in the Rust test harnesses, kept away).
  unset+=(-u RUST_LOG)
  : >"$logf"  # before the server's redirection does, so that the wait below can read it
  ${pin[@]+"${pin[@]}"} env ${unset[@]+"${unset[@]}"} ${env[@]+"${env[@]}"} "$ECHO_SERVER" "${args[@]}" 2>"$logf" &
  SERVER_PID=$!
  for _ in $(seq 200); do grep -q '"ready"' "$logf" && break; sleep 0.05; done
  grep -q '"ready"' "$logf" || { cat "$logf" >&2; echo "echo-server did not start" >&2; return 1; }
  WS_ADDR=$(listening_addr "$logf" websocket)
  MQTT_ADDR=$(listening_addr "$logf" mqtt)
  ADMIN_ADDR=$(listening_addr "$logf" admin)
}

# The first address echo-server's JSON log (LOGFILE) says it listens on for
# PROTOCOL (websocket, mqtt, admin, ...); empty if none.
listening_addr() { # LOGFILE PROTOCOL
  grep '"listening"' "$1" | grep "\"protocol\":\"$2\"" | grep -o '"addr":"[^"]*"' | head -1 | cut -d'"' -f4 || true
}

# Sets SERVER_EXIT: "stopped" when the server was still running, else how
# it had ended by itself ("exit N", or "signal N": 9 is what the kernel's
# OOM killer sends).
stop_server() {
  [ -n "${SERVER_PID:-}" ] || return 0
  local died=0 rc=0
  # A zombie still answers kill -0: look at the state instead.
  if [ ! -e "/proc/$SERVER_PID" ] || [ "$(cut -d')' -f2 "/proc/$SERVER_PID/stat" 2>/dev/null | awk '{print $1}')" = Z ]; then died=1; fi
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || rc=$?
  if [ $died = 1 ]; then
    if [ $rc -gt 128 ]; then SERVER_EXIT="signal $((rc - 128))"; else SERVER_EXIT="exit $rc"; fi
  else
    SERVER_EXIT=stopped
  fi
  SERVER_PID=""
}

# Whether this echo-server build speaks MQTT yet.
echo_server_has_mqtt() {
  "$ECHO_SERVER" --help 2>/dev/null | grep -q -- '--mqtt-listen'
}

# Installs the peers from the package registries (idempotent).
setup_peers() {
  if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    log "installing mosquitto (Debian)"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get install -y -q mosquitto >/dev/null 2>&1 || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q mosquitto >/dev/null; }
  fi
  if [ ! -d "$LOADTEST/peers/node/node_modules/ws" ]; then
    log "installing ws (npm)"
    (cd "$LOADTEST/peers/node" && npm install --no-audit --no-fund --silent >/dev/null)
  fi
  if [ ! -x "$LOADTEST/peers/python/.venv/bin/python" ]; then
    log "installing websockets (PyPI) into loadtest/peers/python/.venv"
    python3 -m venv "$LOADTEST/peers/python/.venv"
    "$LOADTEST/peers/python/.venv/bin/pip" install -q --disable-pip-version-check -r "$LOADTEST/peers/python/requirements.txt"
  fi
}
