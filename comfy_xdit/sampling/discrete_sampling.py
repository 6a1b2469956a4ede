"""ComfyUI's ModelSamplingDiscrete: the DDPM noise schedule of diffusion (not flow) models.

A beta schedule of 1,000 steps gives a table of sigmas, sigma_t = sqrt((1 - abar_t) / abar_t),
built like ComfyUI builds it (float64 betas and products, stored as float32). The model's timestep
is the index of the nearest tabulated log-sigma (an integer, as ComfyUI hands it to the model);
a timestep back to sigma interpolates linearly in log-sigma.

The prediction type says what the model outputs (ComfyUI's EPS and V_PREDICTION classes):

- ``eps``: the noise; denoised = x - sigma * eps (PixArt, SD1, SDXL);
- ``v``: velocity; denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1) (SD2-v, HunyuanDiT).

Both take the input scaled by c_in = 1 / sqrt(sigma^2 + 1) and start from noise * sigma (noise *
sqrt(1 + sigma^2) when sampling starts at the top of the schedule) added to the latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

PREDICTIONS = ("eps", "v")
SIGMA_DATA = 1.0


def beta_schedule(kind: str, timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """ComfyUI's make_beta_schedule for the schedules its discrete models use, in float64."""
    if kind == "linear":  # SD1/SDXL: linear in sqrt(beta)
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if kind == "sqrt_linear":  # PixArt: linear in beta (diffusers' "linear")
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    raise ValueError(f"beta schedule {kind!r} is not supported; choose 'linear' or 'sqrt_linear'")


@dataclass(frozen=True)
class DiscreteSampling:
    prediction: str = "eps"
    beta_schedule: str = "linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction {self.prediction!r} is not supported; choose one of {', '.join(PREDICTIONS)}")
        beta_schedule(self.beta_schedule, 2, self.linear_start, self.linear_end)  # refuses an unknown schedule now

    @cached_property
    def _sigmas64(self) -> torch.Tensor:
        alphas_cumprod = torch.cumprod(1.0 - beta_schedule(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end), dim=0)
        return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

    @cached_property
    def table(self) -> torch.Tensor:
        return self._sigmas64.float()

    @cached_property
    def log_sigmas(self) -> torch.Tensor:
        return self._sigmas64.log().float()

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])

    def timestep(self, sigma):
        """The nearest table index in log-sigma: a float tensor for a tensor, a float for a number."""
        as_tensor = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(as_tensor.device)
        index = (as_tensor.log() - log_sigmas[:, None]).abs().argmin(dim=0).view(as_tensor.shape)
        return index.float() if isinstance(sigma, torch.Tensor) else float(index)

    def sigma(self, timestep) -> torch.Tensor:
        t = torch.as_tensor(timestep).float().clamp(min=0, max=len(self.table) - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    # --- the prediction type's arithmetic, in ComfyUI's order of operations ----------------------

    def calculate_input(self, sigma, x):
        return x / (sigma**2 + SIGMA_DATA**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, x):
        if self.prediction == "v":
            return x * SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2) - model_output * sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2) ** 0.5
        return x - model_output * sigma

    def noise_scaling(self, sigma, noise, latent, max_denoise: bool = False):
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent

    def inverse_noise_scaling(self, sigma, latent):
        return latent
