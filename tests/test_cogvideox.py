"""CogVideoX on the diffusers-scheduler path: one worker equals diffusers' CogVideoXPipeline, every exact
parallel method equals one worker, loading and refusals.

Tiny CogVideoX transformers (2 heads x 16, 2 blocks, random weights), float32, gloo processes on the
CPU: a 5b-style one (3-D rotary) and a 2b-style one (sin-cos positions, fixed text length). The
latent is 3 frames of 10x10 (75 video tokens after the 2x2 patches: every sequence-parallel degree
needs padding); 7 text tokens stay whole on every rank.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from comfy_xdit.requests import CogVideoXConditioning, ModelSpec, SampleRequest
from cogvideox_files import cogvideox_pipeline_latents, make_cogvideox_model, write_cogvideox_folder
from distributed import cpu_engine, relative_error, run_on_ranks
from family_parallel import TOLERANCE, assert_every_rank_equals, swap_shards

PIPELINE_TOLERANCE = 1e-5
LATENT = (3, 10, 10)  # frames, height, width
SCALE_5B = 0.7


def conditioning():
    g = torch.Generator().manual_seed(1)
    return CogVideoXConditioning(torch.randn(1, 7, 16, generator=g)), CogVideoXConditioning(torch.randn(1, 7, 16, generator=g))


def request(batch: int = 1, cfg: float = 6.0) -> SampleRequest:
    positive, negative = conditioning()
    return SampleRequest(torch.zeros(batch, 16, *LATENT), positive, negative, seed=5, steps=3, cfg=cfg)


def engine_for(path, config_kwargs: dict | None = None) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.load(ModelSpec(str(path), family="cogvideox", dtype="float32"))
    return engine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox")
    return {
        "5b-dpm": write_cogvideox_folder(root / "5b-dpm", "dpm", make_cogvideox_model(rotary=True)),
        "5b-ddim": write_cogvideox_folder(root / "5b-ddim", "ddim", make_cogvideox_model(rotary=True)),
        "2b-ddim": write_cogvideox_folder(root / "2b-ddim", "ddim", make_cogvideox_model(rotary=False)),
    }


@pytest.mark.parametrize("name,cfg", [("5b-dpm", 6.0), ("5b-ddim", 6.0), ("5b-dpm", 1.0)])
def test_one_worker_equals_the_cogvideox_pipeline(folders, name, cfg):
    ours = engine_for(folders[name]).sample(request(cfg=cfg))
    positive, negative = conditioning()
    expected = cogvideox_pipeline_latents(make_cogvideox_model(rotary=True), name.split("-")[1], positive.context,
                                          negative.context, frames=3, height=10, width=10, seed=5, steps=3,
                                          guidance_scale=cfg)
    expected = expected.permute(0, 2, 1, 3, 4) / SCALE_5B  # the pipeline's [B, T, C, H, W] -> ComfyUI's raw LATENT
    assert expected.abs().max() > 1
    error = relative_error(ours, expected)
    assert error < PIPELINE_TOLERANCE, f"{name} cfg {cfg}: {error:.2e} from CogVideoXPipeline"


CASES = {
    "ulysses=2": ("5b-dpm", dict(ulysses_degree=2), 1),
    "ring=2": ("5b-dpm", dict(ring_degree=2), 1),
    "cfg parallel": ("5b-ddim", dict(use_cfg_parallel=True), 1),
    "data=2": ("5b-dpm", dict(data_parallel_degree=2), 2),
    "2b ulysses=2": ("2b-ddim", dict(ulysses_degree=2), 1),
    "2b ring=2": ("2b-ddim", dict(ring_degree=2), 1),
}
WRONG_ORDER = "ulysses=2, shards swapped"


def generate_all_cases(folders: dict) -> dict:
    results = {name: engine_for(folders[folder], kwargs).sample(request(batch)) for name, (folder, kwargs, batch) in CASES.items()}
    engine = engine_for(folders["5b-dpm"], dict(ulysses_degree=2))
    results[WRONG_ORDER] = swap_shards(engine).sample(request())
    return results


@pytest.fixture(scope="module")
def two_workers(folders):
    return run_on_ranks(2, generate_all_cases, {k: str(v) for k, v in folders.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_equals_one_worker(name, folders, two_workers):
    folder, _, batch = CASES[name]
    expected = engine_for(folders[folder]).sample(request(batch))
    assert_every_rank_equals(name, two_workers, expected, (batch, 16, *LATENT))


def test_wrong_shard_order_is_caught(folders, two_workers):
    expected = engine_for(folders["5b-dpm"]).sample(request())
    assert relative_error(two_workers[0][WRONG_ORDER], expected) > 100 * TOLERANCE


def test_stock_t5_conditioning_reaches_the_model(folders):
    from comfy_xdit import bridge

    positive, _ = conditioning()
    # stock CLIPTextEncode with a T5 CLIP: [[tokens, {"pooled_output": None, ...}]]
    read = bridge.cogvideox_conditioning([[positive.context, {"pooled_output": None}]], "positive")
    assert torch.equal(read.context, positive.context)
    wrong = request()
    wrong.positive = CogVideoXConditioning(torch.zeros(1, 7, 32))
    with pytest.raises(ValueError, match="32 wide but this CogVideoX .* takes 16"):
        engine_for(folders["5b-dpm"]).sample(wrong)


def test_refusals(folders, tmp_path):
    short = request()
    short.positive = CogVideoXConditioning(torch.zeros(1, 5, 16))
    short.negative = CogVideoXConditioning(torch.zeros(1, 5, 16))
    with pytest.raises(ValueError, match="exactly 7 text tokens"):
        engine_for(folders["2b-ddim"]).sample(short)
    missing = write_cogvideox_folder(tmp_path / "missing", scheduler=None)
    with pytest.raises(CheckpointError, match="no scheduler/scheduler_config.json"):
        families.COGVIDEOX.read_config(str(missing))
    weights = missing / "transformer" / "diffusion_pytorch_model.safetensors"
    single = tmp_path / "cogvideox.safetensors"
    single.write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match="loads from its diffusers folder"):
        families.COGVIDEOX.read_config(str(single))
    assert families.detect(folders["5b-dpm"]) is families.COGVIDEOX


def test_weights_file_inside_the_folder_loads_the_folder(folders):
    # ComfyUI's model list shows <folder>/transformer/diffusion_pytorch_model.safetensors.
    weights = folders["5b-ddim"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert families.detect(weights) is families.COGVIDEOX
    assert families.COGVIDEOX.pipeline.scheduler_config(str(weights))["_class_name"] == "CogVideoXDDIMScheduler"
    assert torch.equal(engine_for(weights).sample(request()), engine_for(folders["5b-ddim"]).sample(request()))


def test_bench_video_group_and_tiny_dry_run(tmp_path):
    """bench/video_loop.py's CPU dry run: the diffusers and ours rows time their steps and sample the same latents."""
    import importlib.util
    import json
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    modules = {}
    for name in ("run", "video_loop"):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    launches = {name: (nproc, args) for name, nproc, args in modules["run"].launches("video-cogvideox")}
    assert launches["ours-2gpu"] == (2, ["--impl", "ours", "--degrees", "c2,u2"])
    four = {name: (nproc, args) for name, nproc, args in modules["run"].launches("video-cogvideox-4gpu")}
    assert four["ours-4gpu"] == (4, ["--impl", "ours", "--degrees", "c2u2,u4"])
    assert modules["run"].GROUP_LOOPS["video-cogvideox"].name == "video_loop.py"

    results = tmp_path / "rows.jsonl"
    assert modules["video_loop"].main(["--device", "cpu", "--tiny", "--steps", "2", "--json", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffusers", "ours"]
    assert all(r["per_step"] and len(r["times"]) == 2 and r["finite"] for r in rows)
    assert rows[1]["rel_diff_vs_diffusers"] < PIPELINE_TOLERANCE
    assert "s per step" in modules["run"].table(rows)
