"""First-Block-Cache on SD3 / SD3.5: threshold 0 changes nothing, and N workers equal one worker.

Tiny SD3 transformers (random weights), float32, gloo processes on the CPU, 8 euler steps, cfg 4
(so one worker keeps a cache per branch). "sd3" has joint blocks only (2 blocks: the head and
the context-pre-only tail, whose text output is None); "sd3.5-dual" has 3 blocks with SD3.5's
image-only attn2 in the head and in the tail (the tail also context pre-only), and a middle
block that skipped steps pass through. As in test_step_cache.py, random weights check the
mechanics, not quality.
"""

from __future__ import annotations

import math

import pytest
import torch

from checkpoints import make_sd3_diffusers_model
from comfy_xdit.caching.settings import CacheSettings
from comfy_xdit.config import ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.requests import ModelSpec, SampleRequest, SD3Conditioning
from distributed import relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
STEPS = 8
ARCHITECTURES = {
    "sd3": dict(num_layers=2, heads=4, head_dim=8),
    "sd3.5-dual": dict(num_layers=3, heads=4, head_dim=8, dual_attention_layers=(0, 2), qk_norm="rms_norm"),
}
# Chosen on these tiny models so that a quarter or more of the calls skip, without every call skipping.
THRESHOLDS = {"sd3": 0.6, "sd3.5-dual": 0.5}


def request(batch: int, cache: CacheSettings | None) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = SD3Conditioning(torch.randn(1, 9, 32, generator=g), torch.randn(1, 24, generator=g))
    negative = SD3Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g))
    # img2img from a latent whose top rows carry an image and whose bottom rows are empty, so the
    # sequence shards change at different rates. 10x14 latent = 5x7 = 35 image tokens after the
    # 2x2 patches: sequence parallelism of 2 pads the last shard.
    latent = torch.zeros(batch, 16, 10, 14)
    latent[:, :, :5] = 3 * torch.randn(batch, 16, 5, 14, generator=g)
    return SampleRequest(latent, positive, negative, seed=42, steps=STEPS, cfg=4.0, denoise=0.75, cache=cache)


def sample_with_caches(arch: str, config_kwargs: dict, batch: int, thresholds: list) -> dict:
    """On every rank: {threshold or None: (latents, decisions as tuples)}, plus this rank's cfg index."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = ParallelMesh.build(ParallelConfig(devices=("cpu",) * world, **config_kwargs), torch.device("cpu"))
    engine = RankEngine(mesh)
    engine.set_model(make_sd3_diffusers_model(**ARCHITECTURES[arch], seed=0), ModelSpec("tiny", family="sd3", dtype="float32"))
    out = {"cfg_rank": mesh.local_rank("cfg")}
    for threshold in thresholds:
        cache = None if threshold is None else CacheSettings("fbcache", threshold)
        latents = engine.sample(request(batch, cache))
        out[threshold] = (latents, [tuple(vars(d).values()) for d in engine.last_cache_record])
    return out


def skipped(decisions) -> int:
    return sum(1 for d in decisions if not d[2])


def schedule(decisions, branch: str) -> list[tuple[int, bool]]:
    return [(d[1], d[2]) for d in decisions if d[0] == branch]


@pytest.fixture(scope="module")
def one_worker():
    cache = {}

    def get(arch: str, batch: int) -> dict:
        if (arch, batch) not in cache:
            cache[(arch, batch)] = sample_with_caches(arch, {}, batch, [None, 0.0, THRESHOLDS[arch]])
        return cache[(arch, batch)]

    return get


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_threshold_zero_equals_no_cache(arch, one_worker):
    result = one_worker(arch, 1)
    latents, decisions = result[0.0]
    assert torch.equal(latents, result[None][0])
    # The hooks did run and measure: every call computed, a finite change from the second step on.
    assert len(decisions) == 2 * STEPS and skipped(decisions) == 0
    assert sum(math.isfinite(d[3]) for d in decisions) == 2 * (STEPS - 1)
    # Steps come from SD3's own (discrete flow) schedule: each branch is called once per step.
    for branch in ("branch0", "branch1"):
        assert [step for step, _ in schedule(decisions, branch)] == list(range(STEPS))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_threshold_skips_a_quarter_of_the_calls(arch, one_worker):
    result = one_worker(arch, 1)
    latents, decisions = result[THRESHOLDS[arch]]
    assert skipped(decisions) >= 0.25 * len(decisions), decisions
    assert skipped(decisions) < len(decisions) - 4
    # Skipping changed the result (else the parallel comparisons below would prove nothing).
    assert relative_error(latents, result[None][0]) > 1e-3


# (config, batch) for the 2-rank comparisons; all of them run in one launch of two processes.
CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2, batch 2": (dict(data_parallel_degree=2), 2),
}


def sample_all_cases() -> dict:
    return {(arch, name): sample_with_caches(arch, config_kwargs, batch, [THRESHOLDS[arch]])
            for arch in ARCHITECTURES for name, (config_kwargs, batch) in CASES.items()}


@pytest.fixture(scope="module")
def two_workers():
    return run_on_ranks(2, sample_all_cases)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_parallel_cache_skips_the_same_steps_and_equals_one_worker(arch, name, two_workers, one_worker):
    config_kwargs, batch = CASES[name]
    threshold = THRESHOLDS[arch]
    expected_latents, expected_decisions = one_worker(arch, batch)[threshold]
    for rank, results in enumerate(two_workers):
        out = results[(arch, name)]
        latents, decisions = out[threshold]
        if config_kwargs.get("use_cfg_parallel"):  # a cfg rank's only branch is one worker's branch<cfg rank>
            pairs = [("branch0", f"branch{out['cfg_rank']}")]
        else:
            pairs = [("branch0", "branch0"), ("branch1", "branch1")]
        for mine, theirs in pairs:
            assert schedule(decisions, mine) == schedule(expected_decisions, theirs), f"{arch} {name} rank {rank}"
            # The decided-on value is one worker's: summed over both shards' real tokens (padding
            # excluded) and both data ranks' rows. Up to float32 summation order.
            ours = [d[3] for d in decisions if d[0] == mine]
            reference = [d[3] for d in expected_decisions if d[0] == theirs]
            for a, b in zip(ours, reference, strict=True):
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * b, f"{arch} {name} rank {rank}: {a} != {b}"
        error = relative_error(latents, expected_latents)
        assert error < TOLERANCE, f"{arch} {name}: rank {rank} differs from one worker by {error:.2e}"


@pytest.mark.parametrize("name", ["ulysses=2", "ring=2"])
def test_the_shards_own_metrics_differ_but_the_decision_is_shared(name, two_workers):
    """The two sequence shards see different changes; both decide on the same reduced value."""
    mine, theirs = (results[("sd3.5-dual", name)][THRESHOLDS["sd3.5-dual"]][1] for results in two_workers)
    measured = [i for i, d in enumerate(mine) if math.isfinite(d[3])]
    assert measured and all(mine[i][3] == theirs[i][3] for i in measured)
    assert any(abs(mine[i][4] - theirs[i][4]) > 0.01 * mine[i][3] for i in measured)


def test_teacache_is_refused_for_sd3_with_the_reason_and_what_to_choose():
    from comfy_xdit.caching.job import cache_job_for
    from comfy_xdit.config import ConfigError

    one = ParallelMesh.build(ParallelConfig(devices=("cpu",)), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"teacache step cache is not available for sd3 models \(TeaCache has no published "
                                          r"rescale coefficients for SD3/SD3.5\) \(available: fbcache\); set the sampler's "
                                          r"cache to fbcache or none"):
        cache_job_for(request(1, CacheSettings("teacache")), None, one, 3.0, family="sd3")
