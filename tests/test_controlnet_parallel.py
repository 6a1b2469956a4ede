"""Flux ControlNets in the engine: every exact parallel method with ControlNets equals one worker.

Tiny Flux and tiny ControlNets (random weights, float32) written as the files users have: an
InstantX union ControlNet (diffusers layout, with single blocks) chained after an XLabs one (BFL
layout, pixel hint). Strengths and percent ranges are not the defaults, the latent is 10x14 (35
image tokens: every sequence-parallel degree pads), and positive and negative differ in length.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_flux_diffusers_model
from comfy_xdit.loading.flux_controlnet import ControlNetError, read_controlnet_info
from comfy_xdit.models.flux_controlnet import block_sources
from comfy_xdit.requests import ControlNetRequest, FluxConditioning, ModelSpec, SampleRequest
from controlnet_files import make_flux_controlnet, write_instantx_file, write_sd15_controlnet_file, write_xlabs_file
from distributed import cpu_engine, relative_error, run_on_ranks

TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
H, W = 10, 14


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    instantx = write_instantx_file(make_flux_controlnet(num_layers=2, num_single_layers=1, num_mode=3, seed=1),
                                   folder / "instantx_union.safetensors")
    xlabs = write_xlabs_file(make_flux_controlnet(num_layers=1, num_single_layers=0, seed=2), folder / "xlabs.safetensors")
    return str(instantx), str(xlabs)


def request(files, batch: int = 1, cfg: float = 2.0, controls: str = "both", strength: float = 0.8) -> SampleRequest:
    g = torch.Generator().manual_seed(1)
    positive = FluxConditioning(torch.randn(1, 7, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    negative = FluxConditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g), 3.5)
    latent_hint = torch.randn(2, 16, H, W, generator=g)  # two control images: rows alternate
    pixels = torch.rand(1, 3, 8 * H, 8 * W, generator=g)
    chosen = []
    if controls in ("both", "instantx"):
        chosen.append(ControlNetRequest(files[0], latent_hint, strength, 0.0, 0.7, mode=2))
    if controls in ("both", "xlabs"):
        chosen.append(ControlNetRequest(files[1], pixels, 0.6, 0.3, 1.0))
    return SampleRequest(torch.zeros(batch, 4, H, W), positive, negative, seed=42, steps=3, cfg=cfg,
                         controlnets=tuple(chosen))


def generate(files, config_kwargs: dict, batch: int = 1, cfg: float = 2.0, controls: str = "both",
             strength: float = 0.8) -> torch.Tensor:
    engine = cpu_engine(config_kwargs)
    engine.set_model(make_flux_diffusers_model(num_layers=2, num_single_layers=2, heads=4, head_dim=16, seed=0),
                     ModelSpec("tiny", dtype="float32"))
    return engine.sample(request(files, batch, cfg, controls, strength))


@pytest.fixture(scope="module")
def reference(files):
    cache = {}

    def get(batch: int, cfg: float = 2.0, controls: str = "both") -> torch.Tensor:
        if (batch, cfg, controls) not in cache:
            cache[(batch, cfg, controls)] = generate(files, {}, batch, cfg, controls)
        return cache[(batch, cfg, controls)]

    return get


# Two processes each (four-process groups cost more start-up than they add checking here):
# ulysses at batch 2 also checks that each row gets its own control image.
CASES = {
    "ulysses=2, batch 2": (2, dict(ulysses_degree=2), 2),
    "ring=2": (2, dict(ring_degree=2), 1),
    "cfg parallel": (2, dict(use_cfg_parallel=True), 1),
    "data=2": (2, dict(data_parallel_degree=2), 2),
    "tensor=2": (2, dict(tensor_parallel_degree=2), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_with_controlnets_equals_one_worker(name, files, reference):
    world, config_kwargs, batch = CASES[name]
    expected = reference(batch)
    for rank, result in enumerate(run_on_ranks(world, generate, files, config_kwargs, batch)):
        error = relative_error(result, expected)
        print(f"{name}: rank {rank} relative error {error:.2e}")
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"


def test_each_controlnet_changes_the_result(files, reference):
    plain = generate(files, {}, 1, 2.0, "none")
    instantx, both = reference(1, 2.0, "instantx"), reference(1)
    assert relative_error(instantx, plain) > 1e-2
    assert relative_error(both, instantx) > 1e-2


def test_strength_zero_equals_no_controlnet(files):
    assert torch.equal(generate(files, {}, controls="instantx", strength=0.0), generate(files, {}, controls="none"))


def test_block_sources_follow_comfyui():
    # InstantX residuals come in runs of ceil(19 / n); XLabs residuals cycle; none past Flux.1's 19 / 38.
    assert block_sources("instantx", 5, 19, 19) == [i // 4 for i in range(19)]
    assert block_sources("xlabs", 2, 19, 19) == [i % 2 for i in range(19)]
    assert block_sources("instantx", 2, 4, 19) == [0, 0, 0, 0]  # diffusers' interval rule would give [0, 0, 1, 1]
    assert block_sources("instantx", 1, 21, 19)[19:] == [None, None]
    assert block_sources("instantx", 0, 3, 38) == [None, None, None]


def test_file_kinds_and_refusals(files, tmp_path):
    assert read_controlnet_info(files[0])["kind"] == "instantx" and read_controlnet_info(files[0])["num_modes"] == 3
    assert read_controlnet_info(files[1])["kind"] == "xlabs" and not read_controlnet_info(files[1])["needs_vae"]
    with pytest.raises(ControlNetError, match="UNet ControlNet for SD1.5/SDXL"):
        read_controlnet_info(write_sd15_controlnet_file(tmp_path / "sd15_canny.safetensors"))
