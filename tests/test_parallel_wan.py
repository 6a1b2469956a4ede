"""Every exact parallel method on Wan 2.1 / 2.2 text-to-video gives the same latents as one worker.

A tiny WanTransformer3DModel (2 heads x 8, 2 blocks, random weights, fixed seed), float32, gloo
processes on the CPU. The video latent is 3 frames of 6x10 (3 x 3 x 5 = 45 video tokens after the
1x2x2 patches), so every sequence-parallel degree needs padding, and the rotary tables must be
split with the tokens; positive and negative have different text lengths.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.requests import SampleRequest, SD3Conditioning, WanConditioning
from checkpoints import make_wan_diffusers_model
from family_parallel import FamilySuite, ParallelExactness

LATENT = (16, 3, 6, 10)


def tiny_wan():
    return make_wan_diffusers_model(num_layers=2, heads=2, head_dim=8, ffn_dim=32, text_dim=32, seed=0)


def request(batch: int = 1, cfg: float = 5.0, sampler: str = "euler") -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = WanConditioning(torch.randn(1, 9, 32, generator=g))
    negative = WanConditioning(torch.randn(1, 5, 32, generator=g))
    return SampleRequest(torch.zeros(batch, *LATENT), positive, negative, seed=42, steps=3, cfg=cfg, sampler_name=sampler)


SUITE = FamilySuite("wan", tiny_wan, request, LATENT)
engine_for = SUITE.engine_for


class TestParallelEqualsOneWorker(ParallelExactness):
    suite = SUITE


def test_one_worker_is_diffusers_own_forward():
    # The sampler's velocity equals a direct call of the unchanged diffusers model with ComfyUI's
    # semantics: timestep = sigma * 1000; odd frames/rows/columns padded circularly and cropped.
    model = tiny_wan()
    engine = engine_for({})
    engine._denoiser.forward.model = model
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 16, 2, 6, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    ours = engine._denoiser(x, torch.tensor(0.75), context)
    with torch.no_grad():
        direct = model(hidden_states=x, timestep=torch.tensor([750.0]), encoder_hidden_states=context, return_dict=False)[0]
    assert torch.equal(ours, direct)
    odd = torch.randn(1, 16, 2, 5, 7, generator=g)
    padded = torch.nn.functional.pad(odd, (0, 1, 0, 1, 0, 0), mode="circular")
    with torch.no_grad():
        direct = model(hidden_states=padded, timestep=torch.tensor([750.0]), encoder_hidden_states=context, return_dict=False)[0]
    assert torch.equal(engine._denoiser(odd, torch.tensor(0.75), context), direct[:, :, :, :5, :7])


def test_latent_format_is_comfyuis_wan21_per_channel():
    engine = engine_for({})
    latent = torch.randn(2, *LATENT)
    fmt = engine.family.latent
    model_space = fmt.to_model_space(latent)
    mean = torch.tensor(fmt.channel_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(fmt.channel_std).view(1, 16, 1, 1, 1)
    assert torch.equal(model_space, (latent - mean) * 1.0 / std)
    assert torch.allclose(fmt.from_model_space(model_space), latent, atol=1e-6)


def test_an_empty_image_latent_becomes_one_16_channel_frame():
    # Stock EmptyLatentImage (4 channels, 4-D) into a Wan model: ComfyUI widens it and adds a frame axis.
    engine = engine_for({})
    image = request()
    image.latent = torch.zeros(1, 4, 6, 10)
    image.steps = 1
    assert engine.sample(image).shape == (1, 16, 1, 6, 10)


def test_requests_made_for_other_families_are_refused_by_name():
    engine = engine_for({})
    sd3 = request()
    sd3.positive = SD3Conditioning(sd3.positive.context, torch.zeros(1, 24))
    with pytest.raises(ValueError, match="SD3Conditioning, but the loaded Wan 2.1 / 2.2 .* takes WanConditioning"):
        engine.sample(sd3)
    wide = request()
    wide.positive = WanConditioning(torch.zeros(1, 9, 64))
    with pytest.raises(ValueError, match="text tokens are 64 wide but this Wan .* takes 32"):
        engine.sample(wide)
    video = request()
    video.latent = torch.zeros(1, 16, 2, 3, 6, 10)
    with pytest.raises(ValueError, match="takes a video latent"):
        engine.sample(video)
