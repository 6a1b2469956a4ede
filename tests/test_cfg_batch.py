"""CFG's two branches as one model call of twice the batch (comfy_xdit/sampling/cfg_batch.py).

On one worker (and on sequence-parallel ranks) the positive and negative branch share one call
when their conditionings have the same shapes; the result must equal two separate calls, and
the model must really see one call of 2x the rows per evaluation. Branches of different text
lengths keep two calls. Tiny real models of every family, float32, on the CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.requests import FluxConditioning, HunyuanVideoConditioning, ModelSpec, NoHooks, PixArtConditioning, QwenImageConditioning, SampleRequest, SD3Conditioning, WanConditioning
from comfy_xdit.sampling.cfg_batch import stack_branches
from comfy_xdit.sampling.ksampler import run_ksampler
from checkpoints import make_flux_diffusers_model, make_hunyuan_video_diffusers_model, make_qwen_image_diffusers_model, make_sd3_diffusers_model, make_wan_diffusers_model
from distributed import cpu_engine, relative_error, run_on_ranks
from pixart_files import make_pixart_diffusers_model

STEPS = 3


def _conditioning(family: str, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, 32, generator=g)
    if family == "flux":
        return FluxConditioning(context, torch.randn(1, 24, generator=g), 3.5)
    if family == "sd3":
        return SD3Conditioning(context, torch.randn(1, 24, generator=g))
    if family == "pixart":
        return PixArtConditioning(context)
    if family == "qwen_image":
        return QwenImageConditioning(context)
    if family == "hunyuan_video":
        return HunyuanVideoConditioning(context, torch.randn(1, 24, generator=g), 6.0)
    return WanConditioning(context)


FAMILIES = {
    # family: (model maker, latent shape without the batch)
    "flux": (lambda: make_flux_diffusers_model(num_layers=1, num_single_layers=1, heads=4, head_dim=16, seed=0), (4, 10, 14)),
    "sd3": (lambda: make_sd3_diffusers_model(num_layers=2, heads=4, head_dim=8, seed=0), (16, 10, 14)),
    "pixart": (lambda: make_pixart_diffusers_model(num_layers=1), (4, 42, 38)),
    "wan": (lambda: make_wan_diffusers_model(num_layers=1, heads=2, head_dim=8, ffn_dim=32, text_dim=32, seed=0), (16, 3, 6, 10)),
    "qwen_image": (lambda: make_qwen_image_diffusers_model(num_layers=1, heads=2, head_dim=32, seed=0), (16, 1, 6, 10)),
    "hunyuan_video": (lambda: make_hunyuan_video_diffusers_model(seed=0), (16, 3, 6, 10)),
}


def make_request(family: str, batch: int, negative_tokens: int) -> SampleRequest:
    latent = torch.zeros(batch, *FAMILIES[family][1])
    scheduler = "normal" if family == "pixart" else "simple"
    return SampleRequest(latent, _conditioning(family, 7, 1), _conditioning(family, negative_tokens, 2), seed=42, steps=STEPS,
                         cfg=4.0, scheduler=scheduler)


def make_engine(family: str, **config) -> RankEngine:
    engine = cpu_engine(config)
    engine.set_model(FAMILIES[family][0](), ModelSpec("tiny", family=family, dtype="float32"))
    return engine


def record_calls(engine: RankEngine) -> list[int]:
    """The batch of every model call the denoiser makes (instruments the real forward)."""
    batches: list[int] = []
    forward = engine._denoiser.forward

    def recording(*args, **kwargs):
        first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        batches.append(first.shape[0])
        return forward(*args, **kwargs)

    engine._denoiser.forward = recording
    return batches


def sample_with_two_calls(engine: RankEngine, request: SampleRequest) -> torch.Tensor:
    """The engine's sampling with CFG batching off: each branch its own model call."""
    family, denoiser = engine.family, engine._denoiser
    latent = family.latent_format(engine.model.config)
    with torch.inference_mode():
        return run_ksampler(
            request, lambda x, sigma, cond: family.velocity(denoiser, x, sigma, cond, []).to(x.dtype), engine.mesh,
            latent_channels=latent.channels, latent_dimensions=latent.dimensions, default_shift=engine._default_shift,
            to_model_space=latent.to_model_space, from_model_space=latent.from_model_space, hooks=NoHooks(),
            device=engine.device, make_sampling=family.sampling, batch_cfg=False)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch", [1, 2])
def test_both_branches_in_one_call_equal_two_calls(family, batch):
    engine = make_engine(family)
    request = make_request(family, batch, negative_tokens=7)
    calls = record_calls(engine)
    batched = engine.sample(request)
    assert calls == [2 * batch] * STEPS, "one call of both branches per step"
    calls.clear()
    separate = sample_with_two_calls(engine, request)
    assert calls == [batch] * (2 * STEPS)
    assert batched.abs().max() > 0.1
    assert relative_error(batched, separate) < 1e-5


def test_branches_of_different_lengths_keep_two_calls():
    engine = make_engine("sd3")
    calls = record_calls(engine)
    engine.sample(make_request("sd3", 1, negative_tokens=5))
    assert calls == [1] * (2 * STEPS)


def test_stack_branches_refuses_what_cannot_share_a_call():
    positive, negative = _conditioning("flux", 7, 1), _conditioning("flux", 7, 2)
    both = stack_branches(positive, negative, rows=2)
    assert both.context.shape == (4, 7, 32) and both.pooled.shape == (4, 24) and both.guidance == 3.5
    assert torch.equal(both.context[:2], positive.context.expand(2, -1, -1))
    assert torch.equal(both.context[2:], negative.context.expand(2, -1, -1))
    assert stack_branches(positive, _conditioning("flux", 5, 2), rows=1) is None  # other text length
    assert stack_branches(positive, dataclasses.replace(negative, guidance=1.0), rows=1) is None  # other guidance
    assert stack_branches(positive, _conditioning("sd3", 7, 2), rows=1) is None  # other family
    assert stack_branches(_conditioning("pixart", 7, 1), _conditioning("pixart", 7, 2), rows=1).context.shape == (2, 7, 32)


def _sequence_and_data_parallel() -> dict:
    request = make_request("sd3", 1, negative_tokens=7)
    results = {"ulysses=2": make_engine("sd3", ulysses_degree=2).sample(request),
               "ring=2": make_engine("sd3", ring_degree=2).sample(request)}
    results["data=2"] = make_engine("sd3", data_parallel_degree=2).sample(make_request("sd3", 2, negative_tokens=7))
    return results


def test_one_call_for_both_branches_under_sequence_and_data_parallel_equals_one_worker():
    one = make_engine("sd3")
    expected = {"ulysses=2": one.sample(make_request("sd3", 1, 7)), "data=2": one.sample(make_request("sd3", 2, 7))}
    expected["ring=2"] = expected["ulysses=2"]
    for rank_results in run_on_ranks(2, _sequence_and_data_parallel):
        for name, latents in rank_results.items():
            assert relative_error(latents, expected[name]) < 1e-4, name
