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

from dataclasses import dataclass

import pytest
import torch

from checkpoints import make_qwen_image_diffusers_model, make_wan_diffusers_model
from comfy_xdit.caching.settings import CacheSettings
from comfy_xdit.requests import ModelSpec, PixArtConditioning, QwenImageConditioning, SampleRequest, WanConditioning
from distributed import cpu_engine, run_on_ranks
from pixart_files import make_pixart_diffusers_model
from step_cache_checks import (
    assert_same_skips_and_latents,
    assert_shards_differ_but_decide_alike,
    assert_skips_a_quarter,
    assert_threshold_zero_equals_no_cache,
    memoized_one_worker,
    sample_thresholds,
)

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
    engine = cpu_engine(config_kwargs)
    engine.set_model(FAMILIES[family].make_model(), ModelSpec("tiny", family=family, dtype="float32"))
    return sample_thresholds(engine, lambda batch, cache: request(family, batch, cache), kind, batch, thresholds)


@pytest.fixture(scope="module")
def one_worker():
    """(family, kind, batch, threshold) -> one worker's (latents, decisions), each run once per module."""
    return memoized_one_worker(lambda family, kind, batch, threshold:
                               sample_with_caches(family, kind, {}, batch, [threshold])[threshold])


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_zero_equals_no_cache(family, kind, one_worker):
    steps = FAMILIES[family].steps
    # First-Block-Cache measures from the second step on; TeaCache4Wan2.1 only after its 5 retained steps.
    assert_threshold_zero_equals_no_cache(one_worker(family, kind, 1, 0.0), one_worker(family, kind, 1, None), steps,
                                          measured_calls=2 * (steps - 1 if kind == "fbcache" else steps - 5))


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_skips_a_quarter_of_the_calls(family, kind, one_worker):
    assert_skips_a_quarter(one_worker(family, kind, 1, THRESHOLDS[(family, kind)]), one_worker(family, kind, 1, None))


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
    assert_same_skips_and_latents(two_workers, (family, kind, name), threshold, config_kwargs.get("use_cfg_parallel", False),
                                  one_worker(family, kind, batch, threshold), TOLERANCE)


@pytest.mark.parametrize("family", ["pixart", "wan", "qwen_image"])
def test_under_ulysses_the_shards_own_changes_differ_but_the_decision_is_shared(family, two_workers):
    """First-Block-Cache: the two sequence shards see different changes; both decide on the same reduced value."""
    assert_shards_differ_but_decide_alike(two_workers, (family, "fbcache", "ulysses=2"), THRESHOLDS[(family, "fbcache")])


@pytest.mark.parametrize("family, name", [("pixart", "PixArt-alpha/Sigma"), ("qwen_image", "Qwen-Image")])
def test_teacache_is_refused_where_no_polynomial_is_published(family, name):
    from comfy_xdit.caching.job import cache_job_for
    from comfy_xdit.config import ConfigError

    one = cpu_engine().mesh
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
