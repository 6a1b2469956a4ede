"""Every exact parallel method on Mochi 1 text-to-video gives the same latents as one worker.

A tiny MochiTransformer3DModel (2 heads x 8, video width 16, text stream width 8: asymmetric; two
blocks, the last without text outputs; random weights, fixed seed), float32, gloo processes on
the CPU. The video latent is 3 frames of 6x10 (3 x 3 x 5 = 45 video tokens after the 2x2
patches), so every sequence-parallel degree needs padding and the rotary rows must be split with
the tokens; positive and negative have different text lengths (text is never split).
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.requests import MochiConditioning, SampleRequest, WanConditioning
from checkpoints import make_mochi_diffusers_model
from distributed import relative_error
from family_parallel import FamilySuite, ParallelExactness

LATENT = (12, 3, 6, 10)
TEXT_DIM = 32


def tiny_mochi():
    return make_mochi_diffusers_model(num_layers=2, heads=2, head_dim=8, pooled_dim=8, text_dim=TEXT_DIM, seed=0)


def conditioning(tokens: int, seed: int) -> MochiConditioning:
    return MochiConditioning(torch.randn(1, tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))


def request(batch: int = 1, cfg: float = 4.5, sampler: str = "euler") -> SampleRequest:
    return SampleRequest(torch.zeros(batch, *LATENT), conditioning(9, 1), conditioning(5, 2), seed=42, steps=3,
                         cfg=cfg, sampler_name=sampler)


SUITE = FamilySuite("mochi", tiny_mochi, request, LATENT)
engine_for = SUITE.engine_for


class TestParallelEqualsOneWorker(ParallelExactness):
    suite = SUITE


def test_one_worker_is_diffusers_own_forward_with_its_text_mask():
    # The velocity is minus a direct call of the unchanged diffusers model at timestep (1 - sigma) x 1000;
    # the prompt's own tokens (the bridge crops the padding) equal diffusers' masked call on the padded
    # text; odd rows/columns are padded circularly and cropped.
    model = tiny_mochi()
    engine = engine_for({})
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 12, 2, 6, 8, generator=g), torch.randn(1, 7, TEXT_DIM, generator=g)
    padded_text = torch.cat([context, torch.randn(1, 5, TEXT_DIM, generator=g)], dim=1)
    mask = torch.tensor([[True] * 7 + [False] * 5])

    def direct(latent, text=padded_text, text_mask=mask):
        with torch.no_grad():
            return -model(hidden_states=latent, encoder_hidden_states=text, timestep=torch.tensor([250.0]),
                          encoder_attention_mask=text_mask, return_dict=False)[0]

    # Not bit-equal: ComfyUI's timestep sinusoid (ours) and diffusers' differ in the last bits.
    assert relative_error(engine._denoiser(x, torch.tensor(0.75), context), direct(x)) < 1e-5
    odd = torch.randn(1, 12, 2, 5, 7, generator=g)
    wide = torch.nn.functional.pad(odd, (0, 1, 0, 1, 0, 0), mode="circular")
    assert relative_error(engine._denoiser(odd, torch.tensor(0.75), context), direct(wide)[:, :, :, :5, :7]) < 1e-5
    # The padded tokens would matter if they were attended.
    assert relative_error(engine._denoiser(x, torch.tensor(0.75), padded_text), direct(x)) > 1e-3


def test_timestep_sinusoid_is_diffusers_layout_at_comfyuis_precision():
    from diffusers.models.embeddings import Timesteps

    from comfy_xdit.models.mochi import ComfyTimestepSinusoid

    t = torch.tensor([0.0, 1.5, 250.0, 999.0])
    ours, theirs = ComfyTimestepSinusoid(256)(t), Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0.0)(t)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=2e-4)
    half = 128
    freqs = torch.arange(half, dtype=torch.float32)
    freqs.mul_(-torch.log(torch.tensor(10000.0, dtype=torch.float64)).item() / half).exp_()  # ComfyUI's in-place order
    assert torch.equal(ours, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1))


def test_latent_format_and_sampling_are_comfyuis():
    engine = engine_for({})
    fmt = engine.family.latent
    latent = torch.randn(2, *LATENT)
    assert (fmt.channels, fmt.dimensions) == (12, 3)
    mean = torch.tensor(fmt.channel_mean).view(1, 12, 1, 1, 1)
    std = torch.tensor(fmt.channel_std).view(1, 12, 1, 1, 1)
    assert torch.equal(fmt.to_model_space(latent), (latent - mean) * 1.0 / std)
    assert engine.family.default_shift(None) == 6.0 and engine.family.sampling(6.0).multiplier == 1.0


def test_requests_made_for_other_families_are_refused_by_name():
    engine = engine_for({})
    wan = request()
    wan.positive = WanConditioning(wan.positive.context)
    with pytest.raises(ValueError, match="WanConditioning, but the loaded Mochi .* takes MochiConditioning"):
        engine.sample(wan)
    wide = request()
    wide.positive = MochiConditioning(torch.zeros(1, 9, 64))
    with pytest.raises(ValueError, match="text tokens are 64 wide but this Mochi .* takes 32"):
        engine.sample(wide)
