"""Every exact parallel method on Qwen-Image gives the same latents as one worker.

A tiny QwenImageTransformer2DModel (2 heads x 32, 2 blocks, random weights, fixed seed), float32,
gloo processes on the CPU. The latent is one frame of 6x10 (3 x 5 = 15 image tokens after the
2x2 patches), so every sequence-parallel degree needs padding, the token grid is odd (where
ComfyUI's rotary positions differ from diffusers') and the image rows of the rotary table must be
split with the tokens; positive and negative have different text lengths.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.models.qwen_image import ComfyRotaryTables
from comfy_xdit.requests import ModelSpec, QwenImageConditioning, SampleRequest, WanConditioning
from checkpoints import make_qwen_image_diffusers_model
from distributed import cpu_engine, relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one worker, exact methods, float32
LATENT = (16, 1, 6, 10)


def tiny_qwen_image():
    return make_qwen_image_diffusers_model(num_layers=2, heads=2, head_dim=32, joint_attention_dim=32, seed=0)


def request(batch: int = 1, cfg: float = 4.0, sampler: str = "euler", negative_tokens: int = 5) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = QwenImageConditioning(torch.randn(1, 9, 32, generator=g))
    negative = QwenImageConditioning(torch.randn(1, negative_tokens, 32, generator=g))
    return SampleRequest(torch.zeros(batch, *LATENT), positive, negative, seed=42, steps=3, cfg=cfg, sampler_name=sampler)


def engine_for(config_kwargs: dict) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.set_model(tiny_qwen_image(), ModelSpec("tiny", family="qwen_image", dtype="float32"))
    return engine


def generate(config_kwargs: dict, batch: int, wrong_shard_order: bool = False, sampler: str = "euler",
             negative_tokens: int = 5) -> torch.Tensor:
    engine = engine_for(config_kwargs)
    if wrong_shard_order:
        # Deliberately hand each rank another rank's shard: the comparison must catch it.
        forward = engine._denoiser.forward
        forward.shard_index = forward.degree - 1 - forward.shard_index
    return engine.sample(request(batch, sampler=sampler, negative_tokens=negative_tokens))


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(batch: int, sampler: str = "euler", negative_tokens: int = 5) -> torch.Tensor:
        key = (batch, sampler, negative_tokens)
        if key not in cache:
            cache[key] = generate({}, batch, sampler=sampler, negative_tokens=negative_tokens)
        return cache[key]

    return get


CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2": (dict(data_parallel_degree=2), 2),
}
WRONG_ORDER = "ulysses=2, shards swapped"
ANCESTRAL = "ring=2, euler_ancestral"
# Text of one length in both branches: they share one model call of twice the batch.
ONE_CALL = "ulysses=2 and data=2, both CFG branches in one call"


def generate_all_cases() -> dict:
    """Every case on the same two ranks: one process start for all of them."""
    results = {name: generate(config_kwargs, batch) for name, (config_kwargs, batch) in CASES.items()}
    results[WRONG_ORDER] = generate(dict(ulysses_degree=2), 1, wrong_shard_order=True)
    results[ANCESTRAL] = generate(dict(ring_degree=2), 1, sampler="euler_ancestral")
    results[ONE_CALL] = (generate(dict(ulysses_degree=2), 1, negative_tokens=9),
                         generate(dict(data_parallel_degree=2), 2, negative_tokens=9))
    return results


@pytest.fixture(scope="module")
def two_workers():
    return run_on_ranks(2, generate_all_cases)


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_equals_one_worker(name, two_workers, reference):
    batch = CASES[name][1]
    expected = reference(batch)
    for rank, results in enumerate(two_workers):
        result = results[name]
        assert result.shape == expected.shape == (batch, *LATENT)
        error = relative_error(result, expected)
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"


def test_ancestral_sampler_on_ring_equals_one_worker(two_workers, reference):
    for rank, results in enumerate(two_workers):
        assert relative_error(results[ANCESTRAL], reference(1, "euler_ancestral")) < TOLERANCE, f"rank {rank}"


def test_both_cfg_branches_in_one_call_under_ulysses_and_data_equal_one_worker(two_workers, reference):
    for rank, results in enumerate(two_workers):
        ulysses, data = results[ONE_CALL]
        assert relative_error(ulysses, reference(1, negative_tokens=9)) < TOLERANCE, f"rank {rank}"
        assert relative_error(data, reference(2, negative_tokens=9)) < TOLERANCE, f"rank {rank}"


def test_wrong_shard_order_is_caught(two_workers, reference):
    assert relative_error(two_workers[0][WRONG_ORDER], reference(1)) > 100 * TOLERANCE


def test_ulysses_times_ring_on_four_workers(reference):
    # Both gathers in the hook, Ulysses inside Ring, the rotary table's image rows split four ways.
    results = run_on_ranks(4, generate, dict(ulysses_degree=2, ring_degree=2), 1)
    for rank, result in enumerate(results):
        assert relative_error(result, reference(1)) < TOLERANCE, f"rank {rank}"


def test_one_worker_is_diffusers_own_forward_on_even_grids():
    # On an even token grid ComfyUI's rotary positions are diffusers' own: the sampler's velocity is a
    # direct call of the unchanged model on Flux-style packed 2x2 patches with timestep = sigma.
    model = tiny_qwen_image()
    engine = engine_for({})
    denoiser = engine._denoiser
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 16, 1, 8, 12, generator=g), torch.randn(1, 7, 32, generator=g)
    ours = denoiser(x, torch.tensor(0.75), context)
    tokens = x[:, :, 0].view(1, 16, 4, 2, 6, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 24, 64)
    with torch.no_grad():
        direct = model(hidden_states=tokens, encoder_hidden_states=context, timestep=torch.tensor([0.75]),
                       img_shapes=[(1, 4, 6)], return_dict=False)[0]
    direct = direct.view(1, 4, 6, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 8, 12)
    assert relative_error(ours[:, :, 0], direct) < 1e-6


def test_rotary_positions_are_comfyuis():
    # ComfyUI: image token (r, c) at (0, r - rows//2, c - cols//2), text token k at s + k on every axis,
    # s = max(rows//2, cols//2). diffusers agrees on even grids, not on odd ones.
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    axes = (4, 14, 14)
    ours, theirs = ComfyRotaryTables(axes), QwenEmbedRope(10000, list(axes), scale_rope=True)
    for grid, agree in (((4, 6), True), ((3, 5), False)):
        image, text = ours([(1, *grid)], max_txt_seq_len=5)
        ref_image, ref_text = theirs([(1, *grid)], max_txt_seq_len=5)
        assert torch.allclose(text, ref_text, atol=1e-5)
        assert torch.allclose(image, ref_image, atol=1e-5) == agree
    image, _ = ours([(1, 3, 5)], max_txt_seq_len=1)
    # Row axis angles of token (r=0, c=0) are those of position -1 (3 // 2 = 1), column of -2.
    row_first = image[0, axes[0] // 2]
    assert torch.allclose(torch.angle(row_first), torch.tensor(-1.0), atol=1e-6)
    col_first = image[0, (axes[0] + axes[1]) // 2]
    assert torch.allclose(torch.angle(col_first), torch.tensor(-2.0), atol=1e-6)


def test_latent_format_is_comfyuis_wan21_and_a_4d_latent_gets_one_frame():
    engine = engine_for({})
    fmt = engine.family.latent
    assert fmt.channel_mean[0] == -0.7571 and fmt.channel_std[-1] == 1.9160 and fmt.scale == 1.0 and fmt.dimensions == 3
    image = request()
    image.latent = torch.zeros(1, 16, 6, 10)  # EmptySD3LatentImage: ComfyUI adds the frame axis
    image.steps = 1
    assert engine.sample(image).shape == (1, 16, 1, 6, 10)


def test_requests_made_for_other_families_and_videos_are_refused_by_name():
    engine = engine_for({})
    wan = request()
    wan.positive = WanConditioning(wan.positive.context)
    with pytest.raises(ValueError, match="WanConditioning, but the loaded Qwen-Image .* takes QwenImageConditioning"):
        engine.sample(wan)
    wide = request()
    wide.positive = QwenImageConditioning(torch.zeros(1, 9, 64))
    with pytest.raises(ValueError, match="text tokens are 64 wide but this Qwen-Image .* takes 32"):
        engine.sample(wide)
    video = request()
    video.latent = torch.zeros(1, 16, 2, 6, 10)
    with pytest.raises(ValueError, match="makes single images"):
        engine.sample(video)
