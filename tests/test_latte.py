"""Latte on the diffusers-scheduler path: one worker equals diffusers' LattePipeline, every exact parallel
method equals one worker, loading and refusals.

A tiny Latte transformer (2 heads x 8, 2 spatial + 2 temporal blocks, random weights), float32, gloo
processes on the CPU. The latent is 3 frames (the model's video_length) of 10x10: 25 spatial tokens
per frame after the 2x2 patches, so every sequence-parallel degree pads; 5 text tokens stay whole
on every rank.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from comfy_xdit.requests import LatteConditioning, ModelSpec, SampleRequest
from distributed import cpu_engine, relative_error, run_on_ranks
from family_parallel import TOLERANCE, assert_every_rank_equals, swap_shards
from latte_files import FRAMES, TEXT_WIDTH, latte_pipeline_latents, make_latte_model, write_latte_folder

PIPELINE_TOLERANCE = 1e-5
LATENT = (FRAMES, 10, 10)  # frames, height, width
SCALE = 0.18215


def conditioning():
    g = torch.Generator().manual_seed(1)
    return (LatteConditioning(torch.randn(1, 5, TEXT_WIDTH, generator=g)),
            LatteConditioning(torch.randn(1, 5, TEXT_WIDTH, generator=g)))


def request(batch: int = 1, cfg: float = 7.5) -> SampleRequest:
    positive, negative = conditioning()
    return SampleRequest(torch.zeros(batch, 4, *LATENT), positive, negative, seed=5, steps=3, cfg=cfg)


def engine_for(path, config_kwargs: dict | None = None) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.load(ModelSpec(str(path), family="latte", dtype="float32"))
    return engine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("latte")
    return {name: write_latte_folder(root / name, name, make_latte_model()) for name in ("ddim", "ddpm")}


@pytest.mark.parametrize("scheduler,cfg", [("ddim", 7.5), ("ddpm", 7.5), ("ddim", 1.0)])
def test_one_worker_equals_the_latte_pipeline(folders, scheduler, cfg):
    ours = engine_for(folders[scheduler]).sample(request(cfg=cfg))
    positive, negative = conditioning()
    expected = latte_pipeline_latents(make_latte_model(), scheduler, positive.context, negative.context,
                                      height=LATENT[1], width=LATENT[2], seed=5, steps=3, guidance_scale=cfg)
    expected = expected / SCALE  # the pipeline's model-space latents -> ComfyUI's raw LATENT
    assert expected.abs().max() > 1
    error = relative_error(ours, expected)
    assert error < PIPELINE_TOLERANCE, f"{scheduler} cfg {cfg}: {error:.2e} from LattePipeline"


CASES = {
    "ulysses=2": ("ddim", dict(ulysses_degree=2), 1),
    "ring=2": ("ddim", dict(ring_degree=2), 1),
    "cfg parallel": ("ddim", dict(use_cfg_parallel=True), 1),
    "data=2": ("ddim", dict(data_parallel_degree=2), 2),
    "ring=2, DDPM step noise": ("ddpm", dict(ring_degree=2), 1),
}
WRONG_ORDER = "ulysses=2, shards swapped"


def generate_all_cases(folders: dict) -> dict:
    results = {name: engine_for(folders[folder], kwargs).sample(request(batch)) for name, (folder, kwargs, batch) in CASES.items()}
    engine = engine_for(folders["ddim"], dict(ulysses_degree=2))
    results[WRONG_ORDER] = swap_shards(engine).sample(request())
    return results


@pytest.fixture(scope="module")
def reference(folders):
    cache = {}

    def get(folder: str, batch: int) -> torch.Tensor:
        if (folder, batch) not in cache:
            cache[(folder, batch)] = engine_for(folders[folder]).sample(request(batch))
        return cache[(folder, batch)]

    return get


@pytest.fixture(scope="module")
def two_workers(folders):
    return run_on_ranks(2, generate_all_cases, {k: str(v) for k, v in folders.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_equals_one_worker(name, two_workers, reference):
    folder, _, batch = CASES[name]
    assert_every_rank_equals(name, two_workers, reference(folder, batch), (batch, 4, *LATENT))


def test_wrong_shard_order_is_caught(two_workers, reference):
    assert relative_error(two_workers[0][WRONG_ORDER], reference("ddim", 1)) > 100 * TOLERANCE


def sample_on_ulysses_times_ring(path: str) -> torch.Tensor:
    return engine_for(path, dict(ulysses_degree=2, ring_degree=2)).sample(request())


def test_ulysses_times_ring_on_four_workers(folders, reference):
    # 25 tokens per frame padded to 28, 7 a rank; both gathers, Ulysses inside Ring.
    results = run_on_ranks(4, sample_on_ulysses_times_ring, str(folders["ddim"]))
    for rank, result in enumerate(results):
        assert relative_error(result, reference("ddim", 1)) < TOLERANCE, f"rank {rank}"


def test_without_temporal_attention_equals_the_pipeline_and_differs(folders, reference):
    # The temporal blocks run (and the split keeps them exact above): without them each frame is its own image.
    engine = engine_for(folders["ddim"])
    engine._denoiser.enable_temporal_attentions = False
    ours = engine.sample(request())
    positive, negative = conditioning()
    expected = latte_pipeline_latents(make_latte_model(), "ddim", positive.context, negative.context, height=LATENT[1],
                                      width=LATENT[2], seed=5, steps=3, guidance_scale=7.5,
                                      enable_temporal_attentions=False) / SCALE
    assert relative_error(ours, expected) < PIPELINE_TOLERANCE
    assert relative_error(ours, reference("ddim", 1)) > 100 * TOLERANCE


def test_stock_t5_conditioning_reaches_the_model(folders):
    from comfy_xdit import bridge

    positive, _ = conditioning()
    # stock CLIPTextEncode with a T5 CLIP: [[tokens, {"pooled_output": None, ...}]]
    read = bridge.latte_conditioning([[positive.context, {"pooled_output": None}]], "positive")
    assert torch.equal(read.context, positive.context)
    # padding marked by a mask is cropped, as LattePipeline keeps only the prompt's real tokens
    padded = torch.cat([positive.context, torch.zeros(1, 3, TEXT_WIDTH)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    cropped = bridge.latte_conditioning([[padded, {"pooled_output": None, "attention_mask": mask}]], "positive")
    assert torch.equal(cropped.context, positive.context)
    wrong = request()
    wrong.positive = LatteConditioning(torch.zeros(1, 5, 32))
    with pytest.raises(ValueError, match="32 wide but this Latte .* takes 12"):
        engine_for(folders["ddim"]).sample(wrong)


def test_refusals(folders, tmp_path):
    long = request()
    long.positive = LatteConditioning(torch.zeros(1, 121, TEXT_WIDTH))
    with pytest.raises(ValueError, match="121 T5 tokens; Latte takes at most 120"):
        engine_for(folders["ddim"]).sample(long)
    frames = request()
    frames.latent = torch.zeros(1, 4, 2, 10, 10)
    with pytest.raises(ValueError, match="takes 3 latent frames"):
        engine_for(folders["ddim"]).sample(frames)
    missing = write_latte_folder(tmp_path / "missing", scheduler=None)
    with pytest.raises(CheckpointError, match="no scheduler/scheduler_config.json"):
        families.LATTE.read_config(str(missing))
    weights = missing / "transformer" / "diffusion_pytorch_model.safetensors"
    single = tmp_path / "latte.safetensors"
    single.write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="loads from its diffusers folder"):
        families.LATTE.read_config(str(single))
    assert families.detect(folders["ddim"]) is families.LATTE


def test_weights_file_inside_the_folder_loads_the_folder(folders):
    # ComfyUI's model list shows <folder>/transformer/diffusion_pytorch_model.safetensors.
    weights = folders["ddpm"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert families.detect(weights) is families.LATTE
    assert families.LATTE.pipeline.scheduler_config(str(weights))["_class_name"] == "DDPMScheduler"
    assert torch.equal(engine_for(weights).sample(request()), engine_for(folders["ddpm"]).sample(request()))
