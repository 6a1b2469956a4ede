"""Step caches on HunyuanVideo, Mochi and HunyuanDiT: threshold 0 changes nothing, 2 workers equal one.

Tiny diffusers transformers (random weights), float32, gloo processes on the CPU, euler steps with
cfg (so one worker keeps a cache per branch). HunyuanVideo's dual- and single-stream blocks and
Mochi's blocks return (image, text) (Mochi's last block hands its text input on); HunyuanDiT's
blocks return the image only and take long skip connections. None of them gets attention kwargs,
so the metric asks the sharded forward for the layout. Every latent gives a token count that
sequence parallelism of 2 must pad. TeaCache measures the first block's modulated video input with
TeaCache4HunyuanVideo's and TeaCache4Mochi's polynomials and always runs the first and last step.
As in test_step_cache_families.py, random weights check the mechanics, not quality; thresholds
are chosen on these tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from checkpoints import make_hunyuan_video_diffusers_model, make_mochi_diffusers_model
from comfy_xdit.caching.settings import CacheSettings
import comfy_xdit.engine as engine_module
from comfy_xdit.requests import HunyuanDiTConditioning, HunyuanVideoConditioning, MochiConditioning, ModelSpec, SampleRequest
from distributed import cpu_engine, run_on_ranks
from hunyuan_dit_files import make_hunyuan_dit_diffusers_model
from step_cache_checks import (
    assert_same_skips_and_latents,
    assert_shards_differ_but_decide_alike,
    assert_skips_a_quarter,
    assert_threshold_zero_equals_no_cache,
    cfg_as_two_calls,
    memoized_one_worker,
    sample_thresholds,
)

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
STEPS = 8


def hunyuan_video_conditioning(g: torch.Generator, tokens: int, guidance: float) -> HunyuanVideoConditioning:
    return HunyuanVideoConditioning(torch.randn(1, tokens, 32, generator=g), torch.randn(1, 24, generator=g), guidance)


def hunyuan_dit_conditioning(g: torch.Generator, hidden: int) -> HunyuanDiTConditioning:
    mask, mask_t5 = torch.ones(1, 7), torch.ones(1, 9)
    mask[:, 7 - hidden:], mask_t5[:, 9 - hidden:] = 0, 0
    return HunyuanDiTConditioning(torch.randn(1, 7, 24, generator=g), mask, torch.randn(1, 9, 32, generator=g), mask_t5)


def tiny_mochi():
    model = make_mochi_diffusers_model(num_layers=3, heads=2, head_dim=8, pooled_dim=8, text_dim=32, seed=0)
    # With random weights the first block's modulated input changes by 15-30 % a step, where
    # TeaCache4Mochi's polynomial (fitted on changes of a few %) turns negative and the sum never
    # grows. A constant offset on the video tokens brings the changes to 7-30 %, mostly in range.
    with torch.no_grad():
        model.patch_embed.proj.bias += 4.0
    return model


@dataclass(frozen=True)
class Family:
    make_model: object
    conditionings: object  # generator -> (positive, negative)
    latent: tuple[int, ...]  # [C, (T,) H, W] of one image; the top half carries an image, the rest is empty
    scheduler: str = "simple"


FAMILIES = {
    # one dual-stream and two single-stream blocks; 3 frames of 6x10 -> 45 tokens
    "hunyuan_video": Family(
        lambda: make_hunyuan_video_diffusers_model(num_layers=1, num_single_layers=2, num_refiner_layers=1, heads=2,
                                                   head_dim=8, rope_axes_dim=(2, 2, 4), text_dim=32, pooled_dim=24, seed=0),
        lambda g: (hunyuan_video_conditioning(g, 9, 6.0), hunyuan_video_conditioning(g, 5, 3.5)), (16, 3, 6, 10)),
    # three blocks, the last without text outputs; 3 frames of 6x10 -> 45 tokens
    "mochi": Family(tiny_mochi,
                    lambda g: (MochiConditioning(torch.randn(1, 9, 32, generator=g)),
                               MochiConditioning(torch.randn(1, 5, 32, generator=g))), (12, 3, 6, 10)),
    # four blocks (one long skip connection); 18x14 -> 63 tokens; v prediction on the discrete schedule
    "hunyuan_dit": Family(lambda: make_hunyuan_dit_diffusers_model(meta=False),
                          lambda g: (hunyuan_dit_conditioning(g, 2), hunyuan_dit_conditioning(g, 4)), (4, 18, 14), "normal"),
}
# (family, cache) -> a threshold at which a quarter or more of the calls skip, without every call skipping.
THRESHOLDS = {
    ("hunyuan_video", "fbcache"): 0.5,
    ("hunyuan_video", "teacache"): 0.3,
    ("mochi", "fbcache"): 0.5,
    ("mochi", "teacache"): 0.05,
    ("hunyuan_dit", "fbcache"): 0.5,
}


def request(family: str, batch: int, cache: CacheSettings | None) -> SampleRequest:
    spec = FAMILIES[family]
    g = torch.Generator().manual_seed(1)
    positive, negative = spec.conditionings(g)
    # img2img from a latent whose top rows carry an image and whose bottom rows are empty, so the
    # sequence shards change at different rates.
    latent = torch.zeros(batch, *spec.latent)
    rows = spec.latent[-2] // 2
    latent[..., :rows, :] = 3 * torch.randn(batch, *spec.latent[:-2], rows, spec.latent[-1], generator=g)
    return SampleRequest(latent, positive, negative, seed=42, steps=STEPS, cfg=4.0, denoise=0.75,
                         scheduler=spec.scheduler, cache=cache)


def sample_with_caches(family: str, kind: str, config_kwargs: dict, batch: int, thresholds: list) -> dict:
    """On every rank: {threshold or None: (latents, decisions as tuples)}, plus this rank's cfg index."""
    engine = cpu_engine(config_kwargs)
    engine.set_model(FAMILIES[family].make_model(), ModelSpec("tiny", family=family, dtype="float32"))
    return sample_thresholds(engine, lambda batch, cache: request(family, batch, cache), kind, batch, thresholds,
                             uncached=lambda: cfg_as_two_calls(engine_module, "run_ksampler"))  # HunyuanDiT batches


@pytest.fixture(scope="module")
def one_worker():
    """(family, kind, batch, threshold) -> one worker's (latents, decisions), each run once per module."""
    return memoized_one_worker(lambda family, kind, batch, threshold:
                               sample_with_caches(family, kind, {}, batch, [threshold])[threshold])


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_zero_equals_no_cache(family, kind, one_worker):
    # First-Block-Cache measures from the second step on; TeaCache neither on the first nor the last.
    assert_threshold_zero_equals_no_cache(one_worker(family, kind, 1, 0.0), one_worker(family, kind, 1, None), STEPS,
                                          measured_calls=2 * (STEPS - 1 if kind == "fbcache" else STEPS - 2))


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_skips_a_quarter_of_the_calls(family, kind, one_worker):
    assert_skips_a_quarter(one_worker(family, kind, 1, THRESHOLDS[(family, kind)]), one_worker(family, kind, 1, None))


# (config, batch) for the 2-rank comparisons; all run in one launch of two processes.
CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2, batch 2": (dict(data_parallel_degree=2), 2),
}
# Ulysses for each, plus Ring, cfg or data parallel (alternating, to keep the launch short).
PARALLEL = [("hunyuan_video", "fbcache", "ulysses=2"), ("hunyuan_video", "fbcache", "cfg parallel"),
            ("hunyuan_video", "teacache", "ulysses=2"), ("hunyuan_video", "teacache", "data=2, batch 2"),
            ("mochi", "fbcache", "ulysses=2"), ("mochi", "fbcache", "data=2, batch 2"),
            ("mochi", "teacache", "ulysses=2"), ("mochi", "teacache", "ring=2"),
            ("hunyuan_dit", "fbcache", "ulysses=2"), ("hunyuan_dit", "fbcache", "cfg parallel")]


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


@pytest.mark.parametrize("family, kind", [("hunyuan_video", "fbcache"), ("mochi", "teacache"), ("hunyuan_dit", "fbcache")])
def test_under_ulysses_the_shards_own_changes_differ_but_the_decision_is_shared(family, kind, two_workers):
    """The two sequence shards see different changes; both decide on the same reduced value."""
    assert_shards_differ_but_decide_alike(two_workers, (family, kind, "ulysses=2"), THRESHOLDS[(family, kind)])


def test_teacache_is_refused_for_hunyuan_dit():
    from comfy_xdit.caching.job import cache_job_for
    from comfy_xdit.config import ConfigError

    one = cpu_engine().mesh
    with pytest.raises(ConfigError, match=r"teacache step cache is not available for hunyuan_dit models \(TeaCache has no "
                                          r"published rescale coefficients for HunyuanDiT\) \(available: fbcache\); set the "
                                          r"sampler's cache to fbcache or none"):
        cache_job_for(request("hunyuan_dit", 1, CacheSettings("teacache")), None, one, 1.0, family="hunyuan_dit")


def test_teacache_recipes_are_the_published_ones():
    from comfy_xdit.caching.families import FAMILY_CACHES, HUNYUAN_VIDEO_TEACACHE, MOCHI_TEACACHE

    assert FAMILY_CACHES["hunyuan_video"].teacache(None) is HUNYUAN_VIDEO_TEACACHE
    assert HUNYUAN_VIDEO_TEACACHE.coefficients[0] == 7.33226126e02 and HUNYUAN_VIDEO_TEACACHE.default_threshold == 0.1
    assert FAMILY_CACHES["mochi"].teacache(None) is MOCHI_TEACACHE
    assert MOCHI_TEACACHE.coefficients[0] == -3.51241319e03 and MOCHI_TEACACHE.default_threshold == 0.06
    for recipe in (HUNYUAN_VIDEO_TEACACHE, MOCHI_TEACACHE):
        assert recipe.retained_steps == 1 and recipe.last_step_runs and recipe.per_token
