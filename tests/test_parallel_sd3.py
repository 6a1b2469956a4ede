"""Every exact parallel method on SD3 / SD3.5 gives the same latents as one worker.

Tiny SD3 transformers (random weights, fixed seed), float32, gloo processes on the CPU: an SD3
medium-style one (joint blocks only) and an SD3.5 medium-style one (qk RMSNorm, image-only attn2
in its first block). The latent is 10x14 (5x7 = 35 image tokens after the 2x2 patches), so every
sequence-parallel degree needs padding; positive and negative have different text lengths.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.requests import FluxConditioning, ModelSpec, SampleRequest, SD3Conditioning
from checkpoints import make_sd3_diffusers_model
from distributed import cpu_engine, relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32

ARCHITECTURES = {
    "sd3": dict(num_layers=2, heads=4, head_dim=8),
    "sd3.5-dual": dict(num_layers=2, heads=4, head_dim=8, dual_attention_layers=(0,), qk_norm="rms_norm"),
}


def tiny_sd3(arch: str):
    return make_sd3_diffusers_model(**ARCHITECTURES[arch], seed=0)


def request(batch: int = 1, cfg: float = 4.0, sampler: str = "euler") -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = SD3Conditioning(torch.randn(1, 9, 32, generator=g), torch.randn(1, 24, generator=g))
    negative = SD3Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g))
    return SampleRequest(torch.zeros(batch, 16, 10, 14), positive, negative, seed=42, steps=3, cfg=cfg, sampler_name=sampler)


def generate(arch: str, config_kwargs: dict, batch: int, cfg: float, wrong_shard_order: bool = False) -> torch.Tensor:
    engine = cpu_engine(config_kwargs)
    engine.set_model(tiny_sd3(arch), ModelSpec("tiny", family="sd3", dtype="float32"))
    if wrong_shard_order:
        # Deliberately hand each rank another rank's shard: the comparison must catch it.
        forward = engine._denoiser.forward
        forward.shard_index = forward.degree - 1 - forward.shard_index
    return engine.sample(request(batch, cfg))


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def get(arch: str, batch: int, cfg: float) -> torch.Tensor:
        if (arch, batch, cfg) not in cache:
            cache[(arch, batch, cfg)] = generate(arch, {}, batch, cfg)
        return cache[(arch, batch, cfg)]

    return get


CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1),
    "ring=2": (dict(ring_degree=2), 1),
    "cfg parallel": (dict(use_cfg_parallel=True), 1),
    "data=2": (dict(data_parallel_degree=2), 2),
}
WRONG_ORDER = ("sd3.5-dual", "ulysses=2, shards swapped")


def generate_all_cases() -> dict:
    """Every (architecture, case) on the same two ranks: one process start for all of them."""
    results = {}
    for arch in ARCHITECTURES:
        for name, (config_kwargs, batch) in CASES.items():
            results[(arch, name)] = generate(arch, config_kwargs, batch, 4.0)
    results[WRONG_ORDER] = generate("sd3.5-dual", dict(ulysses_degree=2), 1, 4.0, True)
    return results


@pytest.fixture(scope="module")
def two_workers():
    return run_on_ranks(2, generate_all_cases)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_parallel_equals_one_worker(arch, name, two_workers, reference):
    batch = CASES[name][1]
    expected = reference(arch, batch, 4.0)
    for rank, results in enumerate(two_workers):
        result = results[(arch, name)]
        assert result.shape == expected.shape == (batch, 16, 10, 14)
        error = relative_error(result, expected)
        assert error < TOLERANCE, f"{arch} {name}: rank {rank} differs from one worker by {error:.2e}"


def test_wrong_shard_order_is_caught(two_workers, reference):
    assert relative_error(two_workers[0][WRONG_ORDER], reference("sd3.5-dual", 1, 4.0)) > 100 * TOLERANCE


def test_ulysses_times_ring_on_four_workers(reference):
    # Both gathers in the hook, Ulysses inside Ring: the order matters only here.
    results = run_on_ranks(4, generate, "sd3.5-dual", dict(ulysses_degree=2, ring_degree=2), 1, 4.0)
    for rank, result in enumerate(results):
        assert relative_error(result, reference("sd3.5-dual", 1, 4.0)) < TOLERANCE, f"rank {rank}"


def test_one_worker_is_diffusers_own_forward():
    # The sampler's first velocity equals a direct call of the unchanged diffusers model with
    # ComfyUI's semantics: model space = (latent - 0.0609) * 1.5305, timestep = sigma * 1000.
    model = tiny_sd3("sd3.5-dual")
    engine = cpu_engine()
    engine.set_model(model, ModelSpec("tiny", family="sd3", dtype="float32"))
    g = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(1, 16, 6, 8, generator=g), torch.randn(1, 7, 32, generator=g), torch.randn(1, 24, generator=g)
    sigma = torch.tensor(0.75)
    ours = engine._denoiser(x, sigma, context, pooled)
    with torch.no_grad():
        direct = model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                       timestep=torch.tensor([750.0]), return_dict=False)[0]
    assert torch.equal(ours, direct)
    assert engine.family.latent.to_model_space(torch.ones(1)).item() == pytest.approx((1 - 0.0609) * 1.5305)


def test_a_flux_request_on_sd3_is_refused_by_name():
    engine = cpu_engine()
    engine.set_model(tiny_sd3("sd3"), ModelSpec("tiny", family="sd3", dtype="float32"))
    flux_request = request()
    flux_request.positive = FluxConditioning(flux_request.positive.context, flux_request.positive.pooled, 3.5)
    with pytest.raises(ValueError, match="FluxConditioning, but the loaded Stable Diffusion 3 / 3.5 model takes SD3Conditioning"):
        engine.sample(flux_request)
    resolution = request()
    resolution.max_shift = 1.15
    with pytest.raises(ValueError, match="does not apply to Stable Diffusion 3"):
        engine.sample(resolution)
