"""torch.compile of the transformer blocks: same latents as eager, no recompile for a new prompt.

Tiny Flux on the CPU with inductor (the real compiler, C++ kernels built by the machine's gcc).
Compiled and eager kernels may order float additions differently, hence the tolerance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from comfy_xdit.config import ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.requests import ModelSpec
from distributed import relative_error, run_on_ranks
from test_parallel_flux import request, tiny_flux

TOLERANCE = 1e-4


def generate(compile: bool, seeds: tuple[int, ...], degrees: dict | None = None) -> tuple[list[torch.Tensor], list[int], int]:
    """Latents for each seed, how many graphs dynamo had compiled after each job, and its graph breaks."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    config = ParallelConfig(devices=("cpu",) * world, **(degrees or {}))
    engine = RankEngine(ParallelMesh.build(config, torch.device("cpu")))
    engine.set_model(tiny_flux(), ModelSpec("tiny", dtype="float32", compile=compile))
    latents, graphs = [], []
    for seed in seeds:
        latents.append(engine.sample(dataclasses.replace(request(cfg=1.0), seed=seed)))
        graphs.append(counters["stats"]["unique_graphs"])
    return latents, graphs, sum(counters["graph_break"].values())


def test_compiled_equals_eager_and_a_new_seed_does_not_recompile():
    torch._dynamo.reset()
    counters.clear()
    eager, _, _ = generate(False, (42, 7))
    compiled, graphs, _ = generate(True, (42, 7))
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[1] == graphs[0], f"the second prompt of the same shape recompiled ({graphs[0]} -> {graphs[1]} graphs)"
    for e, c in zip(eager, compiled):
        assert relative_error(c, e) < TOLERANCE
    assert relative_error(compiled[0], compiled[1]) > 1e-2  # the two seeds really are two prompts


@pytest.mark.parametrize("degrees", [dict(ring_degree=2), dict(ulysses_degree=2), dict(tensor_parallel_degree=2)],
                         ids=["ring=2", "ulysses=2", "tensor=2"])
def test_compiled_sequence_parallel_equals_one_eager_worker(degrees):
    (expected,), _, _ = generate(False, (42,))
    for (latent,), graphs, breaks in run_on_ranks(2, generate, True, (42,), degrees):
        assert graphs[0] > 0
        # the ring's send/recv sits behind one custom op, tensor parallel's all-reduce is traced: blocks compile whole
        if "ring_degree" in degrees or "tensor_parallel_degree" in degrees:
            assert breaks == 0, f"{breaks} graph breaks inside the compiled blocks"
        assert relative_error(latent, expected) < TOLERANCE
