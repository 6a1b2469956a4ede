"""SD3's model sampling (ModelSamplingDiscreteFlow, shift 3, multiplier 1000) matches ComfyUI's.

Schedules are compared bit for bit against ComfyUI 0.3.75's own ``calculate_sigmas`` on its own
ModelSamplingDiscreteFlow; the SDE samplers (which move a first sigma of 1 through the model
sampling) against ComfyUI's functions on a toy denoiser. No model runs here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comfy_xdit.sampling.samplers import NoiseSource, get_sampler
from comfy_xdit.sampling.schedules import SCHEDULERS, DiscreteFlowSampling, sigmas_for

COMFYUI = Path(__file__).resolve().parents[1] / ".comfyui" / "ComfyUI"
SD3_SHIFT = 3.0

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

    # What comfy/model_base.py builds for SD3 (ModelType.FLOW).
    class SD3ModelSampling(model_sampling.ModelSamplingDiscreteFlow, model_sampling.CONST):
        pass

    def make(shift: float):
        sampling = SD3ModelSampling()
        sampling.set_parameters(shift=shift, multiplier=1000)
        return sampling

    return SimpleNamespace(samplers=samplers, sampling=k_sampling, model_sampling=make)


def test_the_table_is_comfyuis(comfy):
    assert torch.equal(DiscreteFlowSampling(SD3_SHIFT).table, comfy.model_sampling(SD3_SHIFT).sigmas)


@pytest.mark.parametrize("shift", [SD3_SHIFT, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_schedules_are_comfyuis_bit_for_bit(comfy, scheduler, steps, shift):
    ours = sigmas_for(DiscreteFlowSampling(shift), scheduler, steps)
    stock = comfy.samplers.calculate_sigmas(comfy.model_sampling(shift), scheduler, steps)
    assert torch.equal(ours, stock.float()), f"{scheduler}/{steps}: {ours} vs {stock}"


def test_timestep_is_sigma_times_1000():
    sampling = DiscreteFlowSampling(SD3_SHIFT)
    assert sampling.timestep(0.5) == 500.0
    assert float(sampling.sigma(torch.tensor(500.0))) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde"])
def test_sde_samplers_offset_the_first_sigma_as_comfyui(comfy, name):
    sigmas = sigmas_for(DiscreteFlowSampling(SD3_SHIFT), "simple", 4)
    shape = (1, 4, 4, 4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    a = torch.randn(shape, generator=g)

    def denoise(x, sigma):
        return torch.tanh(x * a + sigma)

    model_sampling = comfy.model_sampling(SD3_SHIFT)
    patcher = SimpleNamespace(get_model_object=lambda _: model_sampling)
    model = SimpleNamespace(inner_model=SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling),
                                                        model_patcher=patcher))

    class Wrapped:
        inner_model = model.inner_model

        def __call__(self, x, sigma, **_):
            return denoise(x, sigma.reshape(-1, 1, 1, 1))

    expected = getattr(comfy.sampling, f"sample_{name}")(Wrapped(), x.clone(), sigmas.clone(), extra_args={"seed": 3}, disable=True)
    ours = get_sampler(name, DiscreteFlowSampling(SD3_SHIFT))(denoise, x.clone(), sigmas, lambda *a: None, NoiseSource(3, shape))
    assert (ours - expected).abs().max().item() < 1e-6
