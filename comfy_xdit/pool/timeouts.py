"""How long the pool waits on silent workers before it calls them hung, by default scaled to the model.

Two bounds: the job timeout is the longest silence allowed while sampling or decoding (before
the first step, which includes compiling, or between two steps); the load timeout bounds a
model or VAE load. Each is, in order: the WorkerPool argument, the environment variable
(``COMFY_XDIT_JOB_TIMEOUT_S``, ``COMFY_XDIT_LOAD_TIMEOUT_S``: the way to set them inside
ComfyUI), or a default that grows with the size of the model's weights on disk. A step's time
and a load's time both grow with the weights; the defaults leave a wide margin over a slow GPU
(a step) and a slow disk (a load), since a false alarm costs a whole reload.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError

ENV_JOB_TIMEOUT = "COMFY_XDIT_JOB_TIMEOUT_S"
ENV_LOAD_TIMEOUT = "COMFY_XDIT_LOAD_TIMEOUT_S"
GIB = 1024**3

# Job: 120 s of compile/first-step margin plus 10 s per GiB (Flux.1-dev in bf16, 22 GiB: 340 s).
JOB_BASE_S, JOB_PER_GIB_S = 120.0, 10.0
# Load: 120 s plus 60 s per GiB, a disk of about 17 MB/s (Flux.1-dev: about 22 minutes).
LOAD_BASE_S, LOAD_PER_GIB_S = 120.0, 60.0


def weights_bytes(path: str | os.PathLike) -> int:
    """The size of a checkpoint file, or of a diffusers folder's weight files; 0 when unreadable."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*.safetensors"))
        return path.stat().st_size
    except OSError:
        return 0


def default_job_timeout_s(model_bytes: int) -> float:
    return JOB_BASE_S + JOB_PER_GIB_S * model_bytes / GIB


def default_load_timeout_s(model_bytes: int) -> float:
    return LOAD_BASE_S + LOAD_PER_GIB_S * model_bytes / GIB


def from_environment(name: str) -> float | None:
    """A timeout set in the environment, or None; a value that is not a positive number is refused."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{name}={value!r}: expected a positive number of seconds")
    return seconds
