"""The fan-out table: every step of every server's run of an MQTT fan-out
scenario (echo-loadgen JSON and CSV), side by side, with each server's
deliveries per second and p99 as a ratio to Mosquitto's at the same step.

`echo-loadgen compare` shows the last step of each run only; a fan-out
scenario steps up the load to find where each broker saturates, so every
step matters here: where delivered/s stops following 50 × published/s,
where the latency (from the publisher's scheduled send time to each
subscriber) grows, where deliveries go missing.

    python3 loadtest/fanout-summary.py DIR    # DIR/<server>.json and .csv

Rows in the order of the servers' names, Mosquitto last. Writes Markdown to
stdout. Standard library only."""

import csv
import json
import sys
from pathlib import Path

from results_lib import errors_most_first, micros

BASELINE = "mosquitto"



def count(n):
    return f"{n / 1000:.1f}k" if n >= 10_000 else f"{n:.0f}"



def latencies(path):
    """p50 / p99 / max by step, from the run's CSV (the JSON holds the
    histograms in HdrHistogram's serialised form)."""
    out = {}
    if path.exists():
        for row in csv.DictReader(path.open()):
            if row["latency_p50_us"]:
                out[int(row["target_connections"])] = tuple(int(row[k]) for k in ("latency_p50_us", "latency_p99_us", "latency_max_us"))
    return out


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "-"


def main(d):
    d = Path(d)
    runs = {}
    for path in sorted(d.glob("*.json")):
        r = json.loads(path.read_text())
        runs[path.stem] = (r, latencies(d / f"{path.stem}.csv"))
    if not runs:
        sys.exit(f"no results in {d}")
    names = sorted(runs, key=lambda n: (n == BASELINE, n))
    settings = next(iter(runs.values()))[0]["settings"]
    fanout, rate = settings["fanout"], settings["rate"]
    if isinstance(rate, dict):
        rate = f"{rate['per_second']:g}"
    print(
        f"QoS {settings['qos']}, MQTT {settings['mqtt_version']}, {settings['size']} B, groups of 1 publisher "
        f"and {fanout} subscribers, each publisher at {rate} messages/s, {settings['hold_secs']:.0f} s per step. "
        f"delivered/s counts every message every subscriber received; latency is from the publisher's "
        f"scheduled send time to each subscriber; \"of offered\" is delivered/s over {fanout} × published/s; "
        f"ratios are to {BASELINE} at the same step."
    )
    print()
    print(
        "| groups | conns | server | open | published/s | delivered/s | of offered | p50 | p99 | max | errors "
        "| srv CPU | srv µs/delivery | gen CPU | delivered/s ratio | p99 ratio |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    targets = sorted({s["target_connections"] for r, _ in runs.values() for s in r["steps"]})
    for target in targets:
        groups = target // (fanout + 1)
        rows = {}
        for name in names:
            r, lat = runs[name]
            step = next((s for s in r["steps"] if s["target_connections"] == target), None)
            if step is not None:
                rows[name] = (step, lat.get(target))
        base = rows.get(BASELINE)
        for name, (step, lat) in rows.items():
            dv = step["derived"]
            offered = dv["sent_per_sec"] * fanout
            errs = ", ".join(f"{n} {k}" for k, n in errors_most_first(step)) or "0"
            p99 = lat[1] if lat else None
            base_rate = base[0]["derived"]["received_per_sec"] if base else None
            base_p99 = base[1][1] if base and base[1] else None
            cpu = dv.get("server_cpu_percent")
            per = dv.get("server_cpu_us_per_message")
            print(
                f"| {groups} | {target} | {name} | {step['open_connections']} | {count(dv['sent_per_sec'])} "
                f"| {count(dv['received_per_sec'])} | {dv['received_per_sec'] / offered:.0%} "
                if offered
                else f"| {groups} | {target} | {name} | {step['open_connections']} | 0 | {count(dv['received_per_sec'])} | - ",
                end="",
            )
            print(
                f"| {micros(lat[0]) if lat else '-'} | {micros(lat[1]) if lat else '-'} | {micros(lat[2]) if lat else '-'} "
                f"| {errs} | {f'{cpu:.0f}%' if cpu is not None else '-'} | {f'{per:.2f}' if per is not None else '-'} "
                f"| {dv['generator_cpu_percent']:.0f}% | {ratio(dv['received_per_sec'], base_rate)} | {ratio(p99, base_p99)} |"
            )
    for name in names:
        prom = d / f"{name}.prom"
        if prom.exists():
            lines = [l for l in prom.read_text().splitlines() if l and not l.startswith("#")]
            said = ", ".join(f"`{l.split()[0]}` {float(l.split()[1]):.0f}" for l in lines)
            print()
            print(f"{name}'s own count at the end of the run (/metrics): {said or 'none'}.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
