"""Every exact parallel method on Flux gives the same latents as one worker.

Tiny Flux (random weights, fixed seed), float32, gloo processes on the CPU. The latent is 10x14
(35 image tokens), so every sequence-parallel degree here needs padding, and the positive and
negative prompts have different text lengths that divide by nothing in particular.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from comfy_xdit.config import ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest
from checkpoints import make_flux_diffusers_model
from distributed import relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32


def tiny_flux() -> FluxTransformer2DModel:
    return make_flux_diffusers_model(num_layers=2, num_single_layers=2, heads=4, head_dim=16, seed=0)


def request(batch: int = 1, cfg: float = 2.0) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = FluxConditioning(torch.randn(1, 7, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    negative = FluxConditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    return SampleRequest(torch.zeros(batch, 4, 10, 14), positive, negative, seed=42, steps=3, cfg=cfg)


def generate(config_kwargs: dict, batch: int, cfg: float, wrong_shard_order: bool = False) -> torch.Tensor:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    config = ParallelConfig(devices=("cpu",) * world, **config_kwargs)
    mesh = ParallelMesh.build(config, torch.device("cpu"))
    engine = RankEngine(mesh)
    engine.set_model(tiny_flux(), ModelSpec("tiny", dtype="float32"))
    if wrong_shard_order:
        # Deliberately hand each rank another rank's shard: the comparison must catch it.
        forward = engine._denoiser.forward
        forward.shard_index = forward.degree - 1 - forward.shard_index
    return engine.sample(request(batch, cfg))


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(batch: int, cfg: float) -> torch.Tensor:
        if (batch, cfg) not in cache:
            cache[(batch, cfg)] = generate({}, batch, cfg)
        return cache[(batch, cfg)]

    return get


CASES = {
    "ulysses=2": (2, dict(ulysses_degree=2), 1),
    "ring=2": (2, dict(ring_degree=2), 1),
    "ulysses=2 x ring=2": (4, dict(ulysses_degree=2, ring_degree=2), 1),
    "cfg x ulysses=2": (4, dict(use_cfg_parallel=True, ulysses_degree=2), 1),
    "data=2 x ulysses=2": (4, dict(data_parallel_degree=2, ulysses_degree=2), 2),
    "cfg x ring=2": (4, dict(use_cfg_parallel=True, ring_degree=2), 1),
    "data=2, uneven batch of 3": (2, dict(data_parallel_degree=2), 3),
    # Eight ranks: the hybrid issue 12 names for 8 GPUs (cfg x ulysses x ring), all three
    # groups at once, each with its own collectives.
    "cfg x ulysses=2 x ring=2 (8 ranks)": (8, dict(use_cfg_parallel=True, ulysses_degree=2, ring_degree=2), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_equals_one_worker(name, reference):
    world, config_kwargs, batch = CASES[name]
    results = run_on_ranks(world, generate, config_kwargs, batch, 2.0)
    expected = reference(batch, 2.0)
    for rank, result in enumerate(results):
        assert result.shape == expected.shape
        error = relative_error(result, expected)
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"


def test_wrong_shard_order_is_caught(reference):
    results = run_on_ranks(2, generate, dict(ulysses_degree=2), 1, 2.0, True)
    assert relative_error(results[0], reference(1, 2.0)) > 100 * TOLERANCE


def test_cfg_one_skips_the_negative(reference):
    # cfg 1 must ignore the negative entirely (ComfyUI's optimisation), in parallel too.
    results = run_on_ranks(2, generate, dict(ring_degree=2), 1, 1.0)
    assert relative_error(results[0], reference(1, 1.0)) < TOLERANCE


# --- text tokens split across the sequence-parallel ranks -----------------------------------------
# With a text length that divides by the degree, each rank keeps only its shard of the text (the
# plan's split_text_inputs); the prompts below have 8 and 12 tokens. The 10x14 latent (35 tokens)
# still needs image padding, the 8x12 one (24 tokens) needs none.

def text_split_request(latent_hw: tuple[int, int]) -> SampleRequest:
    g = torch.Generator().manual_seed(2)
    positive = FluxConditioning(torch.randn(1, 8, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    negative = FluxConditioning(torch.randn(1, 12, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    return SampleRequest(torch.zeros(1, 4, *latent_hw), positive, negative, seed=7, steps=3, cfg=2.0)


def generate_text_split(config_kwargs: dict, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
    """The latents, and the text lengths this rank's transformer saw (one per model call)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = ParallelMesh.build(ParallelConfig(devices=("cpu",) * world, **config_kwargs), torch.device("cpu"))
    engine = RankEngine(mesh)
    model = tiny_flux()
    engine.set_model(model, ModelSpec("tiny", dtype="float32"))
    seen = []
    model.context_embedder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    return engine.sample(text_split_request(latent_hw)), seen


TEXT_SPLIT_CASES = {
    "ulysses=2": (2, dict(ulysses_degree=2), (10, 14)),
    "ring=2": (2, dict(ring_degree=2), (10, 14)),
    "ulysses=2 x ring=2": (4, dict(ulysses_degree=2, ring_degree=2), (10, 14)),
    "ulysses=4": (4, dict(ulysses_degree=4), (10, 14)),
    "cfg x ring=2": (4, dict(use_cfg_parallel=True, ring_degree=2), (10, 14)),
    "ulysses=2, no image padding": (2, dict(ulysses_degree=2), (8, 12)),
}


@pytest.fixture(scope="module")
def text_split_reference():
    cache = {}

    def get(latent_hw):
        if latent_hw not in cache:
            cache[latent_hw] = generate_text_split({}, latent_hw)
        return cache[latent_hw]

    return get


@pytest.mark.parametrize("name", list(TEXT_SPLIT_CASES))
def test_split_text_equals_one_worker(name, text_split_reference):
    world, config_kwargs, latent_hw = TEXT_SPLIT_CASES[name]
    expected, full_lengths = text_split_reference(latent_hw)
    assert set(full_lengths) == {8, 12}
    degree = config_kwargs.get("ulysses_degree", 1) * config_kwargs.get("ring_degree", 1)
    for rank, (result, lengths) in enumerate(run_on_ranks(world, generate_text_split, config_kwargs, latent_hw)):
        # The text really was split: every call saw its prompt's length over the degree.
        assert lengths and set(lengths) <= {8 // degree, 12 // degree}, f"rank {rank} saw text lengths {sorted(set(lengths))}"
        error = relative_error(result, expected)
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"
