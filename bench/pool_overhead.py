"""Warm-pool overhead per job: the pool's wall time for a job minus the engine's own sampling time.

Runs anywhere (two CPU workers by default, or --devices cuda:0,cuda:1). The model is a tiny
random Flux, so the job is short and the fixed cost of a job (sending the request through
shared memory, the per-step progress messages, returning the result) is what shows.
``--payload-mb`` adds a tensor the engine ignores (in ``request.extra``) so the request weighs
what a real one does (a 512-token T5 context in float32 is 8 MB).

    python bench/pool_overhead.py [--devices cpu,cpu] [--jobs 20] [--payload-mb 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from comfy_xdit.config import ParallelConfig  # noqa: E402
from comfy_xdit.demo import demo_request, write_demo_checkpoint  # noqa: E402
from comfy_xdit.pool import WorkerPool  # noqa: E402
from comfy_xdit.requests import ModelSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu,cpu")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--payload-mb", type=float, default=0.0, help="extra request weight, ignored by the engine")
    args = parser.parse_args()

    devices = tuple(args.devices.split(","))
    config = ParallelConfig(ulysses_degree=len(devices), devices=devices)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = write_demo_checkpoint(Path(scratch) / "flux.safetensors")
        request = demo_request(args.size, args.steps, seed=0)
        if args.payload_mb:
            request.extra["ballast"] = torch.randn(int(args.payload_mb * 2**20) // 4)
        with WorkerPool(config) as pool:
            pool.load(ModelSpec(str(checkpoint), dtype="float32" if devices[0] == "cpu" else "bfloat16"))
            pool.sample(request)  # warm-up
            overheads, walls, breakdowns = [], [], []
            for _ in range(args.jobs):
                pool.sample(request)
                job = pool.status()["last_job"]
                overheads.append(job["overhead_seconds"] * 1000)
                walls.append(job["seconds"] * 1000)
                if job.get("overhead_ms"):
                    breakdowns.append(job["overhead_ms"])
    print(
        f"devices {', '.join(devices)}, {args.jobs} warm jobs of {args.steps} steps at {args.size}x{args.size}"
        f"{f', +{args.payload_mb:g} MB payload' if args.payload_mb else ''}, torch {torch.__version__}"
    )
    print(f"job wall time: median {statistics.median(walls):.1f} ms")
    print(f"overhead per job (wall - engine): median {statistics.median(overheads):.1f} ms, max {max(overheads):.1f} ms")
    if breakdowns:
        keys = list(breakdowns[0])
        print("breakdown per job, median (max) ms:")
        for key in keys:
            values = [b[key] for b in breakdowns]
            print(f"  {key:20s} {statistics.median(values):7.2f} ({max(values):.2f})")


if __name__ == "__main__":
    main()
