"""Refuse a generation request that cannot give a meaningful result, before any worker sees it.

Each message names the input to change. Called on the host by the worker pool (so a bad request
costs no GPU work and leaves the pool warm) and by RankEngine.sample for direct callers.
"""

from __future__ import annotations

import math

import torch

from .config import ConfigError
from .requests import SampleRequest

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget range


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or infinite, in one summing pass without a mask: a NaN or an
    infinity anywhere makes the float64 sum NaN or infinite, and a float64 sum of float32 (or
    narrower) values cannot overflow. The masked check spent about 24 ms on a 512-token T5
    conditioning before the GPU got any work, this one 9 ms (docs/performance.md runs Y, Z)."""
    if tensor.dtype == torch.float64 or not tensor.is_floating_point():
        return bool(torch.isfinite(tensor).all())
    return math.isfinite(float(tensor.sum(dtype=torch.float64)))


def _finite(name: str, tensor: torch.Tensor | None) -> None:
    if tensor is not None and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConfigError(f"{name} contains {bad} NaN or infinite value(s); check the node that made it "
                          "(a text encoder or latent run in float16 can overflow)")


def check_sample_request(request: SampleRequest) -> None:
    if isinstance(request.steps, bool) or not isinstance(request.steps, int) or request.steps < 1:
        raise ConfigError(f"steps must be a whole number of at least 1, got {request.steps!r}")
    if not (isinstance(request.denoise, (int, float)) and 0.0 <= float(request.denoise) <= 1.0):
        raise ConfigError(f"denoise must be between 0 and 1, got {request.denoise!r}")
    if not (isinstance(request.cfg, (int, float)) and math.isfinite(request.cfg)):
        raise ConfigError(f"cfg must be a finite number, got {request.cfg!r}")
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
        raise ConfigError(f"seed must be a whole number from 0 to {MAX_SEED}, got {request.seed!r}")
    _finite("the latent", request.latent)
    for label, cond in (("the positive conditioning", request.positive), ("the negative conditioning", request.negative)):
        if cond is None:
            continue
        _finite(label, getattr(cond, "context", None))
        _finite(f"{label}'s pooled output", getattr(cond, "pooled", None))
        guidance = getattr(cond, "guidance", None)
        if guidance is not None and not math.isfinite(float(guidance)):
            raise ConfigError(f"{label}'s guidance must be a finite number, got {guidance!r}")
