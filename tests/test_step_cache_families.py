"""Step caches on PixArt, Wan and Qwen-Image: threshold 0 changes nothing, and 2 workers equal one worker.

Tiny diffusers transformers (random weights), float32, gloo processes on the CPU, euler steps with
cfg (so one worker keeps a cache per branch). The blocks differ from Flux's: PixArt's and Wan's
return the image stream only (Wan's are called positionally and get no attention kwargs, so the
metric asks the sharded forward for the layout); Qwen-Image's return (text, image). Every latent
gives a token count that sequence parallelism of 2 must pad, so a metric that counted the padding
would differ from one worker's. TeaCache on Wan measures the blocks' timestep modulation with the
TeaCache4Wan2.1 polynomial and always runs the first 5 steps. As in test_step_cache.py, random
weights check the mechanics, not quality; thresholds are chosen on these tiny models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from checkpoints import make_qwen_image_diffusers_model, make_wan_diffusers_model
from comfy_xdit.caching.settings import CacheSettings
from comfy_xdit.config import ParallelConfig
from comfy_xdit.engine import RankEngine
from comfy_xdit.mesh import ParallelMesh
from comfy_xdit.requests import ModelSpec, PixArtConditioning, QwenImageConditioning, SampleRequest, WanConditioning
from distributed import relative_error, run_on_ranks
from pixart_files import make_pixart_diffusers_model

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32


@dataclass(frozen=True)
class Family:
    make_model: object
    conditioning: type
    latent: tuple[int, ...]  # [C, (T,) H, W] of one image; the top half carries an image, the rest is empty
    steps: int
    scheduler: str = "simple"


def tiny_wan():
    model = make_wan_diffusers_model(num_layers=3, heads=2, head_dim=8, ffn_dim=32, text_dim=32, seed=0)
    # Random weights make the timestep modulation change by 40-150 % a step, far outside the range
    # TeaCache4Wan2.1's polynomial was fitted on (a few % a step), where it turns negative. An
    # offset of about 20x its mean size brings the changes to a few %, so the rescaled sum grows.
    with torch.no_grad():
        model.condition_embedder.time_proj.bias += 3.0
    return model


FAMILIES = {
    # 34x34 latent -> 17x17 = 289 tokens (PixArt needs (H + W) / 2 >= 264 px)
    "pixart": Family(lambda: make_pixart_diffusers_model(num_layers=3), PixArtConditioning, (4, 34, 34), 8, "normal"),
    # 3 frames of 6x10 -> 45 tokens; 10 steps: TeaCache4Wan2.1 always runs the first 5
    "wan": Family(tiny_wan, WanConditioning, (16, 3, 6, 10), 10),
    # one frame of 6x10 -> 15 tokens
    "qwen_image": Family(lambda: make_qwen_image_diffusers_model(num_layers=3, heads=2, head_dim=32, joint_attention_dim=32, seed=0),
                         QwenImageConditioning, (16, 1, 6, 10), 8),
}
# (family, cache) -> a threshold at which a quarter or more of the calls skip, without every call skipping.
THRESHOLDS = {
    ("pixart", "fbcache"): 0.4,
    ("wan", "fbcache"): 0.09,
    ("wan", "teacache"): 0.3,
    ("qwen_image", "fbcache"): 0.95,
}


def request(family: str, batch: int, cache: CacheSettings | None) -> SampleRequest:
    spec = FAMILIES[family]
    g = torch.Generator().manual_seed(1)
    positive = spec.conditioning(torch.randn(1, 9, 32, generator=g))
    negative = spec.conditioning(torch.randn(1, 5, 32, generator=g))
    # img2img from a latent whose top rows carry an image and whose bottom rows are empty, so the
    # sequence shards change at different rates.
    latent = torch.zeros(batch, *spec.latent)
    rows = spec.latent[-2] // 2
    latent[..., :rows, :] = 3 * torch.randn(batch, *spec.latent[:-2], rows, spec.latent[-1], generator=g)
    return SampleRequest(latent, positive, negative, seed=42, steps=spec.steps, cfg=4.0, denoise=0.75,
                         scheduler=spec.scheduler, cache=cache)


def sample_with_caches(family: str, kind: str, config_kwargs: dict, batch: int, thresholds: list) -> dict:
    """On every rank: {threshold or None: (latents, decisions as tuples)}, plus this rank's cfg index."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = ParallelMesh.build(ParallelConfig(devices=("cpu",) * world, **config_kwargs), torch.device("cpu"))
    engine = RankEngine(mesh)
    engine.set_model(FAMILIES[family].make_model(), ModelSpec("tiny", family=family, dtype="float32"))
    out = {"cfg_rank": mesh.local_rank("cfg")}
    for threshold in thresholds:
        cache = None if threshold is None else CacheSettings(kind, threshold)
        latents = engine.sample(request(family, batch, cache))
        out[threshold] = (latents, [tuple(vars(d).values()) for d in engine.last_cache_record])
    return out


def skipped(decisions) -> int:
    return sum(1 for d in decisions if not d[2])


def schedule(decisions, branch: str) -> list[tuple[int, bool]]:
    return [(d[1], d[2]) for d in decisions if d[0] == branch]


@pytest.fixture(scope="module")
def one_worker():
    """(family, kind, batch, threshold) -> one worker's (latents, decisions), each run once per module."""
    cache = {}

    def get(family: str, kind: str, batch: int, threshold) -> tuple:
        key = (family, None if threshold is None else kind, batch, threshold)  # no cache: the same run for every kind
        if key not in cache:
            cache[key] = sample_with_caches(family, kind, {}, batch, [threshold])[threshold]
        return cache[key]

    return get


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_zero_equals_no_cache(family, kind, one_worker):
    steps = FAMILIES[family].steps
    latents, decisions = one_worker(family, kind, 1, 0.0)
    assert torch.equal(latents, one_worker(family, kind, 1, None)[0])
    # The hooks did run: every call computed, each branch called once per step of the family's schedule.
    assert len(decisions) == 2 * steps and skipped(decisions) == 0
    for branch in ("branch0", "branch1"):
        assert [step for step, _ in schedule(decisions, branch)] == list(range(steps))
    measured = sum(math.isfinite(d[3]) for d in decisions)
    # First-Block-Cache measures from the second step on; TeaCache4Wan2.1 only after its 5 retained steps.
    assert measured == 2 * (steps - 1 if kind == "fbcache" else steps - 5)


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_skips_a_quarter_of_the_calls(family, kind, one_worker):
    latents, decisions = one_worker(family, kind, 1, THRESHOLDS[(family, kind)])
    assert skipped(decisions) >= 0.25 * len(decisions), decisions
    assert skipped(decisions) < len(decisions) - 4
    # Skipping changed the result (else the parallel comparisons below would prove nothing).
    assert relative_error(latents, one_worker(family, kind, 1, None)[0]) > 1e-3


# (config, batch) for the 2-rank comparisons of every family; all run in one launch of two processes.
CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2, batch 2": (dict(data_parallel_degree=2), 2),
}
# Ulysses for each, plus cfg or data parallel (alternating, to keep the launch short).
PARALLEL = [("pixart", "fbcache", "ulysses=2"), ("pixart", "fbcache", "data=2, batch 2"),
            ("wan", "fbcache", "ulysses=2"), ("wan", "fbcache", "cfg parallel"),
            ("wan", "teacache", "ulysses=2"), ("wan", "teacache", "data=2, batch 2"),
            ("qwen_image", "fbcache", "ulysses=2"), ("qwen_image", "fbcache", "cfg parallel")]


def sample_all_cases() -> dict:
    return {(family, kind, name): sample_with_caches(family, kind, CASES[name][0], CASES[name][1], [THRESHOLDS[(family, kind)]])
            for family, kind, name in PARALLEL}


@pytest.fixture(scope="module")
def two_workers():
    return run_on_ranks(2, sample_all_cases)


@pytest.mark.parametrize("family, kind, name", PARALLEL)
def test_parallel_cache_skips_the_same_steps_and_equals_one_worker(family, kind, name, two_workers, one_worker):
    config_kwargs, batch = CASES[name]
    threshold = THRESHOLDS[(family, kind)]
    expected_latents, expected_decisions = one_worker(family, kind, batch, threshold)
    for rank, results in enumerate(two_workers):
        out = results[(family, kind, name)]
        latents, decisions = out[threshold]
        if config_kwargs.get("use_cfg_parallel"):  # a cfg rank's only branch is one worker's branch<cfg rank>
            pairs = [("branch0", f"branch{out['cfg_rank']}")]
        else:
            pairs = [("branch0", "branch0"), ("branch1", "branch1")]
        for mine, theirs in pairs:
            assert schedule(decisions, mine) == schedule(expected_decisions, theirs), f"{family} {kind} {name} rank {rank}"
            # The decided-on value is one worker's: summed over both shards' real tokens (padding
            # excluded) and both data ranks' rows. Up to float32 summation order.
            ours = [d[3] for d in decisions if d[0] == mine]
            reference = [d[3] for d in expected_decisions if d[0] == theirs]
            for a, b in zip(ours, reference, strict=True):
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * abs(b), f"{family} {name} rank {rank}: {a} != {b}"
        error = relative_error(latents, expected_latents)
        assert error < TOLERANCE, f"{family} {kind} {name}: rank {rank} differs from one worker by {error:.2e}"


@pytest.mark.parametrize("family", ["pixart", "wan", "qwen_image"])
def test_under_ulysses_the_shards_own_changes_differ_but_the_decision_is_shared(family, two_workers):
    """First-Block-Cache: the two sequence shards see different changes; both decide on the same reduced value."""
    key = (family, "fbcache", "ulysses=2")
    mine, theirs = (results[key][THRESHOLDS[(family, "fbcache")]][1] for results in two_workers)
    measured = [i for i, d in enumerate(mine) if math.isfinite(d[3])]
    assert measured and all(mine[i][3] == theirs[i][3] for i in measured)
    assert any(abs(mine[i][4] - theirs[i][4]) > 0.01 * mine[i][3] for i in measured)


@pytest.mark.parametrize("family, name", [("pixart", "PixArt-alpha/Sigma"), ("qwen_image", "Qwen-Image")])
def test_teacache_is_refused_where_no_polynomial_is_published(family, name):
    from comfy_xdit.caching.job import cache_job_for
    from comfy_xdit.config import ConfigError

    one = ParallelMesh.build(ParallelConfig(devices=("cpu",)), torch.device("cpu"))
    with pytest.raises(ConfigError, match=rf"teacache step cache is not available for {family} models \(TeaCache has no "
                                          rf"published rescale coefficients for {name}\) \(available: fbcache\); set the "
                                          r"sampler's cache to fbcache or none"):
        cache_job_for(request(family, 1, CacheSettings("teacache")), None, one, 1.0, family=family)


def test_wan_takes_the_teacache_polynomial_of_its_size():
    from comfy_xdit.caching.families import FAMILY_CACHES, WAN_1_3B_TEACACHE, WAN_14B_TEACACHE

    class Config:
        def __init__(self, heads):
            self.num_attention_heads, self.attention_head_dim = heads, 128

    choose = FAMILY_CACHES["wan"].teacache
    assert choose(Config(12)) is WAN_1_3B_TEACACHE and WAN_1_3B_TEACACHE.default_threshold == 0.05  # 1536 wide
    assert choose(Config(40)) is WAN_14B_TEACACHE and WAN_14B_TEACACHE.default_threshold == 0.10  # 5120 wide
