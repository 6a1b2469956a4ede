"""Every exact parallel method on HunyuanDiT gives the same latents as one worker.

Tiny HunyuanDiT transformers (2 heads x 8, 4 blocks: one long skip connection, random weights),
float32, gloo processes on the CPU: a v1.2-style one and a v1.0/1.1-style one (image meta size and
style conditions). The latent is 18x14 (9x7 = 63 image tokens after the 2x2 patches), so every
sequence-parallel degree needs padding of the tokens and of the rotary rows; the grid is not
square, so the rotary crop has a non-zero start. Text masks hide tokens (replaced by the learned
padding). The sampling is HunyuanDiT's: v prediction on ComfyUI's discrete schedule.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.requests import HunyuanDiTConditioning, ModelSpec, PixArtConditioning, SampleRequest
from distributed import cpu_engine, relative_error, run_on_ranks
from hunyuan_dit_files import make_hunyuan_dit_diffusers_model

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
LATENT = (18, 14)
ARCHITECTURES = {"v1.2": dict(meta=False), "v1.1": dict(meta=True)}


def conditioning(g: torch.Generator, hidden: int) -> HunyuanDiTConditioning:
    mask, mask_t5 = torch.ones(1, 7), torch.ones(1, 9)
    mask[:, 7 - hidden:], mask_t5[:, 9 - hidden:] = 0, 0
    return HunyuanDiTConditioning(torch.randn(1, 7, 24, generator=g), mask, torch.randn(1, 9, 32, generator=g), mask_t5,
                                  (1024.0, 768.0, None, None))


def request(batch: int = 1, cfg: float = 5.0, sampler: str = "euler", latent=LATENT) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    return SampleRequest(torch.zeros(batch, 4, *latent), conditioning(g, 2), conditioning(g, 4), seed=42, steps=3, cfg=cfg,
                         sampler_name=sampler, scheduler="normal")


def engine_for(arch: str, config_kwargs: dict) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.set_model(make_hunyuan_dit_diffusers_model(**ARCHITECTURES[arch]), ModelSpec("tiny", family="hunyuan_dit", dtype="float32"))
    return engine


def generate(arch: str, config_kwargs: dict, batch: int, wrong_rotary: bool = False) -> torch.Tensor:
    engine = engine_for(arch, config_kwargs)
    if wrong_rotary:
        # Deliberately rotate every rank's tokens by the first rank's positions: the comparison must catch it.
        denoiser = engine._denoiser
        whole = denoiser._rotary_rows

        def first_rank_rows(h, w, device):
            shard = denoiser.forward.shard_index
            denoiser.forward.shard_index = 0
            try:
                return whole(h, w, device)
            finally:
                denoiser.forward.shard_index = shard

        denoiser._rotary_rows = first_rank_rows
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
WRONG_ROTARY = ("v1.2", "ulysses=2, rotary rows of rank 0 everywhere")


def generate_all_cases() -> dict:
    """Every (architecture, case) on the same two ranks: one process start for all of them."""
    results = {(arch, name): generate(arch, kwargs, batch) for arch in ARCHITECTURES for name, (kwargs, batch) in CASES.items()}
    results[WRONG_ROTARY] = generate("v1.2", dict(ulysses_degree=2), 1, wrong_rotary=True)
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
        print(f"{arch} {name} rank {rank}: {error:.1e}")


def test_wrong_rotary_rows_are_caught(two_workers, reference):
    # Random tiny weights make the rotary a small effect (measured 9e-3), still far above the tolerance.
    assert relative_error(two_workers[0][WRONG_ROTARY], reference("v1.2", 1)) > 10 * TOLERANCE


def test_masks_and_meta_size_reach_the_model():
    engine = engine_for("v1.1", {})
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(1, 4, 16, 16, generator=g), torch.tensor(2.0)
    cond = conditioning(g, 2)
    base = engine._denoiser(x, sigma, cond)
    unmasked = HunyuanDiTConditioning(cond.context, torch.ones(1, 7), cond.context_t5, cond.mask_t5, cond.size)
    assert not torch.allclose(base, engine._denoiser(x, sigma, unmasked))
    other_size = HunyuanDiTConditioning(cond.context, cond.mask, cond.context_t5, cond.mask_t5, (None,) * 4)
    assert not torch.allclose(base, engine._denoiser(x, sigma, other_size))


def test_odd_latents_are_padded_and_cropped_back():
    out = engine_for("v1.2", {}).sample(request(latent=(17, 13)))
    assert out.shape == (1, 4, 17, 13) and torch.isfinite(out).all()


def test_other_text_lengths_and_conditionings_are_refused_by_name():
    engine = engine_for("v1.2", {})
    long = request()
    g = torch.Generator().manual_seed(5)
    long.positive = HunyuanDiTConditioning(torch.randn(1, 8, 24, generator=g), torch.ones(1, 8), long.positive.context_t5,
                                           long.positive.mask_t5)
    with pytest.raises(ValueError, match="8 BERT and 9 mT5 tokens.*exactly 7 and 9.*shorten the prompt"):
        engine.sample(long)
    wrong = request()
    wrong.positive = PixArtConditioning(wrong.positive.context)
    with pytest.raises(ValueError, match="PixArtConditioning, but the loaded HunyuanDiT.*takes HunyuanDiTConditioning"):
        engine.sample(wrong)
    narrow = request()
    narrow.positive = HunyuanDiTConditioning(narrow.positive.context, narrow.positive.mask, torch.zeros(1, 9, 16),
                                             narrow.positive.mask_t5)
    with pytest.raises(ValueError, match="mT5 tokens are 16 wide but this HunyuanDiT.*takes 32"):
        engine.sample(narrow)


def test_the_bridge_reads_comfyuis_hunyuan_dit_conditioning_and_names_what_is_missing():
    from comfy_xdit.bridge import hunyuan_dit_conditioning

    mask = torch.ones(1, 7, dtype=torch.long)
    mask[:, 5:] = 0
    extras = {"pooled_output": torch.zeros(1, 24), "attention_mask": mask, "conditioning_mt5xl": torch.ones(1, 9, 32),
              "attention_mask_mt5xl": torch.ones(1, 9, dtype=torch.long), "width": 1024, "height": 768}
    cond = hunyuan_dit_conditioning([[torch.ones(1, 7, 24), extras]], "positive")
    assert cond.context.shape == (1, 7, 24) and cond.context_t5.shape == (1, 9, 32)
    assert cond.mask.tolist() == [[1.0] * 5 + [0.0] * 2] and cond.size == (768.0, 1024.0, None, None)
    with pytest.raises(ValueError, match="no mT5 tokens.*HunyuanDiT BERT \\+ mT5-XL"):
        hunyuan_dit_conditioning([[torch.ones(1, 7, 24), {"attention_mask": mask}]], "positive")
