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

from comfy_xdit.config import ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.requests import MochiConditioning, ModelSpec, SampleRequest, WanConditioning
from checkpoints import make_mochi_diffusers_model
from distributed import relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
LATENT = (12, 3, 6, 10)
TEXT_DIM = 32


def tiny_mochi():
    return make_mochi_diffusers_model(num_layers=2, heads=2, head_dim=8, pooled_dim=8, text_dim=TEXT_DIM, seed=0)


def conditioning(tokens: int, seed: int) -> MochiConditioning:
    return MochiConditioning(torch.randn(1, tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))


def request(batch: int = 1, cfg: float = 4.5, sampler: str = "euler") -> SampleRequest:
    return SampleRequest(torch.zeros(batch, *LATENT), conditioning(9, 1), conditioning(5, 2), seed=42, steps=3,
                         cfg=cfg, sampler_name=sampler)


def engine_for(config_kwargs: dict) -> RankEngine:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    config = ParallelConfig(devices=("cpu",) * world, **config_kwargs)
    engine = RankEngine(ParallelMesh.build(config, torch.device("cpu")))
    engine.set_model(tiny_mochi(), ModelSpec("tiny", family="mochi", dtype="float32"))
    return engine


def generate(config_kwargs: dict, batch: int, wrong_shard_order: bool = False, sampler: str = "euler") -> torch.Tensor:
    engine = engine_for(config_kwargs)
    if wrong_shard_order:
        # Deliberately hand each rank another rank's shard: the comparison must catch it.
        forward = engine._denoiser.forward
        forward.shard_index = forward.degree - 1 - forward.shard_index
    return engine.sample(request(batch, sampler=sampler))


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(batch: int, sampler: str = "euler") -> torch.Tensor:
        if (batch, sampler) not in cache:
            cache[(batch, sampler)] = generate({}, batch, sampler=sampler)
        return cache[(batch, sampler)]

    return get


CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2": (dict(data_parallel_degree=2), 2),
}
WRONG_ORDER = "ulysses=2, shards swapped"
ANCESTRAL = "ring=2, euler_ancestral"


def generate_all_cases() -> dict:
    """Every case on the same two ranks: one process start for all of them."""
    results = {name: generate(config_kwargs, batch) for name, (config_kwargs, batch) in CASES.items()}
    results[WRONG_ORDER] = generate(dict(ulysses_degree=2), 1, wrong_shard_order=True)
    results[ANCESTRAL] = generate(dict(ring_degree=2), 1, sampler="euler_ancestral")
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


def test_wrong_shard_order_is_caught(two_workers, reference):
    assert relative_error(two_workers[0][WRONG_ORDER], reference(1)) > 100 * TOLERANCE


def test_ulysses_times_ring_on_four_workers(reference):
    results = run_on_ranks(4, generate, dict(ulysses_degree=2, ring_degree=2), 1)
    for rank, result in enumerate(results):
        assert relative_error(result, reference(1)) < TOLERANCE, f"rank {rank}"


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
