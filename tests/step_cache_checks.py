"""The checks every family's step-cache tests make, on decisions recorded as tuples.

A decision tuple is ``tuple(vars(CacheDecision).values())``: (branch, step, computed, the value
decided on (reduced over the group), this rank's own value). Used by test_step_cache_families.py
(PixArt, Wan, Qwen-Image), test_step_cache_video.py (HunyuanVideo, Mochi, HunyuanDiT) and
test_step_cache_diffusers.py (DiT, CogVideoX): each module builds its engines and requests, these
functions sample and compare.
"""

from __future__ import annotations

import contextlib
import math

import torch

from comfy_xdit.caching.settings import CacheSettings
from distributed import relative_error


@contextlib.contextmanager
def cfg_as_two_calls(module, function: str):
    """Run ``module.function`` (the sampler loop) with ``batch_cfg=False`` inside the block.

    Without a cache the loops batch the CFG branches into one call where their conditionings have
    the same shapes (as ComfyUI and diffusers do), which differs from two calls in the last bits
    (README: < 1e-5). A step cache always makes two calls; so does a reference run in this block,
    so the two compare bit for bit."""
    batched = getattr(module, function)
    setattr(module, function, lambda *args, **kwargs: batched(*args, **{**kwargs, "batch_cfg": False}))
    try:
        yield
    finally:
        setattr(module, function, batched)


def skipped(decisions) -> int:
    return sum(1 for d in decisions if not d[2])


def schedule(decisions, branch: str) -> list[tuple[int, bool]]:
    return [(d[1], d[2]) for d in decisions if d[0] == branch]


def sample_thresholds(engine, make_request, kind: str, batch: int, thresholds: list,
                      uncached=contextlib.nullcontext) -> dict:
    """{threshold or None (no cache): (latents, decision tuples)}, plus this rank's cfg index.
    ``make_request(batch, cache)`` builds the request; ``uncached()`` wraps the runs without a cache."""
    out = {"cfg_rank": engine.mesh.local_rank("cfg")}
    for threshold in thresholds:
        cache = None if threshold is None else CacheSettings(kind, threshold)
        with uncached() if cache is None else contextlib.nullcontext():
            latents = engine.sample(make_request(batch, cache))
        out[threshold] = (latents, [tuple(vars(d).values()) for d in engine.last_cache_record])
    return out


def memoized_one_worker(sample):
    """(family, kind, batch, threshold) -> one worker's (latents, decisions), each sampled once.
    ``sample(family, kind, batch, threshold)`` runs it; no cache is the same run for every kind."""
    runs = {}

    def get(family: str, kind: str, batch: int, threshold) -> tuple:
        key = (family, None if threshold is None else kind, batch, threshold)
        if key not in runs:
            runs[key] = sample(family, kind, batch, threshold)
        return runs[key]

    return get


def assert_threshold_zero_equals_no_cache(cached: tuple, uncached: tuple, steps: int, measured_calls: int) -> None:
    """Bit for bit equal; the hooks ran: every call computed, each branch called once per step, and
    ``measured_calls`` calls measured the change (the others are always computed)."""
    latents, decisions = cached
    assert torch.equal(latents, uncached[0])
    assert len(decisions) == 2 * steps and skipped(decisions) == 0
    for branch in ("branch0", "branch1"):
        assert [step for step, _ in schedule(decisions, branch)] == list(range(steps))
    assert sum(math.isfinite(d[3]) for d in decisions) == measured_calls


def assert_skips_a_quarter(cached: tuple, uncached: tuple) -> None:
    latents, decisions = cached
    assert skipped(decisions) >= 0.25 * len(decisions), decisions
    assert skipped(decisions) < len(decisions) - 4
    # Skipping changed the result (else the parallel comparisons would prove nothing).
    assert relative_error(latents, uncached[0]) > 1e-3


def assert_same_skips_and_latents(per_rank: list, key, threshold, cfg_parallel: bool, expected: tuple,
                                  tolerance: float) -> None:
    """Every rank's run ``key`` skipped the steps one worker skipped, decided on one worker's values
    and gave one worker's latents."""
    expected_latents, expected_decisions = expected
    for rank, results in enumerate(per_rank):
        out = results[key]
        latents, decisions = out[threshold]
        if cfg_parallel:  # a cfg rank's only branch is one worker's branch<cfg rank>
            pairs = [("branch0", f"branch{out['cfg_rank']}")]
        else:
            pairs = [("branch0", "branch0"), ("branch1", "branch1")]
        for mine, theirs in pairs:
            assert schedule(decisions, mine) == schedule(expected_decisions, theirs), f"{key} rank {rank}"
            # The decided-on value is one worker's: summed over both shards' real tokens (padding
            # excluded) and both data ranks' rows. Up to float32 summation order.
            ours = [d[3] for d in decisions if d[0] == mine]
            reference = [d[3] for d in expected_decisions if d[0] == theirs]
            for a, b in zip(ours, reference, strict=True):
                assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * abs(b), f"{key} rank {rank}: {a} != {b}"
        error = relative_error(latents, expected_latents)
        assert error < tolerance, f"{key}: rank {rank} differs from one worker by {error:.2e}"


def assert_shards_differ_but_decide_alike(per_rank: list, key, threshold) -> None:
    """Under Ulysses the two sequence shards see different changes; both decide on the same reduced value."""
    mine, theirs = (results[key][threshold][1] for results in per_rank)
    measured = [i for i, d in enumerate(mine) if math.isfinite(d[3])]
    assert measured and all(mine[i][3] == theirs[i][3] for i in measured)
    assert any(abs(mine[i][4] - theirs[i][4]) > 0.01 * mine[i][3] for i in measured)
