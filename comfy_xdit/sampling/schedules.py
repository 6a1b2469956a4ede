"""ComfyUI's model samplings and sigma schedules, reproduced number for number.

Three model samplings, two as ComfyUI defines them for flow (CONST) models:

- ``FlowSampling``: Flux's ModelSamplingFlux, an exponential time shift tabulated at 10,000
  timesteps; the model's timestep is sigma itself.
- ``DiscreteFlowSampling``: SD3's ModelSamplingDiscreteFlow, sigma(t) = shift*t / (1 + (shift-1)*t)
  tabulated at 1,000 timesteps; the model's timestep is sigma * multiplier (1000).

and ``DiscreteSampling``, ComfyUI's ModelSamplingDiscrete for diffusion (EPS or V) models such as
PixArt (discrete_sampling.py).

Each also carries its prediction type's arithmetic (ComfyUI's EPS / V_PREDICTION / CONST classes):
how the model input is scaled, how the output becomes the x0 prediction, how noise enters.

Most schedulers pick entries of the table, so each table is built with ComfyUI's float32
operations in ComfyUI's order rather than analytically; that keeps the schedules bit-compatible
with KSampler's.
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


class ConstPrediction:
    """ComfyUI's CONST (rectified flow): the model predicts a velocity, noise mixes linearly."""

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, model_output, x):
        return x - model_output * sigma

    def noise_scaling(self, sigma, noise, latent, max_denoise: bool = False):
        return sigma * noise + (1.0 - sigma) * latent

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


@dataclass(frozen=True)
class FlowSampling(ConstPrediction):
    """Flux's ModelSamplingFlux: sigma(t) = e^shift / (e^shift + (1/t - 1)); timestep = sigma."""

    shift: float

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1) ** 1.0)

    def timestep(self, sigma):
        return sigma

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


@dataclass(frozen=True)
class DiscreteFlowSampling(ConstPrediction):
    """SD3's ModelSamplingDiscreteFlow: sigma(t) = shift*t / (1 + (shift-1)*t), t = timestep / multiplier."""

    shift: float
    multiplier: float = 1000.0
    timesteps: int = 1000

    def _shifted(self, t):
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sigma(self, timestep):
        return self._shifted(timestep / self.multiplier)

    def timestep(self, sigma):
        # In float32, as ComfyUI multiplies its float32 sigmas.
        return float(torch.tensor(sigma, dtype=torch.float32) * self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        return self._shifted(1.0 - percent)

    @property
    def table(self) -> torch.Tensor:
        # ComfyUI's order of float32 operations: k / timesteps, times multiplier, then sigma().
        return self.sigma((torch.arange(1, self.timesteps + 1, 1) / self.timesteps) * self.multiplier)

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])


from .discrete_sampling import DiscreteSampling  # noqa: E402  (it needs nothing from here)

# What a family's default sampling is built from: (shift) -> sampling.
ModelSampling = FlowSampling | DiscreteFlowSampling | DiscreteSampling


def simple(sampling: ModelSampling, steps: int) -> torch.Tensor:
    table = sampling.table
    stride = len(table) / steps
    sigmas = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor(sigmas + [0.0])


def normal(sampling: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    # Evenly spaced in the model's timestep (Flux: sigma itself; SD3: sigma * 1000).
    start, end = sampling.timestep(sampling.sigma_max), sampling.timestep(sampling.sigma_min)
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


def sgm_uniform(sampling: ModelSampling, steps: int) -> torch.Tensor:
    return normal(sampling, steps, sgm=True)


def karras(sampling: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sampling.sigma_min ** (1 / rho)
    max_inv_rho = sampling.sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def beta(sampling: ModelSampling, steps: int, alpha: float = 0.6, beta_param: float = 0.6) -> torch.Tensor:
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


def _schedule(sampling: ModelSampling, scheduler: str, steps: int, sampler_name: str | None) -> torch.Tensor:
    if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = SCHEDULERS[scheduler](sampling, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return SCHEDULERS[scheduler](sampling, steps)


def sigmas_for(
    sampling: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0, sampler_name: str | None = None
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
