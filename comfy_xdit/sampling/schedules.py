"""ComfyUI's sigma schedules for flow models with Flux's time shift, reproduced number for number.

ComfyUI tabulates the shifted sigma at 10,000 timesteps and most schedulers pick entries of that
table, so the table is built the same way here (float32, t = k / 10000) rather than computed
analytically; that keeps the schedules bit-compatible with KSampler's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIMESTEPS = 10000
FLUX_DEV_SHIFT = 1.15
FLUX_SCHNELL_SHIFT = 1.0


def resolution_shift(latent_height: int, latent_width: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """ModelSamplingFlux's shift: linear in the number of image tokens (256 -> base, 4096 -> max)."""
    x1, x2 = 256, 4096
    slope = (max_shift - base_shift) / (x2 - x1)
    intercept = base_shift - slope * x1
    pixel_width, pixel_height = latent_width * 8, latent_height * 8
    return (pixel_width * pixel_height / (8 * 8 * 2 * 2)) * slope + intercept


@dataclass(frozen=True)
class FlowSampling:
    """Flux's ModelSamplingFlux: sigma(t) = e^shift / (e^shift + (1/t - 1))."""

    shift: float

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1) ** 1.0)

    @property
    def table(self) -> torch.Tensor:
        return self.sigma(torch.arange(1, TIMESTEPS + 1, 1) / TIMESTEPS)

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's percent of the schedule (0 = start, 1 = end) as a sigma, in double precision as there."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / (1.0 - percent) - 1) ** 1.0)

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])


def simple(sampling: FlowSampling, steps: int) -> torch.Tensor:
    table = sampling.table
    stride = len(table) / steps
    sigmas = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor(sigmas + [0.0])


def normal(sampling: FlowSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    # The flow model's timestep is its sigma, so start/end are sigma_max/sigma_min.
    start, end = sampling.sigma_max, sampling.sigma_min
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(sampling.sigma(torch.tensor(end))), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigmas = [float(sampling.sigma(t)) for t in timesteps]
    return torch.FloatTensor(sigmas + ([0.0] if append_zero else []))


def sgm_uniform(sampling: FlowSampling, steps: int) -> torch.Tensor:
    return normal(sampling, steps, sgm=True)


def karras(sampling: FlowSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sampling.sigma_min ** (1 / rho)
    max_inv_rho = sampling.sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def beta(sampling: FlowSampling, steps: int, alpha: float = 0.6, beta_param: float = 0.6) -> torch.Tensor:
    import numpy
    from scipy.stats import beta as beta_distribution

    table = sampling.table
    total = len(table) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(beta_distribution.ppf(ts, alpha, beta_param) * total)
    sigmas, last = [], -1
    for t in ts:
        if t != last:
            sigmas.append(float(table[int(t)]))
        last = t
    return torch.FloatTensor(sigmas + [0.0])


SCHEDULERS = {"simple": simple, "normal": normal, "sgm_uniform": sgm_uniform, "karras": karras, "beta": beta}


# Samplers for which ComfyUI's KSampler computes the schedule for one step more and drops the
# penultimate sigma (comfy/samplers.py KSampler.calculate_sigmas), so their last step is longer.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def _schedule(sampling: FlowSampling, scheduler: str, steps: int, sampler_name: str | None) -> torch.Tensor:
    if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = SCHEDULERS[scheduler](sampling, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return SCHEDULERS[scheduler](sampling, steps)


def sigmas_for(
    sampling: FlowSampling, scheduler: str, steps: int, denoise: float = 1.0, sampler_name: str | None = None
) -> torch.Tensor:
    """KSampler's sigmas: with denoise < 1 the schedule of steps/denoise steps, last steps+1 kept.

    Give ``sampler_name`` to get exactly what KSampler hands that sampler (see
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS); without it, the scheduler's plain schedule.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not supported; choose one of {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise > 0.9999:
        return _schedule(sampling, scheduler, steps, sampler_name)
    total = int(steps / denoise)
    return _schedule(sampling, scheduler, total, sampler_name)[-(steps + 1) :]
