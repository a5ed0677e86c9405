"""The threads-vs-loop table: for each peer's result (echo-loadgen JSON),
the largest step it served cleanly (every connection open, no error) with
that step's memory (RSS growth from before the first connection, per
connection), latency, CPU and context switches per message and
threads, then the first step it failed and how (from the JSON and, when
given, run.sh's peers.md: how the process ended, thread creation failures);
then every peer at 1,000 connections, where threads still do fine.

    python3 loadtest/threads-summary.py DIR    # DIR/<peer>.json, DIR/peers.md

Writes Markdown to stdout. Standard library only."""

import csv
import json
import sys
from pathlib import Path

from results_lib import errors_most_first, micros


def size(b):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024



def latencies(d, name, target):
    """p50 / p99 / max of one step, from the run's CSV (the JSON holds the
    histograms in HdrHistogram's serialised form)."""
    path = d / f"{name}.csv"
    if not path.exists():
        return "-"
    for row in csv.DictReader(path.open()):
        if int(row["target_connections"]) == target and row["latency_p50_us"]:
            return " / ".join(micros(int(row[k])) for k in ("latency_p50_us", "latency_p99_us", "latency_max_us"))
    return "-"


def failed(step):
    return step.get("server_exited") or step["open_connections"] < step["target_connections"] or step["derived"]["errors"] > 0



def main(d):
    d = Path(d)
    peers = {}
    if (d / "peers.md").exists():
        for line in (d / "peers.md").read_text().splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) >= 3:
                peers[cells[0]] = (cells[1], int(cells[2] or 0))
    order = [l.split("|")[1].strip() for l in (d / "peers.md").read_text().splitlines()[2:]] if peers else sorted(p.stem for p in d.glob("*.json"))
    print("| server | served cleanly up to | RSS per connection | p50 / p99 / max | CPU per message | context switches per message | threads | first failure, and how |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for name in order:
        path = d / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        base = (r.get("server_baseline") or {}).get("rss_bytes")
        good = [s for s in r["steps"] if not failed(s)]
        # Served cleanly up to the last step before the first failure.
        first_bad = next((s for s in r["steps"] if failed(s)), None)
        if first_bad is not None:
            good = [s for s in good if s["target_connections"] < first_bad["target_connections"]]
        cells = [name]
        if good:
            s = good[-1]
            srv = s.get("server") or {}
            rss = srv.get("rss_bytes")
            lat = latencies(d, name, s["target_connections"])
            per = (rss - base) / s["open_connections"] if rss and base else None
            cells += [
                f"{s['open_connections']:,}",
                size(per) if per is not None else "-",
                lat,
                f"{s['derived']['server_cpu_us_per_message']:.3g} µs" if s["derived"].get("server_cpu_us_per_message") else "-",
                f"{s['derived']['server_ctxt_switches_per_message']:.2g}" if s["derived"].get("server_ctxt_switches_per_message") is not None else "-",
                f"{srv.get('threads', '-'):,}" if isinstance(srv.get("threads"), int) else "-",
            ]
        else:
            cells += ["none", "-", "-", "-", "-", "-"]
        if first_bad is None:
            how = "none up to the last step"
        else:
            parts = []
            if first_bad.get("server_exited"):
                parts.append("the process died")
            ended, spawn = peers.get(name, ("", 0))
            if ended.startswith("signal"):
                parts.append(f"killed by {ended}" + (" (abort)" if ended == "signal 6" else " (SIGKILL: OOM killer?)" if ended == "signal 9" else ""))
            if spawn:
                parts.append(f"{spawn} `thread_spawn_failed` in its log")
            parts.append(
                f"{first_bad['open_connections']:,} of {first_bad['target_connections']:,} open; "
                + ", ".join(f"{k} {n:,}" for k, n in errors_most_first(first_bad)[:3])
            )
            how = f"at {first_bad['target_connections']:,}: " + "; ".join(parts)
        cells.append(how)
        print("| " + " | ".join(cells) + " |")
    # Where threads do fine: every peer at one common, modest step.
    at = 1000
    runs = {name: json.loads((d / f"{name}.json").read_text()) for name in order if (d / f"{name}.json").exists()}
    if not any(s["target_connections"] == at for r in runs.values() for s in r["steps"]):
        return  # a miniature run (LOADTEST_STEPS) has no such step
    print()
    print(f"At {at:,} connections:")
    print()
    print("| server | open | RSS per connection | p50 / p99 / max | CPU per message | context switches per message | threads |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name in order:
        path = d / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        base = (r.get("server_baseline") or {}).get("rss_bytes")
        s = next((s for s in r["steps"] if s["target_connections"] == at), None)
        if s is None:
            continue
        srv = s.get("server") or {}
        rss = srv.get("rss_bytes")
        dv = s["derived"]
        print("| " + " | ".join([
            name,
            f"{s['open_connections']:,}",
            size((rss - base) / s["open_connections"]) if rss and base and s["open_connections"] else "-",
            latencies(d, name, at),
            f"{dv['server_cpu_us_per_message']:.3g} µs" if dv.get("server_cpu_us_per_message") else "-",
            f"{dv['server_ctxt_switches_per_message']:.2g}" if dv.get("server_ctxt_switches_per_message") is not None else "-",
            f"{srv['threads']:,}" if isinstance(srv.get("threads"), int) else "-",
        ]) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
