#!/usr/bin/env python3
"""Tables of a loadtest/workers-scale.sh run, as Markdown on stdout.

    python3 loadtest/workers-scale-summary.py DIR

Reads DIR/*.json (echo-loadgen results), DIR/*.workers.tsv (the supervisor's
per-worker series, one sample a second) and DIR/fanout-*.cluster.txt (the
NATS bridge's counters at the end of a fan-out run).
"""
import csv
import glob
import json
import os
import statistics
import sys

from results_lib import step_errors

OUT = sys.argv[1]


def load(name):
    with open(os.path.join(OUT, name + ".json")) as f:
        return json.load(f)


def names(prefix):
    """Runs in the order the script makes them (file times; by name where
    the times are equal, as in a fresh clone, so the order is the same
    every time)."""
    paths = sorted(glob.glob(os.path.join(OUT, prefix + "*.json")), key=lambda p: (os.path.getmtime(p), p))
    return [os.path.basename(p)[:-5] for p in paths]



def fmt_errors(kinds):
    return ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items())) or "0"


def mib(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def us(v):
    if v is None:
        return "-"
    return f"{v / 1000:.1f} ms" if v >= 1000 else f"{v} µs"


def workers_at(name, when):
    """Per-worker rows of the last sample taken at or before `when` (unix s)."""
    path = os.path.join(OUT, name + ".workers.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    times = sorted({float(r["time"]) for r in rows if float(r["time"]) <= when})
    if not times:
        return []
    return [r for r in rows if float(r["time"]) == times[-1]]


def step_ends(result):
    t = result["started_unix_ms"] / 1000
    for step in result["steps"]:
        t += step["ramp_secs"] + step["hold_secs"]
        yield step, t


def conns():
    runs = names("conns-")
    if not runs:
        return
    print("## Connections across workers\n")
    print("Idle clients with a low echo rate, in steps. RSS is the supervisor's and every worker's,")
    print("summed (`--server-pid`); RSS/conn is its growth since before the first connection over")
    print("the connections open (the generator's table beside it has the same per step as")
    print("ΔRSS/conn). Per worker: the supervisor's `/metrics` (`worker=\"N\"`) at the end of the hold.\n")
    print("| run | step | open | errors (ramp + hold) | connects/s | echoed/s | p99 | server RSS MiB | RSS/conn | per worker: connections (open fds) | accept_fd_exhausted | refused by the server |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for name in runs:
        r = load(name)
        proto = "mqtt" if r["protocol"] == "mqtt" else "ws"
        for step, end in step_ends(r):
            d = step["derived"]
            srv = step.get("server") or {}
            per = workers_at(name, end)
            per_txt = " / ".join(f"{int(w[proto]):,} ({int(w['fds']):,})" for w in per) or "-"
            exhausted = sum(int(w["fd_exhausted"]) for w in per) if per else "-"
            refused = sum(int(w.get(f"{proto}_rejected", w.get(f"{proto}_refused", 0)) or 0) for w in per) if per else "-"
            base = (r.get("server_baseline") or {}).get("rss_bytes")
            added = None
            if base is not None and srv.get("rss_bytes") is not None and step["open_connections"]:
                added = (srv["rss_bytes"] - base) / step["open_connections"]
            rate = step["ramp"]["connected"] / step["ramp_secs"] if step["ramp_secs"] else 0
            p99 = step["hold"]["latency"].get("p99_us")
            print(f"| {name} | {step['target_connections']:,} | {step['open_connections']:,} | "
                  f"{fmt_errors(step_errors(step))} | {rate:,.0f} | {d.get('received_per_sec') or 0:,.0f} | {us(p99)} | "
                  f"{mib(srv.get('rss_bytes'))} | {'-' if added is None else f'{added / 1024:.1f} KiB'} | "
                  f"{per_txt} | {exhausted} | {refused} |")
    for name in runs:
        path = os.path.join(OUT, name + ".kernel.txt")
        if os.path.exists(path):
            for line in open(path).read().splitlines():
                print(f"- {name}: {line}")
    print()


def throughput():
    runs = names("tp-")
    if not runs:
        return
    print("## One worker against two (closed loop)\n")
    print("Runs alternate 1, 2, 1, 2, ... worker(s); `ratio` is each 2-worker run's echoed/s over the")
    print("1-worker run just before it. `server CPU` and `gen CPU` are percent of one core.\n")
    print("| protocol | layout | round | workers | open | echoed/s | p50 | p99 | errors | server CPU % | gen CPU % | ratio 2 / 1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    ratios = {}
    for name in runs:
        parts = name.split("-")
        proto, layout, n = parts[1], parts[2], parts[3]
        rnd = parts[4] if len(parts) > 4 else "1"
        step = load(name)["steps"][-1]
        d = step["derived"]
        lat = step["hold"]["latency"]
        ratio = ""
        if n == "2":
            base_name = "-".join(["tp", proto, layout, "1"] + parts[4:])
            base = load(base_name)["steps"][-1]["derived"].get("received_per_sec") or 0
            if base:
                r = (d.get("received_per_sec") or 0) / base
                ratios.setdefault((proto, layout), []).append(r)
                ratio = f"{r:.2f}"
        print(f"| {proto} | {layout} | {rnd} | {n} | {step['open_connections']:,} | {d.get('received_per_sec') or 0:,.0f} | "
              f"{us(lat.get('p50_us'))} | {us(lat.get('p99_us'))} | {fmt_errors(step_errors(step))} | "
              f"{d.get('server_cpu_percent') or 0:.0f} | {d.get('generator_cpu_percent') or 0:.0f} | {ratio} |")
    print()
    print("| protocol | layout | ratios 2 / 1 | median |")
    print("|---|---|---|---:|")
    for (proto, layout), rs in ratios.items():
        print(f"| {proto} | {layout} | {', '.join(f'{r:.2f}' for r in rs)} | {statistics.median(rs):.2f} |")
    print()


def cluster_counters(name):
    path = os.path.join(OUT, name + ".cluster.txt")
    sums = {}
    if os.path.exists(path):
        for line in open(path):
            metric, _, value = line.rpartition(" ")
            key = metric.split("{")[0]
            for direction in ("in", "out"):
                if f'direction="{direction}"' in metric:
                    key += "_" + direction
            sums[key] = sums.get(key, 0) + float(value)
    return sums


def fanout():
    runs = names("fanout-")
    if not runs:
        return
    r0 = load(runs[0])
    fan = r0["settings"]["fanout"]
    print("## MQTT fan-out across workers\n")
    print(f"Groups of 1 publisher + {fan} subscribers on one topic; QoS 0. `delivered/s` counts")
    print("every subscriber's copy; `loss` is the copies the generator found missing (echo_lost,")
    print("echo_timeout: every copy is checked) over published × fan-out; `delivered / expected` is")
    print("received / (published × fan-out) over the hold, copies in flight at its edges included;")
    print("`NATS in` is the messages the workers' bridges took from NATS over the whole run")
    print("(`echo_cluster_messages_total{direction=\"in\"}`), beside every publish the generator")
    print("made (ramp and hold): a publish crosses once to each other worker holding a subscriber")
    print("of its topic. Which worker a client lands on is the kernel's choice (SO_REUSEPORT).\n")
    print("| layout | workers | NATS | clients | published/s | delivered/s | p50 | p99 | loss | delivered / expected | errors | server CPU % | NATS in |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for name in runs:
        _, layout, n, nats = name.split("-")
        r = load(name)
        step = r["steps"][-1]
        d = step["derived"]
        hold = step["hold"]
        expected = hold["sent"] * fan
        lost = sum(n for k, n in step_errors(step).items() if k in ("echo_lost", "echo_timeout"))
        loss = lost / expected if expected else 0
        ratio = hold["received"] / expected if expected else 0
        c = cluster_counters(name)
        published = step["ramp"]["sent"] + hold["sent"]
        crossed = "-"
        if c:
            crossed = (f"{c.get('echo_cluster_messages_total_in', 0):,.0f} of {published:,} publishes, "
                       f"dropped {c.get('echo_cluster_dropped_total', 0):,.0f}")
        print(f"| {layout} | {n} | {nats} | {step['open_connections']:,} | {d.get('sent_per_sec') or 0:,.0f} | "
              f"{d.get('received_per_sec') or 0:,.0f} | {us(hold['latency'].get('p50_us'))} | "
              f"{us(hold['latency'].get('p99_us'))} | {loss:.2%} | {ratio:.4f} | {fmt_errors(step_errors(step))} | "
              f"{d.get('server_cpu_percent') or 0:.0f} | {crossed} |")
    print()


conns()
throughput()
fanout()
