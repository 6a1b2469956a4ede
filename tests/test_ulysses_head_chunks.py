"""Ulysses in head chunks pipelined with attention (ulysses_head_chunks) gives one worker's latents.

Tiny Flux, float32, gloo processes on the CPU. Both Ulysses paths are covered: the text split with
the image (text lengths 8 and 12 divide by 2) and the text kept whole (lengths 7 and 5). A worker
whose chunks come back in the wrong order must be caught by the same comparison.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from comfy_xdit.attention import ulysses_chunks
from comfy_xdit.attention.usp import SequenceParallelAttention
from comfy_xdit.config import ConfigError, ParallelConfig
from comfy_xdit.models.flux import ParallelFluxAttnProcessor
from comfy_xdit.requests import ModelSpec
from checkpoints import make_flux_diffusers_model
from distributed import cpu_engine, relative_error, run_on_ranks
from test_parallel_flux import request, text_split_request

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32


class SwappedChunks(SequenceParallelAttention):
    """Fault injection: puts the chunks' outputs back in reverse order."""

    def _join_head_chunks(self, gathered):
        return super()._join_head_chunks(gathered[::-1])


def flux(heads: int):
    return make_flux_diffusers_model(num_layers=1, num_single_layers=1, heads=heads, head_dim=8, seed=0)


def generate(heads: int, text_split: bool, config_kwargs: dict, compile: bool = False,
             swap_chunks: bool = False, cfg_one: bool = False) -> tuple[torch.Tensor, set[int], int]:
    """Latents, the head_chunks every attention of the model ran with, and dynamo's graph breaks."""
    engine = cpu_engine(config_kwargs)
    model = flux(heads)
    engine.set_model(model, ModelSpec("tiny", dtype="float32", compile=compile))
    processors = model.attn_processors.values()
    if swap_chunks:
        attention = next(iter(processors)).attention
        model.set_attn_processor(ParallelFluxAttnProcessor(
            SwappedChunks(attention.ulysses_group, attention.ring_group, attention.lse_kernel, attention.head_chunks)))
    chunks = {p.attention.head_chunks for p in model.attn_processors.values()} if len(engine.mesh.config.devices) > 1 else set()
    counters.clear()
    sample = text_split_request((8, 12)) if text_split else request(cfg=2.0)
    latent = engine.sample(dataclasses.replace(sample, steps=2, cfg=1.0 if cfg_one else sample.cfg))
    return latent, chunks, sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(heads: int, text_split: bool, cfg_one: bool = False) -> torch.Tensor:
        if (heads, text_split, cfg_one) not in cache:
            cache[(heads, text_split, cfg_one)] = generate(heads, text_split, {}, cfg_one=cfg_one)[0]
        return cache[(heads, text_split, cfg_one)]

    return get


CASES = {
    "2 chunks, text split": (4, True, 2),
    "2 chunks, text whole": (4, False, 2),
    "4 chunks, text split": (8, True, 4),
    "4 chunks, text whole": (8, False, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_head_chunks_equal_one_worker(name, reference):
    heads, text_split, chunks = CASES[name]
    expected = reference(heads, text_split)
    config = dict(ulysses_degree=2, ulysses_head_chunks=chunks)
    for rank, (latent, used, _) in enumerate(run_on_ranks(2, generate, heads, text_split, config)):
        assert used == {chunks}, f"rank {rank} ran with head_chunks {used}"
        error = relative_error(latent, expected)
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"


@pytest.mark.parametrize("text_split", [True, False], ids=["text split", "text whole"])
def test_swapped_chunks_are_caught(text_split, reference):
    config = dict(ulysses_degree=2, ulysses_head_chunks=2)
    latent, _, _ = run_on_ranks(2, generate, 4, text_split, config, False, True)[0]
    assert relative_error(latent, reference(4, text_split)) > 100 * TOLERANCE


def test_compiled_head_chunks_equal_one_worker(reference):
    config = dict(ulysses_degree=2, ulysses_head_chunks=2)
    # cfg 1: one prompt length, so one compile (keeps the test near a minute on two shared cores)
    for rank, (latent, used, breaks) in enumerate(run_on_ranks(2, generate, 4, True, config, True, False, True)):
        assert used == {2}
        # the functional all-to-alls trace: the blocks compile whole
        assert breaks == 0, f"rank {rank}: {breaks} graph breaks in the compiled blocks"
        error = relative_error(latent, reference(4, True, cfg_one=True))
        assert error < TOLERANCE, f"compiled: rank {rank} differs from one worker by {error:.2e}"


@pytest.mark.parametrize("batch", [1, 2])
def test_received_chunk_unpacks_in_place_at_batch_one(batch):
    """At batch 1 the received q, k, v are views in the packed-QKV layout (no copy before attention);
    at any batch each holds the source ranks' tokens in rank order."""
    degree, tokens, heads, dim = 2, 5, 3, 4
    received = torch.randn(degree, batch, tokens, 3, heads, dim)
    for i, x in enumerate(ulysses_chunks.unpack_scattered(received)):
        expected = torch.cat([received[r, :, :, i] for r in range(degree)], dim=1)
        assert torch.equal(x, expected)
        if batch == 1:
            assert x.data_ptr() == received[:, :, :, i].data_ptr()
            # [B, S, H, D] strides of a token-major q|k|v buffer: tokens 3 H D apart, heads D
            assert x.stride()[1:] == (3 * heads * dim, dim, 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ulysses_degree=2, ulysses_head_chunks=0), "ulysses_head_chunks must be a whole number"),
        (dict(ring_degree=2, ulysses_head_chunks=2), "needs ulysses_degree > 1 and ring_degree=1"),
        (dict(ulysses_degree=2, ring_degree=2, ulysses_head_chunks=2), "needs ulysses_degree > 1 and ring_degree=1"),
    ],
)
def test_bad_head_chunks_are_refused(kwargs, message):
    world = kwargs.get("ulysses_degree", 1) * kwargs.get("ring_degree", 1)
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(devices=("cpu",) * world, **kwargs)


def test_head_chunks_must_divide_each_ranks_heads():
    config = ParallelConfig(ulysses_degree=2, ulysses_head_chunks=4, devices=("cpu",) * 2)
    config.check_model(num_heads=24, family="Flux.1 (dev, schnell)")  # 12 heads a rank: 4 chunks of 3
    with pytest.raises(ConfigError, match=r"ulysses_head_chunks=4 does not divide the 6 heads .*\[1, 2, 3, 6\]"):
        config.check_model(num_heads=12, family="Flux.1 (dev, schnell)")
    with pytest.raises(ConfigError, match="Flux only"):
        config.check_model(num_heads=24, family="Stable Diffusion 3 / 3.5")
