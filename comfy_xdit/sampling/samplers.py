"""Samplers over a denoiser, written the way ComfyUI's k-diffusion samplers compute them.

``denoise(x, sigma) -> denoised`` is the model's x0 prediction with guidance already applied;
``after_step(i)`` runs after step i (progress, cancel vote).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AfterStep = Callable[[int, torch.Tensor, torch.Tensor], None]


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, after_step: AfterStep) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        after_step(i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[[Denoise, torch.Tensor, torch.Tensor, AfterStep], torch.Tensor]] = {"euler": euler}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler_name {name!r} is not supported; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
