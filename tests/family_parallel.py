"""The exactness checks every video family's parallel test module shares (Wan, HunyuanVideo, Mochi).

A family module builds a ``FamilySuite`` (its tiny model, its request, its latent shape) and
subclasses ``ParallelExactness`` with it; the class runs ulysses=2, ring=2, cfg parallel and
data=2 on two gloo ranks in one process start, an ancestral sampler on the ring, swapped shards
(which must be caught) and ulysses x ring on four ranks, each against one worker. The module
keeps the checks that are its family's own (diffusers' forward, latent format, refusals).

The families loaded from diffusers folders (CogVideoX, CogVideoX 1.5, ConsisID, Latte) keep their
own cases (folders with other schedulers, extra faults) and share the pieces below the suite:
``swap_shards`` and ``assert_every_rank_equals`` (and ``cpu_engine`` from distributed.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.requests import ModelSpec, SampleRequest
from distributed import cpu_engine, relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32

CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2": (dict(data_parallel_degree=2), 2),
}
WRONG_ORDER = "ulysses=2, shards swapped"
ANCESTRAL = "ring=2, euler_ancestral"


def swap_shards(engine: RankEngine) -> RankEngine:
    """Deliberately hand each rank another rank's shard: a comparison with one worker must catch it."""
    forward = engine._denoiser.forward
    forward.shard_index = forward.degree - 1 - forward.shard_index
    return engine


def assert_every_rank_equals(name: str, by_rank: list[dict], expected: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Case ``name`` of every rank's results has ``shape`` and equals one worker's ``expected``."""
    assert expected.abs().max() > 0.1  # a zero or tiny result would make any comparison pass
    for rank, results in enumerate(by_rank):
        result = results[name]
        assert result.shape == expected.shape == shape
        error = relative_error(result, expected)
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"


@dataclass(frozen=True)
class FamilySuite:
    family: str
    make_model: Callable[[], torch.nn.Module]
    # (batch, sampler=...) -> the request every case samples
    make_request: Callable[..., SampleRequest]
    latent: tuple[int, ...]  # one row's latent shape

    def engine_for(self, config_kwargs: dict) -> RankEngine:
        engine = cpu_engine(config_kwargs)
        engine.set_model(self.make_model(), ModelSpec("tiny", family=self.family, dtype="float32"))
        return engine

    def generate(self, config_kwargs: dict, batch: int, wrong_shard_order: bool = False,
                 sampler: str = "euler") -> torch.Tensor:
        engine = self.engine_for(config_kwargs)
        if wrong_shard_order:
            swap_shards(engine)
        return engine.sample(self.make_request(batch, sampler=sampler))

    def generate_all_cases(self) -> dict:
        """Every case on the same two ranks: one process start for all of them."""
        results = {name: self.generate(config_kwargs, batch) for name, (config_kwargs, batch) in CASES.items()}
        results[WRONG_ORDER] = self.generate(dict(ulysses_degree=2), 1, wrong_shard_order=True)
        # Extra noise of the whole 5-D latent, drawn on every rank and sliced, never per shard.
        results[ANCESTRAL] = self.generate(dict(ring_degree=2), 1, sampler="euler_ancestral")
        return results


class ParallelExactness:
    """Subclass with ``suite = FamilySuite(...)`` for the standard checks against one worker."""

    suite: FamilySuite

    @pytest.fixture(scope="class")
    def reference(self):
        cache = {}

        def get(batch: int, sampler: str = "euler") -> torch.Tensor:
            if (batch, sampler) not in cache:
                cache[(batch, sampler)] = self.suite.generate({}, batch, sampler=sampler)
            return cache[(batch, sampler)]

        return get

    @pytest.fixture(scope="class")
    def two_workers(self):
        return run_on_ranks(2, self.suite.generate_all_cases)

    @pytest.mark.parametrize("name", list(CASES))
    def test_parallel_equals_one_worker(self, name, two_workers, reference):
        batch = CASES[name][1]
        assert_every_rank_equals(name, two_workers, reference(batch), (batch, *self.suite.latent))

    def test_ancestral_sampler_on_ring_equals_one_worker(self, two_workers, reference):
        for rank, results in enumerate(two_workers):
            assert relative_error(results[ANCESTRAL], reference(1, "euler_ancestral")) < TOLERANCE, f"rank {rank}"

    def test_wrong_shard_order_is_caught(self, two_workers, reference):
        assert relative_error(two_workers[0][WRONG_ORDER], reference(1)) > 100 * TOLERANCE

    def test_ulysses_times_ring_on_four_workers(self, reference):
        # Both gathers, Ulysses inside Ring, the rotary rows split four ways.
        results = run_on_ranks(4, self.suite.generate, dict(ulysses_degree=2, ring_degree=2), 1)
        for rank, result in enumerate(results):
            assert relative_error(result, reference(1)) < TOLERANCE, f"rank {rank}"
