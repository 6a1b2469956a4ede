"""Step caches on the diffusers-semantics families DiT-XL-2 and CogVideoX: threshold 0 changes nothing, 2 workers equal one.

These families sample in their diffusers pipeline's loop (sampling/diffusers_schedulers.py): the
cache keys its steps on the scheduler's timesteps, and with a cache the loop calls the two CFG
branches separately (each keeps its own state). Tiny models from diffusers folders written at
test time (DDIM), float32, gloo processes on the CPU. DiT's blocks are ``BasicTransformerBlock``
(image only, layout in cross_attention_kwargs); CogVideoX's ``CogVideoXBlock`` returns (image,
text), layout in attention_kwargs. TeaCache on CogVideoX-2b measures the blocks' time embedding
with the polynomial of TeaCache's CogVideoX experiment; 5b and 1.5 are refused, as are ConsisID
and Latte (caching/families.py says why). CogVideoX 1.5 (frame patches, padding frame) takes
First-Block-Cache. Random weights check the mechanics, not quality.
"""

from __future__ import annotations

import pytest
import torch

from cogvideox_files import make_cogvideox15_model, make_cogvideox_model, write_cogvideox_folder
from comfy_xdit.caching.settings import CacheSettings
import comfy_xdit.sampling.diffusers_schedulers as diffusers_loop
from comfy_xdit.config import ConfigError
from comfy_xdit.engine import RankEngine
from comfy_xdit.requests import CogVideoXConditioning, DiTConditioning, ModelSpec, SampleRequest
from dit_files import DDIM_CONFIG, make_dit_model, write_dit_folder
from distributed import cpu_engine, run_on_ranks
from step_cache_checks import (
    assert_same_skips_and_latents,
    assert_skips_a_quarter,
    assert_threshold_zero_equals_no_cache,
    cfg_as_two_calls,
    memoized_one_worker,
    sample_thresholds,
)

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
STEPS = 8


def request(name: str, batch: int, cache) -> SampleRequest:
    if name == "dit":  # 10x10 -> 25 tokens
        labels = torch.tensor([207, 360][:batch])
        return SampleRequest(torch.zeros(batch, 4, 10, 10), DiTConditioning(labels), DiTConditioning(torch.tensor([1000])),
                             seed=7, steps=STEPS, cfg=4.0, cache=cache)
    # 1.0: 3 frames of 10x10 -> 75 tokens; 1.5: 5 frames, padded to 6 -> 3 frame patches x 25 = 75 tokens
    frames = 5 if name == "cogvideox-15" else 3
    g = torch.Generator().manual_seed(1)
    positive, negative = (CogVideoXConditioning(torch.randn(1, 7, 16, generator=g)) for _ in range(2))
    return SampleRequest(torch.zeros(batch, 16, frames, 10, 10), positive, negative, seed=5, steps=STEPS, cfg=6.0, cache=cache)


def tiny_cogvideox_2b():
    model = make_cogvideox_model(rotary=False)
    # The tiny time embedding changes by 50-250 % a step, where the polynomial of TeaCache's CogVideoX
    # experiment is negative and the sum never grows; an offset brings the changes to 5-20 %.
    with torch.no_grad():
        model.time_embedding.linear_2.bias += 3.0
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cached")
    return {"dit": str(write_dit_folder(root / "dit", DDIM_CONFIG, make_dit_model(num_layers=3))),
            "cogvideox": str(write_cogvideox_folder(root / "cogvideox-2b", "ddim", tiny_cogvideox_2b())),
            "cogvideox-5b": str(write_cogvideox_folder(root / "cogvideox-5b", "ddim", make_cogvideox_model(rotary=True))),
            "cogvideox-15": str(write_cogvideox_folder(root / "cogvideox-15", "dpm", make_cogvideox15_model()))}


def engine_for(folders: dict, name: str, config_kwargs: dict) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.load(ModelSpec(folders[name], family=name.split("-")[0], dtype="float32"))
    return engine


def sample_with_caches(folders: dict, family: str, kind: str, config_kwargs: dict, batch: int, thresholds: list) -> dict:
    return sample_thresholds(engine_for(folders, family, config_kwargs), lambda batch, cache: request(family, batch, cache),
                             kind, batch, thresholds,
                             uncached=lambda: cfg_as_two_calls(diffusers_loop, "run_diffusers_sampler"))


# (family, cache) -> a threshold at which a quarter or more of the calls skip, without every call skipping.
# Random weights change the first block's residual by ~15-120 % a step, so the thresholds are high.
THRESHOLDS = {
    ("dit", "fbcache"): 0.9,
    ("cogvideox", "fbcache"): 0.3,
    ("cogvideox", "teacache"): 0.3,
    ("cogvideox-15", "fbcache"): 0.7,
}


@pytest.fixture(scope="module")
def one_worker(folders):
    return memoized_one_worker(lambda family, kind, batch, threshold:
                               sample_with_caches(folders, family, kind, {}, batch, [threshold])[threshold])


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_zero_equals_no_cache(family, kind, one_worker):
    # one call per branch and step, numbered by the scheduler's timesteps
    assert_threshold_zero_equals_no_cache(one_worker(family, kind, 1, 0.0), one_worker(family, kind, 1, None), STEPS,
                                          measured_calls=2 * (STEPS - 1 if kind == "fbcache" else STEPS - 2))


@pytest.mark.parametrize("family, kind", list(THRESHOLDS))
def test_threshold_skips_a_quarter_of_the_calls(family, kind, one_worker):
    assert_skips_a_quarter(one_worker(family, kind, 1, THRESHOLDS[(family, kind)]), one_worker(family, kind, 1, None))


CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2, batch 2": (dict(data_parallel_degree=2), 2),
}
PARALLEL = [("dit", "fbcache", "ulysses=2"), ("dit", "fbcache", "data=2, batch 2"),
            ("cogvideox", "fbcache", "ulysses=2"), ("cogvideox", "fbcache", "cfg parallel"),
            ("cogvideox", "teacache", "ulysses=2"), ("cogvideox-15", "fbcache", "ulysses=2")]


def sample_all_cases(folders: dict) -> dict:
    return {(family, kind, name): sample_with_caches(folders, family, kind, CASES[name][0], CASES[name][1],
                                                     [THRESHOLDS[(family, kind)]])
            for family, kind, name in PARALLEL}


@pytest.fixture(scope="module")
def two_workers(folders):
    return run_on_ranks(2, sample_all_cases, folders)


@pytest.mark.parametrize("family, kind, name", PARALLEL)
def test_parallel_cache_skips_the_same_steps_and_equals_one_worker(family, kind, name, two_workers, one_worker):
    config_kwargs, batch = CASES[name]
    threshold = THRESHOLDS[(family, kind)]
    assert_same_skips_and_latents(two_workers, (family, kind, name), threshold, config_kwargs.get("use_cfg_parallel", False),
                                  one_worker(family, kind, batch, threshold), TOLERANCE)


@pytest.mark.parametrize("family, kind, why", [
    ("cogvideox-5b", "teacache", r"fitted on CogVideoX-2b; none is published for 5b"),
    ("cogvideox-15", "teacache", r"TeaCache4CogVideoX1.5's polynomial is not wired in"),
    ("dit", "teacache", r"TeaCache has no published rescale coefficients for DiT-XL-2"),
])
def test_teacache_is_refused_where_no_polynomial_is_published(folders, family, kind, why):
    engine = engine_for(folders, family, {})
    with pytest.raises(ConfigError, match=why):
        engine.sample(request(family, 1, CacheSettings(kind)))


@pytest.mark.parametrize("family, why", [("consisid", "face features between blocks"), ("latte", "not in one layout")])
def test_caches_are_refused_by_name_where_blocks_cannot_be_skipped_cleanly(family, why):
    from comfy_xdit.caching.job import diffusers_cache_job_for

    one = cpu_engine().mesh
    cached = request("dit", 1, CacheSettings("fbcache"))
    with pytest.raises(ConfigError, match=rf"fbcache step cache is not available for {family} models \(.*{why}.*\) "
                                          r"\(available: none yet\); set the sampler's cache to none"):
        diffusers_cache_job_for(cached, None, one, family, torch.tensor([999, 500]))
