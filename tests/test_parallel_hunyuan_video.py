"""Every exact parallel method on HunyuanVideo 1.0 text-to-video gives the same latents as one worker.

A tiny HunyuanVideoTransformer3DModel (2 heads x 8, rotary axes (2, 2, 4), one dual-stream, two
single-stream and one refiner block, random weights, fixed seed), float32, gloo processes on the
CPU. The video latent is 3 frames of 6x10 (3 x 3 x 5 = 45 video tokens after the 1x2x2 patches),
so every sequence-parallel degree needs padding and the rotary rows must be split with the tokens;
positive and negative have different text lengths (text is never split, so its length need not
divide by any degree) and different guidance values.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.requests import HunyuanVideoConditioning, SampleRequest, WanConditioning
from checkpoints import make_hunyuan_video_diffusers_model
from distributed import relative_error
from family_parallel import FamilySuite, ParallelExactness

LATENT = (16, 3, 6, 10)


def tiny_hunyuan_video():
    return make_hunyuan_video_diffusers_model(num_layers=1, num_single_layers=2, num_refiner_layers=1, heads=2, head_dim=8,
                                              rope_axes_dim=(2, 2, 4), text_dim=32, pooled_dim=24, seed=0)


def conditioning(tokens: int, guidance: float, seed: int) -> HunyuanVideoConditioning:
    g = torch.Generator().manual_seed(seed)
    return HunyuanVideoConditioning(torch.randn(1, tokens, 32, generator=g), torch.randn(1, 24, generator=g), guidance)


def request(batch: int = 1, cfg: float = 5.0, sampler: str = "euler") -> SampleRequest:
    return SampleRequest(torch.zeros(batch, *LATENT), conditioning(9, 6.0, 1), conditioning(5, 3.5, 2), seed=42, steps=3,
                         cfg=cfg, sampler_name=sampler)


SUITE = FamilySuite("hunyuan_video", tiny_hunyuan_video, request, LATENT)
engine_for = SUITE.engine_for


class TestParallelEqualsOneWorker(ParallelExactness):
    suite = SUITE


def test_one_worker_is_diffusers_own_forward():
    # The sampler's velocity equals a direct call of the unchanged diffusers model (its own float32
    # rotary tables) with ComfyUI's semantics: timestep = sigma x 1000, guidance x 1000, every text
    # token attended; odd rows/columns padded circularly and cropped.
    model = tiny_hunyuan_video()
    engine = engine_for({})
    g = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(1, 16, 2, 6, 8, generator=g), torch.randn(1, 7, 32, generator=g), torch.randn(1, 24, generator=g)

    def direct(latent):
        with torch.no_grad():
            return model(hidden_states=latent, timestep=torch.tensor([750.0]), encoder_hidden_states=context,
                         encoder_attention_mask=torch.ones(1, 7), pooled_projections=pooled,
                         guidance=torch.tensor([4500.0]), return_dict=False)[0]

    assert relative_error(engine._denoiser(x, torch.tensor(0.75), context, pooled, 4.5), direct(x)) < 1e-6
    odd = torch.randn(1, 16, 2, 5, 7, generator=g)
    padded = torch.nn.functional.pad(odd, (0, 1, 0, 1, 0, 0), mode="circular")
    ours = engine._denoiser(odd, torch.tensor(0.75), context, pooled, 4.5)
    assert relative_error(ours, direct(padded)[:, :, :, :5, :7]) < 1e-6
    # The guidance reaches the model.
    assert relative_error(engine._denoiser(x, torch.tensor(0.75), context, pooled, 1.0), direct(x)) > 1e-3


def test_rotary_tables_are_diffusers_layout_at_comfyuis_precision():
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

    from comfy_xdit.models.hunyuan_video import ComfyRotaryTables

    x = torch.zeros(1, 16, 5, 14, 18)
    ours = ComfyRotaryTables(2, 1, (16, 56, 56), 256.0)(x)
    theirs = HunyuanVideoRotaryPosEmbed(2, 1, [16, 56, 56], 256.0)(x)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (5 * 7 * 9, 128) and torch.allclose(a, b, atol=1e-5)


def test_latent_format_and_sampling_are_comfyuis():
    engine = engine_for({})
    latent = torch.randn(2, *LATENT)
    fmt = engine.family.latent
    assert torch.equal(fmt.to_model_space(latent), latent * 0.476986)
    assert (fmt.channels, fmt.dimensions) == (16, 3)
    assert engine.family.default_shift(None) == 7.0


def test_requests_made_for_other_families_are_refused_by_name():
    engine = engine_for({})
    wan = request()
    wan.positive = WanConditioning(wan.positive.context)
    with pytest.raises(ValueError, match="WanConditioning, but the loaded HunyuanVideo .* takes HunyuanVideoConditioning"):
        engine.sample(wan)
    wide = request()
    wide.positive = HunyuanVideoConditioning(torch.zeros(1, 9, 64), torch.zeros(1, 24))
    with pytest.raises(ValueError, match="text tokens are 64 wide but this HunyuanVideo .* takes 32"):
        engine.sample(wide)
    pooled = request()
    pooled.positive = HunyuanVideoConditioning(torch.zeros(1, 9, 32), torch.zeros(1, 768))
    with pytest.raises(ValueError, match="pooled output are 768 wide but this HunyuanVideo .* takes 24"):
        engine.sample(pooled)
