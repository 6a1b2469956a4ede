"""ModelSamplingDiscrete (PixArt: EPS, sqrt_linear betas 1e-4..0.02) matches ComfyUI's own functions.

Tables, timesteps, sigma interpolation, schedules, and the EPS / V arithmetic (input scaling,
x0 prediction, noise scaling) are compared against ComfyUI 0.3.75's comfy.model_sampling and
comfy.samplers directly; euler_ancestral's diffusion branch against ComfyUI's on a toy denoiser.
No model runs here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comfy_xdit.sampling.discrete_sampling import DiscreteSampling
from comfy_xdit.sampling.samplers import NoiseSource, get_sampler, samplers_for
from comfy_xdit.sampling.schedules import SCHEDULERS, sigmas_for

COMFYUI = Path(__file__).resolve().parents[1] / ".comfyui" / "ComfyUI"
PIXART = dict(beta_schedule="sqrt_linear", linear_start=0.0001, linear_end=0.02, timesteps=1000)
SD15 = dict(beta_schedule="linear", linear_start=0.00085, linear_end=0.012, timesteps=1000)

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


@pytest.fixture(scope="module")
def comfy():
    if not (COMFYUI / "comfy" / "samplers.py").exists():
        pytest.skip(f"pristine ComfyUI not found at {COMFYUI} (tools/setup.sh puts it there)")
    if str(COMFYUI) not in sys.path:
        sys.path.append(str(COMFYUI))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.model_sampling as model_sampling
    import comfy.samplers as samplers

    kinds = {"eps": model_sampling.EPS, "v": model_sampling.V_PREDICTION}

    def make(prediction: str, settings: dict):
        # What comfy/model_base.py's model_sampling() builds for ModelType.EPS / V_PREDICTION.
        class Sampling(model_sampling.ModelSamplingDiscrete, kinds[prediction]):
            pass

        return Sampling(SimpleNamespace(sampling_settings=settings))

    return SimpleNamespace(samplers=samplers, sampling=k_sampling, model_sampling=make)


@pytest.mark.parametrize("settings", [PIXART, SD15], ids=["pixart", "sd15"])
def test_the_tables_are_comfyuis(comfy, settings):
    ours, stock = DiscreteSampling(**settings), comfy.model_sampling("eps", settings)
    assert torch.equal(ours.table, stock.sigmas)
    assert torch.equal(ours.log_sigmas, stock.log_sigmas)


def test_timestep_and_sigma_are_comfyuis(comfy):
    ours, stock = DiscreteSampling(**PIXART), comfy.model_sampling("eps", PIXART)
    sigmas = torch.cat([stock.sigmas[::37], torch.tensor([0.05, 1.0, 3.3, 80.0])])
    assert torch.equal(ours.timestep(sigmas), stock.timestep(sigmas).float())
    assert ours.timestep(float(stock.sigmas[500])) == 500.0
    for t in (torch.tensor(0.0), torch.tensor(999.0), torch.linspace(0, 999, 11), torch.tensor(123.4)):
        assert torch.equal(ours.sigma(t), stock.sigma(t))
    for percent in (0.0, 0.2, 0.5, 0.99, 1.0):
        assert ours.percent_to_sigma(percent) == stock.percent_to_sigma(percent)


@pytest.mark.parametrize("denoise", [1.0, 0.6])
@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_schedules_are_comfyuis_bit_for_bit(comfy, scheduler, steps, denoise):
    ours = sigmas_for(DiscreteSampling(**PIXART), scheduler, steps, denoise)
    stock = comfy.samplers.calculate_sigmas(comfy.model_sampling("eps", PIXART), scheduler, int(steps / denoise))
    stock = stock[-(steps + 1):] if denoise < 1 else stock
    assert torch.equal(ours, stock.float()), f"{scheduler}/{steps}: {ours} vs {stock}"


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_arithmetic_is_comfyuis(comfy, prediction):
    ours, stock = DiscreteSampling(prediction, **PIXART), comfy.model_sampling(prediction, PIXART)
    g = torch.Generator().manual_seed(1)
    x, out, noise, latent = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))
    for sigma in (stock.sigmas[-1], stock.sigmas[300], torch.tensor(0.5)):
        assert torch.equal(ours.calculate_input(sigma, x), stock.calculate_input(sigma, x))
        assert torch.equal(ours.calculate_denoised(sigma, out, x), stock.calculate_denoised(sigma, out, x))
        for max_denoise in (False, True):
            expected = stock.noise_scaling(sigma, noise.clone(), latent, max_denoise=max_denoise)
            assert torch.equal(ours.noise_scaling(sigma, noise, latent, max_denoise=max_denoise), expected)
        assert torch.equal(ours.inverse_noise_scaling(sigma, x), stock.inverse_noise_scaling(sigma, x))


def test_euler_ancestral_takes_comfyuis_diffusion_branch(comfy):
    sampling = DiscreteSampling(**PIXART)
    sigmas = sigmas_for(sampling, "normal", 4)
    shape = (2, 4, 4, 4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g) * float(sigmas[0])
    a = torch.randn(shape, generator=g)

    def denoise(x, sigma):
        return torch.tanh(x * a + sigma)

    model_sampling = comfy.model_sampling("eps", PIXART)
    model = SimpleNamespace(inner_model=SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling)))

    class Wrapped:
        inner_model = model.inner_model

        def __call__(self, x, sigma, **_):
            return denoise(x, sigma.reshape(-1, 1, 1, 1)[0])

    expected = comfy.sampling.sample_euler_ancestral(Wrapped(), x.clone(), sigmas.clone(), extra_args={"seed": 3}, disable=True)
    ours = get_sampler("euler_ancestral", sampling)(denoise, x.clone(), sigmas, lambda *a: None, NoiseSource(3, shape))
    assert (ours - expected).abs().max().item() < 1e-6


def test_flow_only_samplers_are_refused_for_diffusion_models():
    sampling = DiscreteSampling(**PIXART)
    with pytest.raises(ValueError, match="dpmpp_2m_sde.*non-flow.*euler"):
        get_sampler("dpmpp_2m_sde", sampling)
    assert "dpmpp_2m" in samplers_for(sampling) and "euler_ancestral" in samplers_for(sampling)
    assert "dpm_2_ancestral" not in samplers_for(sampling)


def test_an_unknown_prediction_or_schedule_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        DiscreteSampling("x0")
    with pytest.raises(ValueError, match="beta schedule"):
        DiscreteSampling(beta_schedule="cosine")
