#!/usr/bin/env bash
# One client must never stall or swell the server: replays each attack of
# loadtest/attacks/hostile.py against a fresh echo-server while a bystander
# (echo-loadgen: 50 WebSocket connections x 20 echoes/s) measures its
# latency, and prints one row per attack: the bystander's p50/p99/max and
# errors, the server's RSS before (after one ordinary client of each kind
# has come and gone) / peak / after, its largest event-loop lag (and, in
# brackets, how late a canary process on the server's CPU ever woke: a
# machine stall shows in both), how many log lines it wrote, and the
# attack's own summary.
#
#   bash loadtest/hostile.sh                      # full size (~7 minutes)
#   bash loadtest/hostile.sh --quick              # miniature, what CI runs (~1.5 minutes)
#   bash loadtest/hostile.sh --only flood-tcp,takeover --out /tmp/h
#
# Options:
#   --quick               small counts, 3 s per attack, 2 s settle
#   --only A[,B]          only these attacks (python3 loadtest/attacks/hostile.py list)
#   --out DIR             where results go (default loadtest/results/<date>-hostile)
#   --strict              an "exceeds" marker fails the run too
#   --no-pin              do not pin server and clients to separate CPUs
#
# Environment (defaults in brackets):
#   HOSTILE_DURATION      seconds each attacker is present [3 quick, 30 full]
#   HOSTILE_SETTLE        seconds after the attacker left until RSS "after" [2 quick, 5 full]
#   HOSTILE_P99_MS        bystander p99 above this is marked "exceeds" [10]
#   HOSTILE_RSS_SLACK     RSS after more than this % above before is marked [10]
#   HOSTILE_RSS_BUDGET_MIB  peak RSS growth above this is marked [off]
#   HOSTILE_CROWD_LIMIT_MIB the server's memory_limit for the crowd attack; a peak RSS over it is marked [256]
#   HOSTILE_LOG_LINES     more server log lines than this in one attack are marked [100]
#   HOSTILE_NICE          niceness of the attacker [19]
#   HOSTILE_RSS_CEILING_MIB  server RSS at which the attacker is stopped early [8192]
#   LOADTEST_ECHO_SERVER  the server binary [target/release/echo-server]
#   LOADTEST_LOADGEN      the bystander binary [target/release/echo-loadgen]
#
# Exit status: 0 the server survived every attack and the bystander saw no
# errors (with --strict: and nothing exceeded its target); 1 otherwise.
# Every attack is bounded: the attacker is killed HOSTILE_DURATION + 15 s
# after it started or when the server's RSS passes the ceiling, the
# bystander's hold is fixed, the server is stopped (SIGKILL after 10 s)
# before the next attack starts.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

QUICK=0; ONLY=""; OUT=""; STRICT=0; PIN=1
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --strict) STRICT=1; shift ;;
    --no-pin) PIN=0; shift ;;
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

ECHO_SERVER=${LOADTEST_ECHO_SERVER:-$ROOT/target/release/echo-server}
LOADGEN=${LOADTEST_LOADGEN:-$ROOT/target/release/echo-loadgen}
ATTACKS_PY=$LOADTEST/attacks/hostile.py
for bin in "$ECHO_SERVER" "$LOADGEN"; do
  [ -x "$bin" ] || { echo "missing $bin: build it with cargo build --release --locked -p echo-server -p echo-loadgen" >&2; exit 2; }
done

if [ $QUICK = 1 ]; then D=${HOSTILE_DURATION:-3}; SETTLE=${HOSTILE_SETTLE:-2}; MODE=quick
else D=${HOSTILE_DURATION:-30}; SETTLE=${HOSTILE_SETTLE:-5}; MODE=full; fi
P99_MS=${HOSTILE_P99_MS:-10}
RSS_SLACK=${HOSTILE_RSS_SLACK:-10}
RSS_BUDGET_MIB=${HOSTILE_RSS_BUDGET_MIB:-}
LOG_LINES=${HOSTILE_LOG_LINES:-100}
RSS_CEILING_MIB=${HOSTILE_RSS_CEILING_MIB:-8192}
CROWD_LIMIT_MIB=${HOSTILE_CROWD_LIMIT_MIB:-256}
LEAD=1                # the bystander's pre-check and ramp, before the attack starts
HOLD=$((D + 2))       # the bystander measures from ~LEAD before the attack to ~1 s after it
NICE=${HOSTILE_NICE:-19}
GRACE=15              # an attacker still running D + GRACE seconds after it started is killed

ALL=$(python3 "$ATTACKS_PY" list)
if [ -n "$ONLY" ]; then
  for a in ${ONLY//,/ }; do grep -qx -- "$a" <<<"$ALL" || { echo "unknown attack $a; one of: $(echo $ALL)" >&2; exit 2; }; done
  ATTACKS=${ONLY//,/ }
else
  ATTACKS=$ALL
fi

OUT=${OUT:-$LOADTEST/results/$(date -u +%Y%m%d-%H%M%S)-hostile}
mkdir -p "$OUT"
ROWS=$OUT/rows.jsonl
: >"$ROWS"

# Server on CPU 0; bystander, attacker and RSS sampler on CPU 1, the
# attacker at nice 19 so that its busy loop does not delay the bystander's
# own sends and receives: what is measured is the server (in one run beside
# flood-ws, the bystander's p99 was 210 ms with the attacker at nice 0 and
# 43 ms at 19). On a machine busy with other work that also starves the
# attacker: its counts (sent, "of") show how hard it actually pushed.
PIN_SERVER=(); PIN_GEN=()
if [ $PIN = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  PIN_SERVER=(taskset -c 0); PIN_GEN=(taskset -c 1)
fi

SERVER_PID=""; BYSTANDER_PID=""; ATTACKER_PID=""; SAMPLER_PID=""; CANARY_PID=""
cleanup() {
  # The attacker and bystander run under timeout(1), which passes a signal
  # on to its child: TERM to the attacker, INT (its Ctrl-C) to echo-loadgen.
  [ -n "$ATTACKER_PID" ] && kill -TERM "$ATTACKER_PID" 2>/dev/null || true
  [ -n "$BYSTANDER_PID" ] && kill -INT "$BYSTANDER_PID" 2>/dev/null || true
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null || true
  [ -n "$CANARY_PID" ] && kill "$CANARY_PID" 2>/dev/null || true
  stop_server
}
trap cleanup EXIT

# A canary beside the server, pinned to its CPU: how late a process that
# sleeps 10 ms at a time wakes up, the largest in DIR/canary.txt (ms). When
# the machine itself stalls that CPU (this VM's host has taken it away for
# seconds; two load tests on one CPU have starved a waiting process for
# 30 s), the canary is late as well as the server's event loop; a loop lag
# the canary did not see is the server's own.
start_canary() { # dir
  ${PIN_SERVER[@]+"${PIN_SERVER[@]}"} python3 -c '
import sys, time
worst = 0.0
while True:
    t = time.monotonic(); time.sleep(0.01); late = time.monotonic() - t - 0.01
    if late > worst:
        worst = late
        with open(sys.argv[1], "w") as f:
            f.write(f"{worst * 1000:.1f}\n")
' "$1/canary.txt" &
  CANARY_PID=$!
}

rss_kib() { # VmRSS of a process, in KiB; empty if it is gone
  local k v _
  while read -r k v _; do [ "$k" = VmRSS: ] && { echo "$v"; return; }; done 2>/dev/null <"/proc/$1/status" || true
}

run_attack() { # name
  local name=$1 dir=$OUT/$1
  mkdir -p "$dir"
  log "$name: fresh server, bystander, attack for ${D}s, RSS ${SETTLE}s after it left"
  # The crowd is many clients within their own caps: what bounds them is
  # the server-wide memory budget, which this attack is run with.
  local limit_mib="" env=()
  if [ "$name" = crowd ]; then limit_mib=$CROWD_LIMIT_MIB; env=(ECHO_SERVER_MEMORY_LIMIT=$((limit_mib << 20))); fi
  # A fresh server, its log in dir/server.log. start_echo_server keeps the
  # caller's ECHO_* configuration variables away from it; this sets one: a
  # stats line (with loop_lag_max_ms) per second.
  start_echo_server "$dir/server.log" ECHO_SERVER_STATS_INTERVAL=1s ${env[@]+"${env[@]}"} \
    -- --mqtt-listen 127.0.0.1:0 --shutdown-grace 1s
  # "Before" is a server that has served one client of each kind: what the
  # first clients cost (the router's heap arena, code paths paged in) is
  # not what an attacker kept.
  ${PIN_GEN[@]+"${PIN_GEN[@]}"} python3 "$ATTACKS_PY" warmup --mqtt "$MQTT_ADDR" --ws "$WS_ADDR" --duration 5 \
    >"$dir/warmup.json" 2>&1 || { cat "$dir/warmup.json" >&2; echo "$name: the warm-up failed" >&2; }
  sleep 1
  local before; before=$(rss_kib "$SERVER_PID")
  local lines_before; lines_before=$(wc -l <"$dir/server.log")
  # RSS every 100 ms until the "after" reading; past the ceiling the
  # attacker is stopped (its pid is in attacker.pid while it runs).
  rm -f "$dir/attacker.pid"
  (while kill -0 "$SERVER_PID" 2>/dev/null; do
     r=$(rss_kib "$SERVER_PID"); echo "$r"
     if [ -n "$r" ] && [ "$r" -gt $((RSS_CEILING_MIB * 1024)) ] && [ -s "$dir/attacker.pid" ]; then
       kill -TERM "$(cat "$dir/attacker.pid")" 2>/dev/null && echo ceiling >"$dir/ceiling"; rm -f "$dir/attacker.pid"
     fi
     sleep 0.1
   done) >"$dir/rss.txt" &
  SAMPLER_PID=$!
  start_canary "$dir"
  local brc=0 arc=0
  ${PIN_GEN[@]+"${PIN_GEN[@]}"} timeout -s INT -k 5 $((HOLD + 30)) "$LOADGEN" run "ws://$WS_ADDR/" --steps 50 --rate 20 \
    --hold "${HOLD}s" --threads 1 --quiet --label bystander --server-pid "$SERVER_PID" \
    --json "$dir/bystander.json" >"$dir/bystander.txt" 2>&1 &
  BYSTANDER_PID=$!
  sleep $LEAD
  local quick=(); [ $QUICK = 1 ] && quick=(--quick)
  ${PIN_GEN[@]+"${PIN_GEN[@]}"} nice -n "$NICE" timeout -k 2 $((D + GRACE)) python3 "$ATTACKS_PY" "$name" \
    --mqtt "$MQTT_ADDR" --ws "$WS_ADDR" --admin "$ADMIN_ADDR" --duration "$D" ${quick[@]+"${quick[@]}"} \
    --healthcheck "$ECHO_SERVER healthcheck --addr $ADMIN_ADDR" >"$dir/attack.json" 2>"$dir/attack.err" &
  ATTACKER_PID=$!
  echo "$ATTACKER_PID" >"$dir/attacker.pid"
  wait "$ATTACKER_PID" || arc=$?
  ATTACKER_PID=""; rm -f "$dir/attacker.pid"
  local left=$SECONDS
  wait "$BYSTANDER_PID" || brc=$?
  BYSTANDER_PID=""
  local rest=$((SETTLE - (SECONDS - left)))
  if [ $rest -gt 0 ]; then sleep $rest; fi
  local after alive=1
  after=$(rss_kib "$SERVER_PID")
  # Once (crowd, in a full run) the reading came back empty from a
  # server that was alive and stopped cleanly right after: read again
  # before calling it dead.
  for _ in 1 2 3; do
    [ -n "$after" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1; after=$(rss_kib "$SERVER_PID")
  done
  kill -0 "$SERVER_PID" 2>/dev/null && [ -n "$after" ] || alive=0
  kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""
  kill "$CANARY_PID" 2>/dev/null || true; wait "$CANARY_PID" 2>/dev/null || true; CANARY_PID=""
  local window; window=$(tail -n +"$((lines_before + 1))" "$dir/server.log" | wc -l)
  stop_server
  python3 - "$name" "$dir" "$lines_before" "$before" "${after:-}" "$alive" "$arc" "$brc" \
    "$P99_MS" "$RSS_SLACK" "${RSS_BUDGET_MIB:-}" "$D" "$window" "$LOG_LINES" "$limit_mib" >>"$ROWS" <<'PY'
import json, sys
name, d, lines_before, before, after, alive, arc, brc, p99_ms, slack, budget, dur, window, log_limit, limit = sys.argv[1:]
alive, arc, brc = alive == "1", int(arc), int(brc)
row = {"attack": name, "server_alive": alive, "attacker_exit": arc, "bystander_exit": brc}

# The attack's own summary (one JSON line), or what went wrong.
try:
    row["attack_summary"] = json.loads(open(f"{d}/attack.json").read().strip().splitlines()[-1])
except (OSError, IndexError, ValueError):
    err = open(f"{d}/attack.err").read().strip().splitlines()
    row["attack_summary"] = {"error": (err[-1] if err else "no output") + (" (killed at the wall-clock limit)" if arc in (124, 137) else "")}

# Bystander: latency and errors over its hold (and its ramp).
try:
    b = json.load(open(f"{d}/bystander.json"))
    step = b["steps"][-1]
    lat = step["hold"]["latency"]
    errors = {}
    for s in b["steps"]:
        for part in ("ramp", "hold"):
            for k, v in s[part]["errors"].items():
                errors[k] = errors.get(k, 0) + v
    row["bystander"] = {"p50_ms": lat["p50_us"] and lat["p50_us"] / 1000, "p99_ms": lat["p99_us"] and lat["p99_us"] / 1000,
                        "max_ms": lat["max_us"] and lat["max_us"] / 1000, "echoes": lat["count"],
                        "sent": step["hold"]["sent"], "open": step["open_connections"], "errors": errors}
except (OSError, ValueError, KeyError, IndexError):
    tail = open(f"{d}/bystander.txt").read().strip().splitlines()
    row["bystander"] = {"errors": {"no_result": 1}, "note": tail[-1] if tail else f"exit {brc}"}

# Server RSS (KiB -> MiB): before, peak of the 100 ms samples, after.
rss = [int(x) for x in open(f"{d}/rss.txt").read().split() if x.isdigit()]
mib = lambda k: round(int(k) / 1024, 1)
row["rss_mib"] = {"before": mib(before), "peak": mib(max(rss + [int(before)] + ([int(after)] if after else []))),
                  "after": mib(after) if after else None}

# Server log from the bystander's start to the "after" reading: lines other
# than the per-second stats line, by level and message, and the largest
# event-loop lag the stats lines reported.
lines = open(f"{d}/server.log", errors="replace").read().splitlines()[int(lines_before):][: int(window)]
lag, count, levels, top = 0.0, 0, {}, {}
for line in lines:
    try:
        e = json.loads(line)
    except ValueError:
        count += 1
        continue
    if e.get("message") == "stats":
        lag = max(lag, float(e.get("loop_lag_max_ms", 0)))
        continue
    count += 1
    levels[e.get("level", "?")] = levels.get(e.get("level", "?"), 0) + 1
    msg = e.get("message", "")[:80]
    top[msg] = top.get(msg, 0) + 1
row["loop_lag_max_ms"] = lag
try:
    row["canary_max_ms"] = float(open(f"{d}/canary.txt").read())
except (OSError, ValueError):
    row["canary_max_ms"] = None
row["log_lines"] = count
row["log_levels"] = levels
row["log_top"] = sorted(top.items(), key=lambda kv: -kv[1])[:3]

fail, exceeds = [], []
if not alive:
    fail.append("server died")
berr = sum(row["bystander"]["errors"].values())
if berr:
    fail.append(f"bystander errors {berr}")
if brc not in (0,):
    fail.append(f"bystander exit {brc}")
p99 = row["bystander"].get("p99_ms")
if p99 is not None and p99 > float(p99_ms):
    exceeds.append(f"p99>{p99_ms}ms")
r = row["rss_mib"]
if limit:
    # Retained messages and sessions that outlive their clients stay, as
    # MQTT wants: what is checked is that the server never passed its limit.
    row["memory_limit_mib"] = int(limit)
    if r["peak"] >= int(limit):
        exceeds.append(f"RSS peak over the {limit} MiB memory_limit")
elif r["after"] is not None and r["after"] > r["before"] * (1 + float(slack) / 100):
    exceeds.append(f"RSS after >{slack}% over before")
if budget and r["peak"] - r["before"] > float(budget):
    exceeds.append(f"RSS peak >{budget} MiB over before")
hc = row["attack_summary"].get("healthcheck_failures")
if hc:
    exceeds.append(f'healthchecks failed {hc}/{row["attack_summary"]["healthchecks"]}')
if log_limit and count > int(log_limit):
    exceeds.append(f"log lines >{log_limit}")
import os
if os.path.exists(f"{d}/ceiling"):
    exceeds.append("attacker stopped at the RSS ceiling")
elif arc in (124, 137):
    exceeds.append(f"attacker killed at {int(dur) + 15}s")
row["fail"], row["exceeds"] = fail, exceeds
print(json.dumps(row, separators=(",", ":")))
PY
  print_row "$(tail -1 "$ROWS")"
  # Keep the directory small: the log is counted above, its head is kept.
  if [ "$(wc -l <"$dir/server.log")" -gt 2000 ]; then
    head -2000 "$dir/server.log" >"$dir/server.log.head" && rm "$dir/server.log"
  fi
}

TABLE_HEAD='| attack | bystander p50 / p99 / max | bystander errors | server RSS before / peak / after | loop lag max (canary) | log lines | verdict | attack summary |
|---|---|---:|---|---:|---:|---|---|'

print_row() { # one row of rows.jsonl as a markdown table row
  python3 - "$1" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
b, m = r["bystander"], r["rss_mib"]
fmt = lambda x: "-" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")
lat = f'{fmt(b.get("p50_ms"))} / {fmt(b.get("p99_ms"))} / {fmt(b.get("max_ms"))} ms' if "p99_ms" in b else "-"
err = sum(b["errors"].values())
errs = str(err) + (" (" + ", ".join(f"{k} {v}" for k, v in b["errors"].items()) + ")" if err else "")
if b.get("sent") and b.get("echoes", 0) < b["sent"] * 0.99:  # latency is of the echoes that came back
    errs += f'; {b["echoes"]} of {b["sent"]} echoed'

after = "-" if m["after"] is None else f'{m["after"]}'
verdict = "; ".join(["FAIL: " + x for x in r["fail"]] + ["exceeds: " + x for x in r["exceeds"]]) or "ok"
s = dict(r["attack_summary"]); s.pop("attack", None); s.pop("quick", None)
levels = ", ".join(f"{k} {v}" for k, v in sorted(r["log_levels"].items()))
logs = str(r["log_lines"]) + (f" ({levels})" if levels else "")
canary = "" if r.get("canary_max_ms") is None else f' ({r["canary_max_ms"]:.1f})'
print(f'| {r["attack"]} | {lat} | {errs} | {m["before"]} / {m["peak"]} / {after} MiB | {r["loop_lag_max_ms"]:.1f} ms{canary} | '
      f'{logs} | {verdict} | `{json.dumps(s, separators=(",", ":"))}` |')
PY
}

log "hostile: $MODE, $D s per attack, against $ECHO_SERVER; results in $OUT"
echo "$TABLE_HEAD"
for a in $ATTACKS; do run_attack "$a"; done

# The report: the table, the settings and the machine, like run.sh's.
{
  echo "# Hostile clients ($MODE)"
  echo
  echo "\`bash loadtest/hostile.sh$([ $QUICK = 1 ] && echo ' --quick')\` at $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB, Linux $(uname -r);"
  echo "server pinned: $([ ${#PIN_SERVER[@]} -gt 0 ] && echo 'CPU 0, bystander and attacker CPU 1' || echo no). Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Each attacker present ${D} s; bystander: 50 WebSocket connections x 20 echoes/s, 64 B, hold ${HOLD} s;"
  echo "RSS after: ${SETTLE} s after the attacker left. Marks: bystander p99 > ${P99_MS} ms, RSS after > ${RSS_SLACK}% over before$([ -n "$RSS_BUDGET_MIB" ] && echo ", peak > $RSS_BUDGET_MIB MiB over before"), log lines > ${LOG_LINES}, any failed healthcheck."
  echo
  echo "$TABLE_HEAD"
  while IFS= read -r row; do print_row "$row"; done <"$ROWS"
} >"$OUT/README.md"

python3 - "$ROWS" "$STRICT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fails = [(r["attack"], x) for r in rows for x in r["fail"]]
exceeds = [(r["attack"], x) for r in rows for x in r["exceeds"]]
for a, x in fails:
    print(f"FAIL {a}: {x}", file=sys.stderr)
for a, x in exceeds:
    print(f"exceeds {a}: {x}", file=sys.stderr)
json.dump(rows, open(sys.argv[1].replace("rows.jsonl", "results.json"), "w"), indent=1)
bad = fails or (sys.argv[2] == "1" and exceeds)
print(f"==> hostile: {len(rows)} attacks, {len(fails)} failures, {len(exceeds)} over target"
      + (" (--strict: failing)" if sys.argv[2] == "1" and exceeds else ""), file=sys.stderr)
sys.exit(1 if bad else 0)
PY
