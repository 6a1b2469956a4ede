"""DiT-XL-2 on the diffusers-scheduler path: one worker equals diffusers' DiTPipeline, every exact
parallel method equals one worker, the folder and single-file loaders, and bad folders refused.

Tiny DiT (2 heads x 64, 2 blocks, random weights), float32, gloo processes on the CPU. The latent
is 10x10 (25 image tokens after the 2x2 patches: every sequence-parallel degree needs padding, and
the size differs from the model's sample size, so the positional embedding is recomputed).
"""

from __future__ import annotations

import json

import pytest
import torch

from comfy_xdit.engine import RankEngine
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from comfy_xdit.requests import DiTConditioning, ModelSpec, SampleRequest
from dit_files import DDIM_CONFIG, DDPM_CONFIG, DPM_CONFIG, dit_pipeline_loop, make_dit_model, write_dit_file, write_dit_folder
from distributed import cpu_engine, relative_error, run_on_ranks

PIPELINE_TOLERANCE = 1e-5  # one worker against the diffusers pipeline, float32
TOLERANCE = 1e-4  # DESIGN.md: N workers against one, exact methods, float32
LATENT = (10, 10)
SCALE = 0.18215  # the SD VAE's: our LATENT output is the raw VAE latent
SCHEDULERS = {"ddim": DDIM_CONFIG, "dpm": DPM_CONFIG, "ddpm": DDPM_CONFIG}


def request(batch: int = 1, cfg: float = 4.0, seed: int = 7, steps: int = 3) -> SampleRequest:
    labels = torch.tensor([207, 360, 88][:batch])
    return SampleRequest(torch.zeros(batch, 4, *LATENT), DiTConditioning(labels), DiTConditioning(torch.tensor([1000])),
                         seed=seed, steps=steps, cfg=cfg)


def engine_for(path, config_kwargs: dict | None = None) -> RankEngine:
    engine = cpu_engine(config_kwargs)
    engine.load(ModelSpec(str(path), family="dit", dtype="float32"))
    return engine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    model = make_dit_model()
    return {name: write_dit_folder(root / name, config, model) for name, config in SCHEDULERS.items()}


# --- one worker against diffusers ----------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_one_worker_equals_the_dit_pipeline_loop(folders, scheduler, cfg):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    ours = engine_for(folders[scheduler]).sample(request(batch=2, cfg=cfg))
    # The pipeline's initial latents: randn_tensor with a CPU generator seeded like ours.
    noise = torch.randn((2, 4, *LATENT), generator=torch.Generator().manual_seed(7))
    expected = dit_pipeline_loop(make_dit_model(), classes[scheduler].from_config(SCHEDULERS[scheduler]), noise,
                                 [207, 360], cfg, 3) / SCALE
    assert expected.abs().max() > 1
    error = relative_error(ours, expected)
    assert error < PIPELINE_TOLERANCE, f"{scheduler} cfg {cfg}: {error:.2e} from DiTPipeline's loop"


def test_reference_loop_is_the_pipeline(folders):
    """The reference loop equals diffusers' own DiTPipeline.__call__ (with a tiny VAE for its decode)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4).eval()
    model, scheduler = make_dit_model(), DDIMScheduler.from_config(DDIM_CONFIG)
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=scheduler)
    # DiTPipeline draws latents of the model's sample size.
    images = pipe(class_labels=[207], guidance_scale=4.0, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    latents = dit_pipeline_loop(model, DDIMScheduler.from_config(DDIM_CONFIG), noise, [207], 4.0, 3)
    with torch.no_grad():
        decoded = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert relative_error(decoded, images) < PIPELINE_TOLERANCE


def test_guidance_and_class_change_the_result(folders):
    engine = engine_for(folders["ddim"])
    base = engine.sample(request())
    other = request()
    other.positive = DiTConditioning(torch.tensor([1]))
    assert relative_error(engine.sample(other), base) > 1e-2
    assert relative_error(engine.sample(request(cfg=1.0)), base) > 1e-2


# --- parallel against one worker ---------------------------------------------------------------

CASES = {
    "ulysses=2": (dict(ulysses_degree=2), 1, "ddim"),
    "ring=2": (dict(ring_degree=2), 1, "dpm"),
    "cfg parallel": (dict(use_cfg_parallel=True), 1, "ddim"),
    "data=2": (dict(data_parallel_degree=2), 2, "dpm"),
    # DDPM draws noise in every step: drawn for the whole batch on every rank, never per shard.
    "data=2, ddpm": (dict(data_parallel_degree=2), 3, "ddpm"),
    "ulysses=2, ddpm": (dict(ulysses_degree=2), 1, "ddpm"),
}


WRONG_ORDER = "ulysses=2, shards swapped"


def generate_all_cases(folders: dict) -> dict:
    results = {name: engine_for(folders[scheduler], kwargs).sample(request(batch)) for name, (kwargs, batch, scheduler) in CASES.items()}
    # Deliberately hand each rank another rank's shard: the comparison must catch it.
    engine = engine_for(folders["ddim"], dict(ulysses_degree=2))
    forward = engine._denoiser.forward
    forward.shard_index = forward.degree - 1 - forward.shard_index
    results[WRONG_ORDER] = engine.sample(request())
    return results


@pytest.fixture(scope="module")
def two_workers(folders):
    return run_on_ranks(2, generate_all_cases, {k: str(v) for k, v in folders.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_equals_one_worker(name, folders, two_workers):
    _, batch, scheduler = CASES[name]
    expected = engine_for(folders[scheduler]).sample(request(batch))
    for rank, results in enumerate(two_workers):
        result = results[name]
        assert result.shape == expected.shape == (batch, 4, *LATENT)
        error = relative_error(result, expected)
        assert error < TOLERANCE, f"{name}: rank {rank} differs from one worker by {error:.2e}"


def test_wrong_shard_order_is_caught(folders, two_workers):
    expected = engine_for(folders["ddim"]).sample(request())
    assert relative_error(two_workers[0][WRONG_ORDER], expected) > 100 * TOLERANCE


# --- loading ---------------------------------------------------------------------------------------


def test_single_file_loads_offline_with_the_inferred_config(tmp_path, folders):
    model = make_dit_model()
    path = write_dit_file(tmp_path / "dit.safetensors", model)
    assert families.detect(path) is families.DIT
    config = families.DIT.read_config(str(path))
    assert (config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]) == (2, 64, 2)
    assert (config["out_channels"], config["num_embeds_ada_norm"], config["patch_size"]) == (8, 1000, 2)
    loaded = families.DIT.load(str(path), dtype=torch.float32, device="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # A single file samples with DiT's default DDIM schedule: the same as the DDIM folder (whose
    # config also says sample size 8; at 10x10 both recompute the positional embedding from it).
    folder_result = engine_for(folders["ddim"]).sample(request())
    assert families.DIT.pipeline.scheduler_config(str(path))["_class_name"] == "DDIMScheduler"
    file_engine = engine_for(path)
    # The file's inferred sample size is DiT-XL-2-256's 32; with the folder's 8 the results match.
    assert file_engine.model.config.sample_size == 32
    file_engine.model.pos_embed.base_size = 8 // 2
    assert relative_error(file_engine.sample(request()), folder_result) < PIPELINE_TOLERANCE


def test_folder_is_detected_and_transformer_subfolder_finds_the_scheduler(folders):
    assert families.detect(folders["dpm"]) is families.DIT
    scheduler = families.DIT.pipeline.scheduler_config(str(folders["dpm"] / "transformer"))
    assert scheduler["_class_name"] == "DPMSolverMultistepScheduler"


def test_weights_file_inside_a_folder_uses_the_folder(folders):
    # ComfyUI's model list shows <folder>/transformer/diffusion_pytorch_model.safetensors.
    weights = folders["dpm"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert families.DIT.read_config(str(weights))["sample_size"] == 8  # the folder's config, not the inferred 32
    assert families.DIT.pipeline.scheduler_config(str(weights))["_class_name"] == "DPMSolverMultistepScheduler"


def test_class_label_node_conditioning(folders):
    from comfy_xdit import bridge

    positive = bridge.dit_conditioning(bridge.class_label_conditioning(207), "positive")
    negative = bridge.dit_conditioning(bridge.class_label_conditioning(bridge.DIT_NULL_CLASS), "negative")
    assert positive.class_labels.tolist() == [207] and negative.class_labels.tolist() == [1000]
    expected = engine_for(folders["ddim"]).sample(request())
    same = request()
    same.positive, same.negative = positive, negative
    assert torch.equal(engine_for(folders["ddim"]).sample(same), expected)
    text = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(ValueError, match="connect the Parallel Class Label node's positive output"):
        bridge.dit_conditioning(text, "positive")


def test_old_transformer2d_class_name_is_accepted(tmp_path):
    folder = write_dit_folder(tmp_path / "old")
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, use_linear_projection=False)
    config_path.write_text(json.dumps(config))
    assert families.DIT.read_config(str(folder))["num_layers"] == 2


def test_bad_folders_are_refused_clearly(tmp_path):
    missing = write_dit_folder(tmp_path / "missing", scheduler_config=None)
    with pytest.raises(CheckpointError, match=r"no scheduler/scheduler_config.json.*whole diffusers folder"):
        families.DIT.read_config(str(missing))
    with pytest.raises(CheckpointError, match="no scheduler/scheduler_config.json"):
        cpu_engine().load(
            ModelSpec(str(missing), family="dit", dtype="float32"))
    unknown = write_dit_folder(tmp_path / "unknown", scheduler_config={**DDIM_CONFIG, "_class_name": "MagicScheduler"})
    with pytest.raises(CheckpointError, match="unknown scheduler class 'MagicScheduler'.*DDIMScheduler"):
        families.DIT.read_config(str(unknown))
    not_json = write_dit_folder(tmp_path / "broken")
    (not_json / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable scheduler config"):
        families.DIT.read_config(str(not_json))


def test_requests_it_cannot_take_are_refused(folders):
    engine = engine_for(folders["ddim"])
    for change, message in (
        (dict(positive=DiTConditioning(torch.tensor([1001]))), r"outside this DiT's 0..999"),
        (dict(denoise=0.5), "denoise 0.5 is not supported"),
        (dict(latent=torch.zeros(1, 4, 10, 12)), "square latents"),
    ):
        bad = request()
        for name, value in change.items():
            setattr(bad, name, value)
        with pytest.raises(ValueError, match=message):
            engine.sample(bad)
