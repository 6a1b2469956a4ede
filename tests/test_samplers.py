"""Our samplers compute what ComfyUI 0.3.75's own k-diffusion samplers compute for a Flux model.

Each sampler runs on a toy denoiser beside ComfyUI's function from the pristine source in
``<repo>/.comfyui/ComfyUI`` (skipped when that is missing), seen through a stand-in for
ComfyUI's model wrapper whose model sampling is Flux's (ModelSamplingFlux with CONST), so the
ancestral samplers take the same rectified-flow branches and the SDE samplers the same log-SNR.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comfy_xdit.sampling.samplers import SAMPLERS, NoiseSource, get_sampler
from comfy_xdit.sampling.schedules import FLUX_DEV_SHIFT, FlowSampling, sigmas_for

COMFYUI = Path(__file__).resolve().parents[1] / ".comfyui" / "ComfyUI"
TOLERANCE = 1e-6  # float32; the arithmetic is the same, so only rounding may differ
SEED = 1234
SHAPE = (2, 4, 6, 8)

# Samplers that draw extra noise, and so must agree on the random numbers too.
NOISY = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "res_multistep_ancestral",
         "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"]

SCHEDULES = {
    "simple-6": (FLUX_DEV_SHIFT, "simple", 6, 1.0),
    "karras-6": (FLUX_DEV_SHIFT, "karras", 6, 1.0),
    "beta-5-shift-0.5": (0.5, "beta", 5, 1.0),
    "normal-4-denoise-0.6": (FLUX_DEV_SHIFT, "normal", 4, 0.6),  # first sigma below 1
    "simple-1": (FLUX_DEV_SHIFT, "simple", 1, 1.0),  # one step: no noise, an empty Brownian interval
}

# torchsde notes float32 query times that round just outside its float64 interval; ComfyUI too.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


@pytest.fixture(scope="module")
def comfy():
    if not (COMFYUI / "comfy" / "k_diffusion" / "sampling.py").exists():
        pytest.skip(f"pristine ComfyUI not found at {COMFYUI} (tools/setup.sh puts it there)")
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))  # appended, so it never shadows this repo's modules
    from comfy.cli_args import args

    args.cpu = True  # its device probing would otherwise insist on a GPU
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.model_sampling as model_sampling

    # What comfy/model_base.py builds for ModelType.FLUX.
    class FluxModelSampling(model_sampling.ModelSamplingFlux, model_sampling.CONST):
        pass

    return SimpleNamespace(sampling=k_sampling, flux_model_sampling=FluxModelSampling)


def toy_denoiser():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn((1, *SHAPE[1:]), generator=g), torch.randn((1, *SHAPE[1:]), generator=g)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * a + sigma * b)

    return denoise


class ComfyModel:
    """Looks like KSamplerX0Inpaint around CFGGuider around a Flux BaseModel, to a sampler."""

    def __init__(self, denoise, model_sampling):
        self.denoise = denoise
        patcher = SimpleNamespace(get_model_object=lambda name: {"model_sampling": model_sampling}[name])
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling), model_patcher=patcher)

    def __call__(self, x, sigma, **extra_args):
        # ComfyUI passes one sigma per batch row.
        return self.denoise(x, sigma.reshape(-1, *[1] * (x.ndim - 1)))


def start(sigmas: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return sigmas[0] * torch.randn(SHAPE, generator=g) + (1 - sigmas[0]) * torch.randn(SHAPE, generator=g)


def run_ours(name, sigmas, shift, x, noise=None):
    steps = []
    out = get_sampler(name, FlowSampling(shift))(
        toy_denoiser(), x, sigmas, lambda i, x, denoised: steps.append(i), noise or NoiseSource(SEED, x.shape))
    assert steps == list(range(len(sigmas) - 1)), "after_step must run once per step, in order"
    return out


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_matches_comfyui(comfy, name, schedule):
    shift, scheduler, steps, denoise = SCHEDULES[schedule]
    sigmas = sigmas_for(FlowSampling(shift), scheduler, steps, denoise)
    x = start(sigmas)
    model_sampling = comfy.flux_model_sampling()
    model_sampling.set_parameters(shift=shift)

    expected = getattr(comfy.sampling, f"sample_{name}")(
        ComfyModel(toy_denoiser(), model_sampling), x.clone(), sigmas.clone(), extra_args={"seed": SEED}, disable=True)
    ours = run_ours(name, sigmas, shift, x.clone())

    assert torch.isfinite(expected).all()
    error = (ours - expected).abs().max().item()
    assert error < TOLERANCE, f"{name} on {schedule}: differs from ComfyUI by {error:.2e}"


@pytest.mark.parametrize("kind", ["gaussian", "brownian"])
def test_a_ranks_noise_is_its_rows_of_the_whole_batch_draw(kind):
    sigmas = sigmas_for(FlowSampling(FLUX_DEV_SHIFT), "simple", 4)
    shape, rows = (4, *SHAPE[1:]), slice(2, 4)

    def draws(source: NoiseSource) -> list[torch.Tensor]:
        sample = source if kind == "gaussian" else source.brownian(sigmas[-2], sigmas[0], on_cpu=True)
        return [sample(sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 2)]

    whole, mine = draws(NoiseSource(SEED, shape)), draws(NoiseSource(SEED, shape, rows))
    for full, part in zip(whole, mine):
        assert part.shape == (2, *SHAPE[1:])
        assert torch.equal(part, full[rows])


@pytest.mark.parametrize("name", NOISY)
def test_data_parallel_rows_sample_like_the_whole_batch(name):
    # The toy denoiser treats rows independently, so only the noise could make a rank's rows differ.
    sigmas = sigmas_for(FlowSampling(FLUX_DEV_SHIFT), "simple", 5)
    x = start(sigmas)
    whole = run_ours(name, sigmas, FLUX_DEV_SHIFT, x)
    for rows in (slice(0, 1), slice(1, 2)):
        part = run_ours(name, sigmas, FLUX_DEV_SHIFT, x[rows], NoiseSource(SEED, x.shape, rows))
        assert (part - whole[rows]).abs().max().item() < TOLERANCE


def test_unknown_sampler_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="sampler_name 'ddim' is not supported; choose one of euler"):
        get_sampler("ddim", FlowSampling(FLUX_DEV_SHIFT))
