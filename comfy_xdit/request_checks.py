"""Refuse a generation request that cannot give a meaningful result, with a message that names the
input to change.

The settings (steps, denoise, cfg, seed, guidance) are checked on the host by the worker pool, so a
bad one costs no worker time, and again by RankEngine.sample for direct callers. The tensors are
checked for NaN and infinities by RankEngine.sample on the rank's device (every rank sees the whole
request, so all ranks refuse together and the pool stays warm): on a GPU that takes the copies and
one flag read back, where the CPU checks held the job's first kernel back by 20-30 ms
(docs/performance.md runs Y, Z).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .config import ConfigError
from .requests import SampleRequest

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget range


def finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on the tensor's device: whether no element is NaN or infinite (nothing is
    read back). On the CPU in one summing pass without a mask: a NaN or an infinity anywhere makes
    the float64 sum NaN or infinite, and a float64 sum of float32 (or narrower) values cannot
    overflow; the masked check spent about 24 ms on a 512-token T5 conditioning, this one 9 ms
    (docs/performance.md runs Y, Z). On a GPU the mask is one quick pass, and float64 is slow on
    many cards."""
    if tensor.device.type == "cpu" and tensor.is_floating_point() and tensor.dtype != torch.float64:
        return torch.isfinite(tensor.sum(dtype=torch.float64))
    return torch.isfinite(tensor).all()


def _non_finite_error(label: str, tensor: torch.Tensor) -> ConfigError:
    bad = int((~torch.isfinite(tensor)).sum())
    return ConfigError(f"{label} contains {bad} NaN or infinite value(s); check the node that made it "
                       "(a text encoder or latent run in float16 can overflow)")


def _labelled_conditionings(request: SampleRequest) -> Iterator[tuple[str, object]]:
    """The request's conditionings (the negative may be absent), each with the name a message gives it."""
    for label, cond in (("the positive conditioning", request.positive), ("the negative conditioning", request.negative)):
        if cond is not None:
            yield label, cond


def _labelled_inputs(request: SampleRequest) -> Iterator[tuple[str, torch.Tensor]]:
    """The request's float inputs that reach the model, each with the name a message gives it."""
    yield "the latent", request.latent
    for label, cond in _labelled_conditionings(request):
        for name, suffix in (("context", ""), ("pooled", "'s pooled output")):
            tensor = getattr(cond, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                yield label + suffix, tensor


def check_inputs_finite(request: SampleRequest, device: torch.device) -> None:
    """Refuse NaN or infinite inputs, checked on `device` (the copies are quick and a GPU is idle at
    a job's start); the flags of all inputs come back in one read."""
    inputs = list(_labelled_inputs(request))
    verdicts = torch.stack([finite_flag(tensor.to(device)) for _, tensor in inputs]).tolist()
    for (label, tensor), finite in zip(inputs, verdicts):
        if not finite:
            raise _non_finite_error(label, tensor)


def check_sample_settings(request: SampleRequest) -> None:
    """Refuse settings out of range; cheap, no tensor is read."""
    if isinstance(request.steps, bool) or not isinstance(request.steps, int) or request.steps < 1:
        raise ConfigError(f"steps must be a whole number of at least 1, got {request.steps!r}")
    if not (isinstance(request.denoise, (int, float)) and 0.0 <= float(request.denoise) <= 1.0):
        raise ConfigError(f"denoise must be between 0 and 1, got {request.denoise!r}")
    if not (isinstance(request.cfg, (int, float)) and math.isfinite(request.cfg)):
        raise ConfigError(f"cfg must be a finite number, got {request.cfg!r}")
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
        raise ConfigError(f"seed must be a whole number from 0 to {MAX_SEED}, got {request.seed!r}")
    for label, cond in _labelled_conditionings(request):
        guidance = getattr(cond, "guidance", None)
        if guidance is not None and not math.isfinite(float(guidance)):
            raise ConfigError(f"{label}'s guidance must be a finite number, got {guidance!r}")
