"""SD3 / SD3.5 checkpoints in the formats ComfyUI users have load offline, bit for bit.

Small random transformers are written at test time as a whole checkpoint (models/checkpoints:
``model.diffusion_model.`` plus text-encoder and VAE keys, which are ignored), a transformer-only
file (models/diffusion_models, with and without the prefix), a diffusers-layout file and a
diffusers folder; each must load into the same SD3Transformer2DModel weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.loading.sd3 import load_sd3_transformer, read_sd3_config
from comfy_xdit.models import families
from checkpoints import (COMFY_PREFIX, make_flux_diffusers_model, make_sd3_diffusers_model, sd3_checkpoint_extras,
                         write_bfl_file, write_diffusers_file, write_diffusers_folder, write_sd3_file, write_vae_like_file)

SD35 = dict(num_layers=3, heads=2, head_dim=8, dual_attention_layers=(0, 1), qk_norm="rms_norm", pos_embed_max_size=8)
SD3 = dict(num_layers=2, heads=2, head_dim=64, pos_embed_max_size=8)


def assert_same_weights(loaded, model):
    expected = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("arch", ["sd3", "sd3.5"])
@pytest.mark.parametrize("form", ["checkpoint", "diffusion_model", "diffusion_model-prefixed"])
def test_single_files_in_comfyui_layout_load_exactly(tmp_path, arch, form):
    model = make_sd3_diffusers_model(**(SD35 if arch == "sd3.5" else SD3), seed=1)
    if form == "checkpoint":
        path = write_sd3_file(model, tmp_path / "checkpoints" / "sd3.safetensors", prefix=COMFY_PREFIX, extra=sd3_checkpoint_extras())
    else:
        path = write_sd3_file(model, tmp_path / "sd3.safetensors", prefix=COMFY_PREFIX if form.endswith("prefixed") else "")
    config = read_sd3_config(path)
    assert config["num_layers"] == model.config.num_layers
    assert config["num_attention_heads"] == model.config.num_attention_heads
    assert config["attention_head_dim"] == model.config.attention_head_dim
    assert tuple(config["dual_attention_layers"]) == tuple(model.config.dual_attention_layers)
    assert config["qk_norm"] == model.config.qk_norm
    assert config["pos_embed_max_size"] == 8
    assert_same_weights(load_sd3_transformer(path, dtype=torch.float32), model)
    assert families.detect(path) is families.SD3


def test_diffusers_file_and_folder_load_exactly(tmp_path):
    model = make_sd3_diffusers_model(**SD35, seed=2)
    file = write_diffusers_file(model, tmp_path / "sd3_diffusers.safetensors")
    folder = write_diffusers_folder(model, tmp_path / "pipeline", pipeline=True)
    for path in (file, folder):
        assert_same_weights(load_sd3_transformer(path, dtype=torch.float32), model)
        assert families.detect(path) is families.SD3


def test_bfloat16_load_casts_every_weight(tmp_path):
    model = make_sd3_diffusers_model(**SD35, seed=3)
    path = write_sd3_file(model, tmp_path / "sd3.safetensors")
    loaded = load_sd3_transformer(path, dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_family_detection_tells_flux_from_sd3_and_refuses_others(tmp_path):
    flux = write_bfl_file(make_flux_diffusers_model(), tmp_path / "flux.safetensors", prefix=COMFY_PREFIX)
    assert families.detect(flux) is families.FLUX
    vae = write_vae_like_file(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="not a checkpoint of a supported model family"):
        families.detect(vae)


@pytest.mark.parametrize("damage, message", [
    ("missing", "key 'joint_blocks.1.x_block.mlp.fc2.weight' is missing"),
    ("unexpected", "1 unexpected keys \\(first: joint_blocks.0.x_block.surprise.weight\\)"),
    ("int8", "stored as I8: quantized"),
])
def test_a_file_that_does_not_fit_is_refused_from_its_header(tmp_path, damage, message):
    from safetensors.torch import load_file

    path = write_sd3_file(make_sd3_diffusers_model(**SD3, seed=4), tmp_path / "sd3.safetensors")
    sd = load_file(str(path))
    if damage == "missing":
        del sd["joint_blocks.1.x_block.mlp.fc2.weight"]
    elif damage == "unexpected":
        sd["joint_blocks.0.x_block.surprise.weight"] = torch.zeros(2)
    else:
        sd["joint_blocks.0.x_block.mlp.fc2.weight"] = sd["joint_blocks.0.x_block.mlp.fc2.weight"].to(torch.int8)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        read_sd3_config(tmp_path / "broken.safetensors")


def test_a_flux_file_is_not_an_sd3_file(tmp_path):
    flux = write_bfl_file(make_flux_diffusers_model(), tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="not a Stable Diffusion 3 / 3.5 transformer checkpoint"):
        read_sd3_config(flux)
