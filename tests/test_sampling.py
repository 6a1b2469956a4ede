"""The one-worker sampler follows ComfyUI's Flux semantics (DESIGN.md, 'Sampling semantics')."""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.sampling.noise import comfy_noise
from comfy_xdit.sampling.schedules import FLUX_DEV_SHIFT, FlowSampling, resolution_shift, sigmas_for


def test_simple_schedule_matches_comfyui_flux_dev():
    sigmas = sigmas_for(FlowSampling(FLUX_DEV_SHIFT), "simple", 4)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.90453, 0.75951, 0.51284, 0.0]), atol=1e-5)


def test_denoise_keeps_the_tail_of_the_longer_schedule():
    full = sigmas_for(FlowSampling(FLUX_DEV_SHIFT), "simple", 10)
    partial = sigmas_for(FlowSampling(FLUX_DEV_SHIFT), "simple", 6, denoise=0.6)
    assert torch.equal(partial, full[-7:])


@pytest.mark.parametrize("scheduler", ["simple", "normal", "sgm_uniform", "karras", "beta"])
def test_every_schedule_descends_from_one_to_zero(scheduler):
    sigmas = sigmas_for(FlowSampling(FLUX_DEV_SHIFT), scheduler, 8)
    assert sigmas[0] == pytest.approx(1.0, abs=1e-4)
    assert sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] <= sigmas[:-1])


def test_resolution_shift_is_max_shift_at_1024_and_base_at_256_tokens():
    assert resolution_shift(128, 128) == pytest.approx(1.15)
    assert resolution_shift(32, 32) == pytest.approx(0.5)


def test_noise_is_comfyui_seeded_cpu_noise():
    expected = torch.randn((2, 16, 8, 8), generator=torch.manual_seed(7))
    assert torch.equal(comfy_noise((2, 16, 8, 8), 7), expected)


def test_batch_index_reuses_the_noise_of_that_index():
    first = comfy_noise((1, 16, 8, 8), 7, batch_index=[0])
    assert torch.equal(first, comfy_noise((1, 16, 8, 8), 7))
    repeated = comfy_noise((2, 16, 8, 8), 7, batch_index=[1, 1])
    assert torch.equal(repeated[0], repeated[1]) and not torch.equal(repeated[0], first[0])


def test_bad_sampling_settings_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        sigmas_for(FlowSampling(1.0), "simple", 0)
    with pytest.raises(ValueError, match="denoise must be in"):
        sigmas_for(FlowSampling(1.0), "simple", 4, denoise=1.5)
    with pytest.raises(ValueError, match="scheduler 'nope' is not supported"):
        sigmas_for(FlowSampling(1.0), "nope", 4)
