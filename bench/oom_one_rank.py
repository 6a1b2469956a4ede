"""A real CUDA out-of-memory on one rank of a 2-GPU pool: a clear error within 10 s, nothing left, next job fine.

The CPU tests simulate the out-of-memory with the testing hook (tests/test_faults.py); this
script provokes a real one. This process fills all but ``--leave-mib`` of the second GPU's
free memory with a ballast tensor after a warm job, then asks for a larger image: rank 1's
next allocation fails while rank 0 waits for it in a collective. It checks that the pool
raises WorkerOutOfMemoryError naming rank 1 and what to change within 10 s, that both workers
are gone and no shared-memory segment is left, and that after the ballast is freed the same
job on the restarted pool succeeds and equals the result before the failure.

    python bench/oom_one_rank.py [--devices cuda:0,cuda:1] [--size 2048] [--leave-mib 64]

Prints one line per check and exits non-zero if one fails (2: no out-of-memory was provoked;
raise --size or lower --leave-mib).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from comfy_xdit.config import ParallelConfig  # noqa: E402
from comfy_xdit.demo import demo_request, write_demo_checkpoint  # noqa: E402
from comfy_xdit.pool import WorkerOutOfMemoryError, WorkerPool, shm  # noqa: E402
from comfy_xdit.requests import ModelSpec  # noqa: E402


def check(ok: bool, what: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cuda:0,cuda:1")
    parser.add_argument("--size", type=int, default=2048, help="image size of the job that should not fit")
    parser.add_argument("--warm-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--leave-mib", type=int, default=64, help="free memory left on the second GPU")
    args = parser.parse_args()

    devices = tuple(args.devices.split(","))
    victim = torch.device(devices[1])
    config = ParallelConfig(ulysses_degree=len(devices), devices=devices)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        spec = ModelSpec(str(write_demo_checkpoint(Path(scratch) / "flux.safetensors")), dtype="bfloat16")
        with WorkerPool(config, job_timeout_s=120) as pool:
            pool.load(spec)
            pool.sample(demo_request(args.warm_size, args.steps, seed=0))
            big = demo_request(args.size, args.steps, seed=1)
            before = pool.sample(big) if args.size <= args.warm_size else None
            old_pids = pool.status()["pids"]

            free, _ = torch.cuda.mem_get_info(victim)
            ballast = torch.empty(max(0, free - args.leave_mib * 2**20), dtype=torch.uint8, device=victim)
            print(f"ballast of {ballast.numel() / 2**30:.2f} GiB on {victim}; {args.leave_mib} MiB left", flush=True)
            started = time.monotonic()
            try:
                pool.sample(big)
                print("no out-of-memory happened: raise --size or lower --leave-mib", flush=True)
                return 2
            except WorkerOutOfMemoryError as error:
                elapsed = time.monotonic() - started
                message = str(error)
                print(message.splitlines()[0], flush=True)
                results.append(check(elapsed < 10, f"error {elapsed:.1f} s after the job started (< 10 s)"))
                results.append(check("worker rank 1" in message and "ran out of memory" in message, "names rank 1"))
                results.append(check("pipefusion_parallel_degree" in message, "says what to change"))
            del ballast
            torch.cuda.empty_cache()
            gone = all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in old_pids)
            results.append(check(gone, "both old workers are gone"))
            results.append(check(set(shm.our_segments(os.getpid())) <= set(pool.status()["shared_memory"]),
                                 "no shared-memory segment of the failed job is left"))
            after = pool.sample(big)
            results.append(check(set(pool.status()["pids"]).isdisjoint(old_pids), "the next job ran on a fresh pool"))
            if before is None:
                reference = pool.sample(big)
                results.append(check(torch.equal(after, reference), "the next job's result is reproducible"))
            else:
                results.append(check(torch.equal(after, before), "the next job equals the result before the failure"))
        results.append(check(not shm.our_segments(os.getpid()), "close() left no shared memory"))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
