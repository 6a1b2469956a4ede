"""Flux's single blocks with the Ulysses all-to-all beside their MLP (ulysses_overlap_mlp) give the
same latents as without it, bit for bit, and as one worker; by default it is on, with 2 head chunks.

Tiny Flux, float32, gloo processes on the CPU, both Ulysses text paths (text split with the image,
text whole), alone and with head chunks, eager and compiled. Each run also reports how many
all-to-alls the overlapping forward started, so a forward that silently fell back to diffusers'
order (exact, but with nothing overlapped) fails too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed._functional_collectives import AsyncCollectiveTensor

from comfy_xdit.attention.usp import SequenceLayout, SequenceParallelAttention, auto_head_chunks
from comfy_xdit.config import ConfigError, ParallelConfig
from comfy_xdit.models import flux_overlap
from comfy_xdit.requests import ModelSpec
from checkpoints import make_flux_diffusers_model
from distributed import cpu_engine, relative_error, run_on_ranks
from test_parallel_flux import request, text_split_request

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
SINGLE_BLOCKS = 2
STEPS = 2
PLAIN_ULYSSES = dict(ulysses_degree=2, ulysses_overlap_mlp=False, ulysses_head_chunks=1)


def generate(config_kwargs: dict, text_split: bool, compile: bool = False) -> tuple[torch.Tensor, int, int]:
    """Latents, the all-to-alls the overlapping forward started, and dynamo's graph breaks."""
    engine = cpu_engine(config_kwargs)
    model = make_flux_diffusers_model(num_layers=1, num_single_layers=SINGLE_BLOCKS, heads=4, head_dim=8, seed=0)
    started = []
    original_start = SequenceParallelAttention.start

    def counted_start(self, *args, **kwargs):
        started.append(1)
        return original_start(self, *args, **kwargs)

    SequenceParallelAttention.start = counted_start  # this rank's process only
    engine.set_model(model, ModelSpec("tiny", dtype="float32", compile=compile))
    counters.clear()
    sample = text_split_request((8, 12)) if text_split else request(cfg=2.0)
    # cfg 1 when compiled: one prompt length, so one compile (the test stays near a minute)
    latent = engine.sample(dataclasses.replace(sample, steps=STEPS, cfg=1.0 if compile else sample.cfg))
    return latent, len(started), sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def plain_ulysses():
    """Latents of ulysses=2 without either overlap, per (text_split, compiled)."""
    cache = {}

    def get(text_split: bool, compile: bool = False) -> torch.Tensor:
        if (text_split, compile) not in cache:
            cache[(text_split, compile)] = run_on_ranks(2, generate, PLAIN_ULYSSES, text_split, compile)[0][0]
        return cache[(text_split, compile)]

    return get


def model_calls(text_split: bool) -> int:
    # the text-split request has two prompts of different lengths (one call each), the other a CFG batch
    return STEPS * (2 if text_split else 1)


@pytest.mark.parametrize("text_split", [True, False], ids=["text split", "text whole"])
@pytest.mark.parametrize("chunks", [1, 2], ids=["one chunk", "2 head chunks"])
def test_overlap_equals_plain_ulysses_and_one_worker(text_split, chunks, plain_ulysses):
    config = dict(ulysses_degree=2, ulysses_overlap_mlp=True, ulysses_head_chunks=chunks)
    one_worker = run_on_ranks(1, generate, {}, text_split)[0][0]
    expected = plain_ulysses(text_split)
    for rank, (latent, started, _) in enumerate(run_on_ranks(2, generate, config, text_split)):
        assert started >= SINGLE_BLOCKS * model_calls(text_split), f"rank {rank}: the overlapping forward did not run"
        if chunks == 1:  # the same operations in another order: bit-identical
            assert torch.equal(latent, expected), f"rank {rank}: differs from plain Ulysses"
        error = relative_error(latent, one_worker)
        assert error < TOLERANCE, f"rank {rank} differs from one worker by {error:.2e}"


def test_overlaps_are_the_default(plain_ulysses):
    # ulysses=2 and nothing else set: the MLP overlap and 2 head chunks (4 heads, 2 a rank)
    assert auto_head_chunks(2, 2, 1) == 2
    for rank, (latent, started, _) in enumerate(run_on_ranks(2, generate, dict(ulysses_degree=2), True)):
        assert started >= SINGLE_BLOCKS * model_calls(True), f"rank {rank}: the overlapping forward is not the default"
        error = relative_error(latent, plain_ulysses(True))
        assert error < TOLERANCE, f"rank {rank} differs from plain Ulysses by {error:.2e}"


def test_automatic_head_chunks():
    assert [auto_head_chunks(heads, 2, 1) for heads in (1, 2, 3, 12)] == [1, 2, 1, 2]
    assert auto_head_chunks(12, 2, 2) == 1  # with a ring: no pipelining
    assert auto_head_chunks(12, 1, 1) == 1  # no Ulysses
    config = ParallelConfig(ulysses_degree=2, devices=("cpu",) * 2)
    assert config.ulysses_head_chunks is None and config.overlaps_mlp
    assert not ParallelConfig(ulysses_degree=2, ring_degree=2, devices=("cpu",) * 4).overlaps_mlp
    assert not ParallelConfig(ulysses_degree=2, pipefusion_parallel_degree=2, devices=("cpu",) * 4).overlaps_mlp


def test_compiled_overlap_equals_plain_ulysses(plain_ulysses):
    config = dict(ulysses_degree=2, ulysses_overlap_mlp=True, ulysses_head_chunks=1)
    expected = plain_ulysses(True, compile=True)
    for rank, (latent, started, breaks) in enumerate(run_on_ranks(2, generate, config, True, True)):
        assert started >= SINGLE_BLOCKS, f"rank {rank}: the compiled blocks did not trace the overlapping forward"
        assert breaks == 0, f"rank {rank}: {breaks} graph breaks in the compiled blocks"
        error = relative_error(latent, expected)
        assert error < TOLERANCE, f"compiled: rank {rank} differs from plain Ulysses by {error:.2e}"


def _start_is_asynchronous() -> bool:
    attention = SequenceParallelAttention(dist.group.WORLD, None, None)
    q = torch.randn(1, 6, 4, 8)
    layout = SequenceLayout(text_tokens=2, image_tokens=8, padded_image_tokens=8, text_sharded=False)
    in_flight = attention.start(q, q.clone(), q.clone(), layout)
    pending = isinstance(in_flight.scattered[0], AsyncCollectiveTensor)
    attention.finish(in_flight, layout)
    return pending


def test_start_returns_before_the_all_to_all_arrives():
    # Eager overlap rests on this: start hands back a tensor that waits on first use.
    assert run_on_ranks(2, _start_is_asynchronous) == [True, True]


def _compiled_block_code() -> str:
    """Inductor's code for one overlapping single block (ulysses=2, this rank)."""
    from torch._inductor.utils import run_and_get_code

    engine = cpu_engine(dict(ulysses_degree=2, ulysses_overlap_mlp=True, ulysses_head_chunks=1))
    model = make_flux_diffusers_model(num_layers=1, num_single_layers=1, heads=4, head_dim=8, seed=0)
    engine.set_model(model, ModelSpec("tiny", dtype="float32", compile=True))
    sample = text_split_request((8, 12))
    _, code = run_and_get_code(engine.sample, dataclasses.replace(sample, steps=1, cfg=1.0))
    return "\n".join(code)


def mm_between_issue_and_wait(graph_code: str) -> bool:
    """Whether a GEMM runs between the first all-to-all of a compiled graph and its wait."""
    if "all_to_all_single.default(" not in graph_code:
        return False
    issued = graph_code.index("all_to_all_single.default(")
    waited = graph_code.index("wait_tensor.default(", issued)
    return "mm(" in graph_code[issued:waited]


def test_compiled_single_block_waits_after_the_mlp():
    graphs = run_on_ranks(2, _compiled_block_code)[0].split("def call(self, args)")[1:]
    # the double block has nothing to overlap (its wait follows at once); the single block queues the
    # MLP projection between issuing the q/k/v all-to-all and waiting for it
    assert [mm_between_issue_and_wait(g) for g in graphs] == [False, True], \
        "inductor waits for the single block's all-to-all before its MLP runs"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ulysses_overlap_mlp=True), "needs ulysses_degree > 1 and ring_degree=1"),
        (dict(ulysses_degree=2, ring_degree=2, ulysses_overlap_mlp=True), "needs ulysses_degree > 1 and ring_degree=1"),
        (dict(ulysses_degree=2, pipefusion_parallel_degree=2, ulysses_overlap_mlp=True), "no pipefusion_parallel_degree=2"),
        (dict(ulysses_degree=2, ulysses_overlap_mlp=1), "must be true, false or null"),
    ],
)
def test_bad_overlap_settings_are_refused(kwargs, message):
    world = 1
    for name in ("ulysses_degree", "ring_degree", "pipefusion_parallel_degree"):
        world *= kwargs.get(name, 1)
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(devices=("cpu",) * world, **kwargs)


def test_overlap_is_flux_only():
    config = ParallelConfig(ulysses_degree=2, ulysses_overlap_mlp=True, devices=("cpu",) * 2)
    config.check_model(num_heads=24, family="Flux.1 (dev, schnell)")
    with pytest.raises(ConfigError, match="Flux only"):
        config.check_model(num_heads=24, family="Stable Diffusion 3 / 3.5")


def test_other_processors_keep_diffusers_order():
    # Without our processor (one worker) the overlapping forward is diffusers' own.
    model = make_flux_diffusers_model(num_layers=0, num_single_layers=1, heads=4, head_dim=8, seed=0)
    block = model.single_transformer_blocks[0]
    x, text, temb = torch.randn(1, 6, 32), torch.randn(1, 3, 32), torch.randn(1, 32)
    expected = block(x, text, temb)
    assert flux_overlap.overlap_single_blocks(model) == 1
    for got, want in zip(block(x, text, temb), expected):
        assert torch.equal(got, want)
