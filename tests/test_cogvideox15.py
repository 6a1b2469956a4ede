"""CogVideoX 1.5 text-to-video (temporal patches): one worker equals diffusers' CogVideoXPipeline,
every exact parallel method equals one worker, loading and refusals.

A tiny CogVideoX 1.5 transformer (2 heads x 16, 2 blocks, patch_size_t 2, random weights),
float32, gloo processes on the CPU. The latent is 5 frames of 10x10: the pipeline pads it to 6
frames (one extra noise frame in front, dropped at the end), i.e. 3 frame patches x 5 x 5 = 75
video tokens, so every sequence-parallel degree also needs token padding; 7 text tokens stay whole
on every rank.
"""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from comfy_xdit.models.cogvideox import frame_padding
from comfy_xdit.requests import CogVideoXConditioning, ModelSpec, SampleRequest
from cogvideox_files import cogvideox_pipeline_latents, make_cogvideox15_model, write_cogvideox_folder
from distributed import cpu_engine, relative_error, run_on_ranks
from family_parallel import TOLERANCE, assert_every_rank_equals, swap_shards

PIPELINE_TOLERANCE = 1e-5
LATENT = (5, 10, 10)  # frames (odd: the pipeline pads one), height, width
SCALE = 0.7  # CogVideoX1.5-5B's VAE scaling_factor (the 5b one)


def conditioning():
    g = torch.Generator().manual_seed(1)
    return CogVideoXConditioning(torch.randn(1, 7, 16, generator=g)), CogVideoXConditioning(torch.randn(1, 7, 16, generator=g))


def request(batch: int = 1, cfg: float = 6.0, latent: tuple = LATENT) -> SampleRequest:
    positive, negative = conditioning()
    return SampleRequest(torch.zeros(batch, 16, *latent), positive, negative, seed=5, steps=3, cfg=cfg)


def engine_for(path, config_kwargs: dict | None = None) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.load(ModelSpec(str(path), family="cogvideox", dtype="float32"))
    return engine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox15")
    return {name: write_cogvideox_folder(root / name, name, make_cogvideox15_model()) for name in ("dpm", "ddim")}


def test_frame_padding_fills_whole_temporal_patches():
    config = make_cogvideox15_model().config
    assert [frame_padding(config, frames) for frames in (1, 2, 5, 21, 22)] == [1, 0, 1, 1, 0]
    assert frame_padding(make_cogvideox15_model(patch_size_t=None).config, 5) == 0  # 1.0: no temporal patches


@pytest.mark.parametrize("scheduler,cfg,frames", [("dpm", 6.0, 5), ("ddim", 6.0, 5), ("dpm", 1.0, 5), ("dpm", 6.0, 4)])
def test_one_worker_equals_the_cogvideox_pipeline(folders, scheduler, cfg, frames):
    latent = (frames, *LATENT[1:])
    ours = engine_for(folders[scheduler]).sample(request(cfg=cfg, latent=latent))
    positive, negative = conditioning()
    padded = cogvideox_pipeline_latents(make_cogvideox15_model(), scheduler, positive.context, negative.context,
                                        frames=frames, height=10, width=10, seed=5, steps=3, guidance_scale=cfg)
    # output_type "latent" keeps the padding frames; the pipeline drops them (in front) before decoding
    assert padded.shape[1] == frames + frames % 2
    expected = padded[:, padded.shape[1] - frames:].permute(0, 2, 1, 3, 4) / SCALE  # -> ComfyUI's raw LATENT
    assert ours.shape == expected.shape == (1, 16, *latent)
    assert expected.abs().max() > 1
    error = relative_error(ours, expected)
    assert error < PIPELINE_TOLERANCE, f"{scheduler} cfg {cfg} {frames} frames: {error:.2e} from CogVideoXPipeline"


CASES = {
    "ulysses=2": ("dpm", dict(ulysses_degree=2), 1),
    "ring=2": ("dpm", dict(ring_degree=2), 1),
    "cfg parallel": ("ddim", dict(use_cfg_parallel=True), 1),
    "data=2": ("dpm", dict(data_parallel_degree=2), 2),
}
WRONG_ORDER = "ulysses=2, shards swapped"
UNSPLIT_ROTARY = "ulysses=2, whole rotary table's first rows on both ranks"


def generate_all_cases(folders: dict) -> dict:
    results = {name: engine_for(folders[folder], kwargs).sample(request(batch)) for name, (folder, kwargs, batch) in CASES.items()}
    engine = engine_for(folders["dpm"], dict(ulysses_degree=2))
    results[WRONG_ORDER] = swap_shards(engine).sample(request())
    # rotary rows not split with their tokens (rank 0's rows on every rank): the comparison must catch this too
    engine = engine_for(folders["dpm"], dict(ulysses_degree=2))
    denoiser = engine._denoiser
    own_rows = denoiser._rotary_for

    def first_rows(frames, height, width, device):
        index = denoiser.forward.shard_index
        denoiser.forward.shard_index = 0
        try:
            denoiser._rotary_key = None
            return own_rows(frames, height, width, device)
        finally:
            denoiser.forward.shard_index = index

    denoiser._rotary_for = first_rows
    results[UNSPLIT_ROTARY] = engine.sample(request())
    return results


@pytest.fixture(scope="module")
def two_workers(folders):
    return run_on_ranks(2, generate_all_cases, {k: str(v) for k, v in folders.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_equals_one_worker(name, folders, two_workers):
    folder, _, batch = CASES[name]
    expected = engine_for(folders[folder]).sample(request(batch))
    assert_every_rank_equals(name, two_workers, expected, (batch, 16, *LATENT))


@pytest.mark.parametrize("wrong", [WRONG_ORDER, UNSPLIT_ROTARY])
def test_a_wrong_plan_is_caught(folders, two_workers, wrong):
    expected = engine_for(folders["dpm"]).sample(request())
    assert relative_error(two_workers[0][wrong], expected) > 100 * TOLERANCE


def test_offline_loading_and_refusals(folders, tmp_path):
    weights = folders["dpm"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert families.detect(folders["dpm"]) is families.detect(weights) is families.COGVIDEOX
    config = families.COGVIDEOX.read_config(str(folders["dpm"]))
    assert config["patch_size_t"] == 2 and config["patch_bias"] is False
    assert families.COGVIDEOX.latent_format(config).scale == SCALE
    engine = engine_for(weights)  # the weights file inside the folder stands for the folder
    loaded = engine.model.state_dict()
    for key, value in make_cogvideox15_model().state_dict().items():
        assert torch.equal(loaded[key], value), key

    with pytest.raises(ValueError, match="at most 10x10 .* got 12x12"):
        engine.sample(request(latent=(5, 12, 12)))
    with pytest.raises(ValueError, match="latent frames in multiples of 2; got 3"):
        engine._denoiser(torch.zeros(1, 3, 16, 10, 10), torch.tensor(999), conditioning()[0].context)



@pytest.mark.parametrize("version,i2v_config", [("1.5", dict(in_channels=32, ofs_embed_dim=8)),
                                                ("1.0", dict(in_channels=32, patch_size_t=None, patch_bias=True))])
def test_image_to_video_is_refused_by_name(tmp_path, version, i2v_config):
    i2v = write_cogvideox_folder(tmp_path / "i2v", "dpm", make_cogvideox15_model(**i2v_config))
    with pytest.raises(CheckpointError, match=f"CogVideoX {version} image-to-video .*32 input channels.* not supported yet"):
        families.COGVIDEOX.read_config(str(i2v))


class Previews:
    def __init__(self):
        self.shown = []

    def on_step(self, step, total, preview):
        self.shown.append(preview)

    def cancel_requested(self):
        return False


def test_previews_drop_the_padding_frame(folders):
    job = request()
    job.preview_every = 1
    hooks = Previews()
    result = engine_for(folders["dpm"]).sample(job, hooks)
    assert [tuple(p.shape) for p in hooks.shown] == [(1, 16, *LATENT)] * 3
    # the DPM step's last x0 prediction is the result
    assert relative_error(hooks.shown[-1], result) < 1e-6
