"""Every exact parallel method on PixArt-alpha / Sigma gives the same latents as one worker.

Tiny PixArt transformers (2 heads x 8 or 12, 2 blocks, random weights), float32, gloo processes on the
CPU: a Sigma-style one (no micro-conditions) and an alpha-style one (resolution and aspect-ratio
micro-conditions). The latent is 42x38 (21x19 = 399 image tokens after the 2x2 patches), so every
sequence-parallel degree needs padding; positive and negative have different text lengths. The
sampling is PixArt's: EPS prediction on ComfyUI's discrete schedule.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.requests import ModelSpec, PixArtConditioning, SampleRequest, SD3Conditioning
from distributed import cpu_engine, relative_error, run_on_ranks
from pixart_files import make_pixart_diffusers_model

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
LATENT = (42, 38)
# alpha: the width divides by 3 (resolution + aspect-ratio embeddings fill a third each, as at 1152).
ARCHITECTURES = {"sigma": dict(alpha=False), "alpha": dict(alpha=True, head_dim=12)}


def request(batch: int = 1, cfg: float = 4.5, sampler: str = "euler") -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = PixArtConditioning(torch.randn(1, 9, 32, generator=g))
    negative = PixArtConditioning(torch.randn(1, 5, 32, generator=g))
    return SampleRequest(torch.zeros(batch, 4, *LATENT), positive, negative, seed=42, steps=3, cfg=cfg,
                         sampler_name=sampler, scheduler="normal")


def engine_for(arch: str, config_kwargs: dict) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.set_model(make_pixart_diffusers_model(**ARCHITECTURES[arch]), ModelSpec("tiny", family="pixart", dtype="float32"))
    return engine


def generate(arch: str, config_kwargs: dict, batch: int, wrong_shard_order: bool = False) -> torch.Tensor:
    engine = engine_for(arch, config_kwargs)
    if wrong_shard_order:
        # Deliberately hand each rank another rank's shard: the comparison must catch it.
        forward = engine._denoiser.forward
        forward.shard_index = forward.degree - 1 - forward.shard_index
    return engine.sample(request(batch))


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(arch: str, batch: int) -> torch.Tensor:
        if (arch, batch) not in cache:
            cache[(arch, batch)] = generate(arch, {}, batch)
        return cache[(arch, batch)]

    return get


CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2": (dict(data_parallel_degree=2), 2),
}
WRONG_ORDER = ("alpha", "ulysses=2, shards swapped")


def generate_all_cases() -> dict:
    """Every (architecture, case) on the same two ranks: one process start for all of them."""
    results = {(arch, name): generate(arch, kwargs, batch) for arch in ARCHITECTURES for name, (kwargs, batch) in CASES.items()}
    results[WRONG_ORDER] = generate("alpha", dict(ulysses_degree=2), 1, wrong_shard_order=True)
    return results


@pytest.fixture(scope="module")
def two_workers():
    return run_on_ranks(2, generate_all_cases)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_parallel_equals_one_worker(arch, name, two_workers, reference):
    batch = CASES[name][1]
    expected = reference(arch, batch)
    assert expected.abs().max() > 0.1  # a real image latent, not zeros
    for rank, results in enumerate(two_workers):
        result = results[(arch, name)]
        assert result.shape == expected.shape == (batch, 4, *LATENT)
        error = relative_error(result, expected)
        assert error < TOLERANCE, f"{arch} {name}: rank {rank} differs from one worker by {error:.2e}"


def test_wrong_shard_order_is_caught(two_workers, reference):
    assert relative_error(two_workers[0][WRONG_ORDER], reference("alpha", 1)) > 100 * TOLERANCE


def test_micro_conditions_reach_the_alpha_model():
    # CLIPTextEncodePixArtAlpha's width/height change an alpha model's prediction, as in ComfyUI.
    engine = engine_for("alpha", {})
    g = torch.Generator().manual_seed(3)
    x, context, sigma = torch.randn(1, 4, 40, 40, generator=g), torch.randn(1, 6, 32, generator=g), torch.tensor(2.0)
    latent_size = engine._denoiser(x, sigma, context)
    assert torch.equal(latent_size, engine._denoiser(x, sigma, context, (320.0, 320.0)))
    assert not torch.allclose(latent_size, engine._denoiser(x, sigma, context, (1024.0, 768.0)))


def test_flow_only_samplers_and_other_conditionings_are_refused_by_name():
    engine = engine_for("sigma", {})
    with pytest.raises(ValueError, match="dpmpp_2m_sde.*not supported for this"):
        engine.sample(request(sampler="dpmpp_2m_sde"))
    wrong = request()
    wrong.positive = SD3Conditioning(wrong.positive.context, torch.zeros(1, 24))
    with pytest.raises(ValueError, match="SD3Conditioning, but the loaded PixArt-alpha / PixArt-Sigma model takes PixArtConditioning"):
        engine.sample(wrong)
    odd = request()
    odd.latent = torch.zeros(1, 4, 41, 40)
    with pytest.raises(ValueError, match="multiples of 2"):
        engine.sample(odd)
    small = request()
    small.latent = torch.zeros(1, 4, 32, 32)
    with pytest.raises(ValueError, match="at least 264 px"):
        engine.sample(small)
