#!/usr/bin/env bash
# The benchmark suite in miniature, for CI: a few hundred connections for a
# few seconds against echo-server (WebSocket, and MQTT once the server has
# it) and Mosquitto, with thresholds (scenarios/smoke.toml) that only a
# broken server or generator crosses; then merge and compare of the
# results. Exits non-zero on any failure.
#
#   loadtest/smoke.sh            # debug build (shares CI's test build)
#   PROFILE=release loadtest/smoke.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PROFILE=${PROFILE:-debug}
log "building ($PROFILE)"
if [ "$PROFILE" = release ]; then FLAG=(--release); else FLAG=(); fi
(cd "$ROOT" && cargo build --locked "${FLAG[@]}" -p echo-server -p echo-loadgen)
ECHO_SERVER=${LOADTEST_ECHO_SERVER:-$ROOT/target/$PROFILE/echo-server}
LOADGEN=$ROOT/target/$PROFILE/echo-loadgen
PIN_SERVER=""
OUT=$(mktemp -d)
trap 'stop_server; rm -rf "$OUT"' EXIT

smoke_on() { # name [extra args]: against the server started last
  local name=$1; shift
  log "smoke: $name"
  local probe=(--server-pid "$SERVER_PID")
  [ -n "$SERVER_METRICS" ] && probe=(--server-metrics "$SERVER_METRICS")
  "$LOADGEN" run --scenario "$LOADTEST/scenarios/smoke.toml" "$SERVER_URL" --label "$name" "${probe[@]}" \
    --json "$OUT/$name.json" --csv "$OUT/$name.csv" --chart "$OUT/$name.svg" "$@"
}

smoke() { # name server proto [extra args]: against a server of its own
  local name=$1 server=$2 proto=$3; shift 3
  start_server "$server" "$proto"
  smoke_on "$name" "$@"
  stop_server
}

# Two runs against one server (merge refuses runs against different URLs).
start_server echo-server ws
smoke_on ws-echo-server
smoke_on ws-echo-server-2workers --workers 2 --source 127.0.0.2-127.0.0.3
stop_server
if echo_server_has_mqtt; then
  smoke mqtt-echo-server echo-server mqtt --qos 1
fi
if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then
  smoke mqtt-mosquitto mosquitto mqtt --qos 1
  smoke mqtt-mosquitto-fanout mosquitto mqtt --pattern fanout --fanout 9 --mqtt-version 5
else
  log "mosquitto not installed: MQTT smoke skipped (apt-get install mosquitto)"
  [ "${REQUIRE_TEST_TOOLS:-0}" = 1 ] && { echo "mosquitto required" >&2; exit 1; }
fi

log "smoke: merge and compare"
"$LOADGEN" merge "$OUT/ws-echo-server.json" "$OUT/ws-echo-server-2workers.json" --json "$OUT/merged.json" >/dev/null
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
a, b, m = (json.load(open(f"{out}/{n}.json")) for n in ("ws-echo-server", "ws-echo-server-2workers", "merged"))
for i, s in enumerate(m["steps"]):
    for key in ("sent", "received"):
        assert s["hold"][key] == a["steps"][i]["hold"][key] + b["steps"][i]["hold"][key], key
    assert s["hold"]["latency"]["count"] == s["hold"]["received"]
    assert s["open_connections"] == a["steps"][i]["open_connections"] + b["steps"][i]["open_connections"]
print("merge: counts add up")
PY
"$LOADGEN" compare "$OUT"/ws-echo-server.json "$OUT"/ws-echo-server-2workers.json --chart "$OUT/compare.svg" --markdown "$OUT/compare.md" >/dev/null
grep -q '<svg' "$OUT/compare.svg"
log "smoke: all passed"
