"""What the summary scripts (threads-summary.py, fanout-summary.py,
workers-scale-summary.py) read the same way from echo-loadgen's JSON
results and write the same way in their tables. Imported from the
scripts' own directory (Python puts it on the path)."""


def micros(us):
    """A latency in µs, as the tables write it."""
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.3g} ms"
    return f"{us / 1e6:.3g} s"


def step_errors(step):
    """A step's errors, ramp and hold together, by kind."""
    kinds = {}
    for phase in ("ramp", "hold"):
        for kind, n in step[phase].get("errors", {}).items():
            kinds[kind] = kinds.get(kind, 0) + n
    return kinds


def errors_most_first(step):
    """A step's errors as (kind, count), the most frequent first."""
    return sorted(step_errors(step).items(), key=lambda kv: (-kv[1], kv[0]))
