"""First-Block-Cache and TeaCache under parallelism: one skip decision for all ranks, N workers == 1.

Tiny Flux (random weights), float32, gloo processes on the CPU, 8 euler steps, cfg 2 (so one
worker keeps a cache per branch). Random weights cannot calibrate quality; these tests check the
mechanics: threshold 0 changes nothing, every rank skips the same steps, and a parallel run with
the cache gives the latents of one worker with the same cache settings.
"""

from __future__ import annotations

import math

import pytest
import torch

from checkpoints import make_flux_diffusers_model
from comfy_xdit.caching.settings import CacheSettings
from comfy_xdit.config import ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest
from distributed import relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
STEPS = 8
# Chosen on this tiny model so that a quarter or more of the calls skip, without every call skipping.
THRESHOLDS = {"fbcache": 0.3, "teacache": 0.5}
KINDS = tuple(THRESHOLDS)


def request(batch: int, cache: CacheSettings | None) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = FluxConditioning(torch.randn(1, 7, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    negative = FluxConditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    # img2img from a latent whose top rows carry an image and whose bottom rows are empty, so the
    # sequence shards (runs of rows) change at different rates. 10x14 latent = 35 image tokens:
    # every sequence-parallel degree here pads the last shard.
    latent = torch.zeros(batch, 16, 10, 14)
    latent[:, :, :5] = 3 * torch.randn(batch, 16, 5, 14, generator=g)
    return SampleRequest(latent, positive, negative, seed=42, steps=STEPS, cfg=2.0, denoise=0.75, cache=cache)


def sample_with_caches(config_kwargs: dict, batch: int, caches: list) -> dict:
    """On every rank: {cache kind or "none": (latents, decisions as tuples)}, plus this rank's cfg index."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = ParallelMesh.build(ParallelConfig(devices=("cpu",) * world, **config_kwargs), torch.device("cpu"))
    engine = RankEngine(mesh)
    engine.set_model(make_flux_diffusers_model(num_layers=2, num_single_layers=2, heads=4, head_dim=16, seed=0),
                     ModelSpec("tiny", dtype="float32"))
    out = {"cfg_rank": mesh.local_rank("cfg")}
    for cache in caches:
        latents = engine.sample(request(batch, cache))
        out[cache.kind if cache else "none"] = (latents, [tuple(vars(d).values()) for d in engine.last_cache_record])
    return out


def skipped(decisions) -> int:
    return sum(1 for d in decisions if not d[2])


def schedule(decisions, branch: str) -> list[tuple[int, bool]]:
    return [(d[1], d[2]) for d in decisions if d[0] == branch]


CACHES = [CacheSettings(kind, THRESHOLDS[kind]) for kind in KINDS]


@pytest.fixture(scope="module")
def one_worker():
    cache = {}

    def get(batch: int) -> dict:
        if batch not in cache:
            cache[batch] = sample_with_caches({}, batch, [None, *CACHES])
        return cache[batch]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_zero_equals_no_cache(kind, one_worker):
    base = one_worker(1)["none"][0]
    result = sample_with_caches({}, 1, [CacheSettings(kind, 0.0)])[kind]
    latents, decisions = result
    assert torch.equal(latents, base)
    # The hooks did run and measure: every call computed, with a finite change after the first steps.
    assert len(decisions) == 2 * STEPS and skipped(decisions) == 0
    assert sum(math.isfinite(d[3]) for d in decisions) >= 2 * (STEPS - 2)


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_skips_a_quarter_of_the_calls(kind, one_worker):
    latents, decisions = one_worker(1)[kind]
    assert skipped(decisions) >= 0.25 * len(decisions), decisions
    assert skipped(decisions) < len(decisions) - 4
    # Skipping changed the result (else the comparisons below would prove nothing).
    assert relative_error(latents, one_worker(1)["none"][0]) > 1e-3


# Two launches of four processes cover Ulysses, Ring, CFG and data parallel (each spawn costs
# most of these tests' time on two cores).
CASES = {
    "cfg x ring=2": (4, dict(use_cfg_parallel=True, ring_degree=2), 1),
    "data=2 x ulysses=2, batch 2": (4, dict(data_parallel_degree=2, ulysses_degree=2), 2),
}


@pytest.fixture(scope="module")
def parallel():
    cache = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            world, config_kwargs, batch = CASES[name]
            cache[name] = run_on_ranks(world, sample_with_caches, config_kwargs, batch, CACHES)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_cache_skips_the_same_steps_and_equals_one_worker(name, parallel, one_worker):
    batch = CASES[name][2]
    ranks, reference = parallel(name), one_worker(batch)
    for kind in KINDS:
        expected_latents, expected_decisions = reference[kind]
        assert skipped(expected_decisions) >= 0.25 * len(expected_decisions)
        for rank, out in enumerate(ranks):
            latents, decisions = out[kind]
            # Under cfg parallel a rank's only branch is branch0; it is the one worker's branch<cfg rank>.
            branches = ["branch0"] if out["cfg_rank"] is not None and CASES[name][1].get("use_cfg_parallel") else ["branch0", "branch1"]
            for i, branch in enumerate(branches):
                theirs = f"branch{out['cfg_rank']}" if len(branches) == 1 else branch
                assert schedule(decisions, branch) == schedule(expected_decisions, theirs), f"{name} {kind} rank {rank}"
            error = relative_error(latents, expected_latents)
            assert error < TOLERANCE, f"{name} {kind}: rank {rank} differs from one worker by {error:.2e}"


def test_a_rank_local_decision_would_have_diverged(parallel):
    """On this input the ranks' own metrics differ enough that deciding on them would split the ranks.

    Ranks 0, 1 are the two ring shards of the conditional branch, ranks 2, 3 those of the
    unconditional one. Both shards of a branch record the same reduced value, but their own
    ratios differ, and at this threshold they fall on both sides of it at least once.
    """
    ranks = parallel("cfg x ring=2")
    threshold = THRESHOLDS["fbcache"]
    diverging = 0
    for a, b in ((0, 1), (2, 3)):
        mine, theirs = ranks[a]["fbcache"][1], ranks[b]["fbcache"][1]
        measured = [i for i, d in enumerate(mine) if math.isfinite(d[3])]
        assert measured
        assert all(mine[i][3] == theirs[i][3] for i in measured)  # one reduced value on both shards
        assert any(abs(mine[i][4] - theirs[i][4]) > 0.01 * mine[i][3] for i in measured)
        diverging += sum((mine[i][4] > threshold) != (theirs[i][4] > threshold) for i in measured)
    assert diverging >= 1


def test_pipefusion_controlnet_and_other_families_are_refused_with_what_to_change():
    from comfy_xdit.caching.job import cache_job_for
    from comfy_xdit.config import ConfigError
    from comfy_xdit.requests import ControlNetRequest

    cached = request(1, CacheSettings("fbcache"))
    pipefusion = ParallelMesh(ParallelConfig(devices=("cpu", "cpu"), pipefusion_parallel_degree=2), None, None, torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not work with PipeFusion: set the sampler's cache to none"):
        cache_job_for(cached, None, pipefusion, 1.15)
    one = ParallelMesh.build(ParallelConfig(devices=("cpu",)), torch.device("cpu"))
    cached.controlnets = (ControlNetRequest("control.safetensors", torch.zeros(1, 16, 10, 14)),)
    with pytest.raises(ConfigError, match="does not work with ControlNets yet: set the sampler's cache to none"):
        cache_job_for(cached, None, one, 1.15)
    with pytest.raises(ConfigError, match="teacache step cache is not available for sd3 models"):
        cache_job_for(request(1, CacheSettings("teacache")), None, one, 1.15, family="sd3")
