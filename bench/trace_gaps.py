"""Where the GPU sat idle in a torch.profiler chrome trace, and what the host was doing then.

    python bench/trace_gaps.py out/profile/ours_u1r1_compiled_rank0.json.gz [--top 12] [--min-us 20]

The GPU is busy while any kernel, copy or memset runs on any stream; every other moment between
the first and the last of them is idle. For the largest idle gaps the report names the host
operations (torch ops and Python functions the profiler recorded) that were running at the gap's
middle, outermost first: what the GPU was waiting for. bench/flux_loop.py --profile-out writes
the traces.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import NamedTuple

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "python_function", "user_annotation")


class Gap(NamedTuple):  # not a dataclass: loaded as a file (no module registered), its annotations would not resolve
    start_us: float
    length_us: float


def load_events(path: str | Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The device's busy time as disjoint (start, end) intervals, all streams merged."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_gaps(busy: list[tuple[float, float]], min_us: float = 0.0) -> list[Gap]:
    gaps = [Gap(end, start - end) for (_, end), (start, _) in zip(busy, busy[1:])]
    return [g for g in gaps if g.length_us >= min_us]


def host_ops_at(events: list[dict], moment_us: float, limit: int = 4) -> list[str]:
    """Host operations running at ``moment_us``, outermost (longest) first."""
    running = [e for e in events if e.get("cat") in HOST_CATEGORIES
               and float(e["ts"]) <= moment_us <= float(e["ts"]) + float(e["dur"])]
    running.sort(key=lambda e: -float(e["dur"]))
    return [e["name"][:90] for e in running[:limit]]


def report(path: str | Path, top: int = 12, min_us: float = 20.0) -> str:
    events = load_events(path)
    busy = busy_intervals(events)
    if not busy:
        return f"{path}: no device activity in the trace"
    span = busy[-1][1] - busy[0][0]
    gaps = idle_gaps(busy)
    idle = sum(g.length_us for g in gaps)
    large = [g for g in gaps if g.length_us >= min_us]
    lines = [f"{path}: device span {span / 1e3:.1f} ms, busy {(span - idle) / 1e3:.1f} ms, idle {idle / 1e3:.2f} ms "
             f"({100 * idle / span:.1f}%) in {len(gaps)} gaps; {len(large)} gaps of at least {min_us:g} us hold "
             f"{sum(g.length_us for g in large) / 1e3:.2f} ms"]
    for gap in sorted(large, key=lambda g: -g.length_us)[:top]:
        at = (gap.start_us - busy[0][0]) / 1e3
        ops = " > ".join(host_ops_at(events, gap.start_us + gap.length_us / 2)) or "(no host op recorded)"
        lines.append(f"  {gap.length_us / 1e3:7.3f} ms at {at:8.2f} ms: {ops}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=12, help="how many of the largest gaps to name")
    parser.add_argument("--min-us", type=float, default=20.0, help="gaps shorter than this are only summed")
    args = parser.parse_args(argv)
    for path in args.traces:
        print(report(path, args.top, args.min_us))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
