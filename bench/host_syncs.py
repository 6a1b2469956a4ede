"""Where a loop makes the host wait for the GPU.

A synchronising call inside the denoising step (`.item()`, a blocking host-to-device copy, a
`.cpu()`) leaves the GPU idle while the host catches up with its launches. torch's CUDA sync
debug mode warns at each such call; `count_host_syncs` runs a loop under it and counts the calls
by where they came from in our code and the bench's (torch's own frames skipped), so a
per-step sync shows as a count equal to the number of steps.
"""

from __future__ import annotations

import collections
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch

# torch's wording for its sync debug mode warning (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync)
SYNC_WARNING = "called a synchronizing CUDA operation"
SKIPPED_FILES = ("warnings.py", "host_syncs.py")


TORCH_DIR = str(Path(torch.__file__).parent)


def call_site(stack: list[traceback.FrameSummary], depth: int = 3) -> str:
    """The innermost `depth` frames outside torch and the warnings machinery, innermost first."""
    outside = [f for f in stack if not f.filename.startswith(TORCH_DIR) and Path(f.filename).name not in SKIPPED_FILES]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(outside[-depth:]))


def count_host_syncs(run: Callable[[], object], set_mode: Callable[[str | int], None] | None = None) -> collections.Counter:
    """Run `run()` with CUDA's sync debug mode on; {call site: number of synchronising calls}.
    set_mode: torch.cuda.set_sync_debug_mode (a parameter so the counting is testable without a GPU)."""
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    counts: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            counts[call_site(traceback.extract_stack()[:-1])] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        set_mode("warn")
        try:
            run()
        finally:
            set_mode(0)
    return counts


def report(counts: collections.Counter, steps: int, label: str) -> str:
    lines = [f"== host syncs {label}: {sum(counts.values())} in a loop of {steps} steps"]
    lines += [f"   {n:5d}  {site}" for site, n in counts.most_common()]
    return "\n".join(lines)
