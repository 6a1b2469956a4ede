"""Qwen-Image checkpoints in the formats ComfyUI users have load offline, bit for bit.

Small random transformers (2 heads of 32, rotary axes in the releases' proportion) are written at
test time as ComfyUI's single files (models/diffusion_models, with and without its
``model.diffusion_model.`` prefix; float32, bf16 and scaled fp8) and as a diffusers pipeline
folder; each must load into the same QwenImageTransformer2DModel weights. Other variants and
broken files are refused from the headers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.loading.qwen_image import load_qwen_image_transformer, read_qwen_image_config
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from checkpoints import (COMFY_PREFIX, make_flux_diffusers_model, make_qwen_image_diffusers_model, make_wan_diffusers_model,
                         write_bfl_file, write_diffusers_folder, write_qwen_image_file, write_vae_like_file, write_wan_file)

QWEN = dict(num_layers=2, heads=2, head_dim=32, joint_attention_dim=48)


def assert_same_weights(loaded, model):
    expected = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def model():
    return make_qwen_image_diffusers_model(**QWEN, seed=1)


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_comfyui_single_file_loads_exactly(tmp_path, model, prefix):
    path = write_qwen_image_file(model, tmp_path / "qwen_image_tiny.safetensors", prefix=prefix)
    config = read_qwen_image_config(path)
    for name in ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim", "in_channels",
                 "out_channels", "patch_size"):
        assert config[name] == model.config[name], name
    assert tuple(config["axes_dims_rope"]) == tuple(model.config.axes_dims_rope) == (4, 14, 14)
    loaded = load_qwen_image_transformer(path, dtype=torch.float32)
    assert_same_weights(loaded, model)
    assert families.detect(path) is families.QWEN_IMAGE


def test_release_head_width_gets_the_release_rotary_axes(tmp_path):
    model = make_qwen_image_diffusers_model(num_layers=1, heads=1, head_dim=128, joint_attention_dim=16)
    assert read_qwen_image_config(write_qwen_image_file(model, tmp_path / "q.safetensors"))["axes_dims_rope"] == (16, 56, 56)


def test_diffusers_folder_loads_exactly_and_its_config_is_checked(tmp_path, model):
    folder = write_diffusers_folder(model, tmp_path / "pipeline", pipeline=True)
    assert_same_weights(load_qwen_image_transformer(folder, dtype=torch.float32), model)
    assert families.detect(folder) is families.QWEN_IMAGE
    config_path = folder / "transformer" / "config.json"
    stored = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**stored, "zero_cond_t": True}))
    with pytest.raises(CheckpointError, match="zero_cond_t is set: a Qwen-Image edit or layered variant"):
        read_qwen_image_config(folder)
    config_path.write_text(json.dumps({**stored, "num_layers": 5}))
    with pytest.raises(CheckpointError, match="num_layers is 5 but the weights say 2"):
        read_qwen_image_config(folder)


def test_bfloat16_and_scaled_fp8_files(tmp_path, model):
    bf16 = write_qwen_image_file(model, tmp_path / "qwen_image_bf16.safetensors", dtype=torch.bfloat16)
    loaded = load_qwen_image_transformer(bf16, dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    fp8 = write_qwen_image_file(model, tmp_path / "qwen_image_fp8_scaled.safetensors", prefix=COMFY_PREFIX, scaled_fp8=True)
    loaded = load_qwen_image_transformer(fp8, dtype=torch.float32).state_dict()
    for key, want in model.state_dict().items():
        # float8_e4m3fn keeps 3 mantissa bits: at most 1/16 relative error per element
        assert (loaded[key] - want).abs().max() <= want.abs().max() / 16 + 1e-6, key


def test_family_detection_tells_qwen_image_from_others(tmp_path, model):
    qwen = write_qwen_image_file(model, tmp_path / "qwen.safetensors", prefix=COMFY_PREFIX)
    flux = write_bfl_file(make_flux_diffusers_model(), tmp_path / "flux.safetensors", prefix=COMFY_PREFIX)
    wan = write_wan_file(make_wan_diffusers_model(heads=2, head_dim=128, ffn_dim=32), tmp_path / "wan.safetensors")
    assert families.detect(qwen) is families.QWEN_IMAGE
    assert families.detect(flux) is families.FLUX
    assert families.detect(wan) is families.WAN
    with pytest.raises(CheckpointError, match="not a checkpoint of a supported model family"):
        families.detect(write_vae_like_file(tmp_path / "vae.safetensors"))
    for other in (flux, wan):
        with pytest.raises(CheckpointError, match="not a Qwen-Image transformer checkpoint"):
            read_qwen_image_config(other)


def _damaged(tmp_path, model, damage: str):
    sd = load_file(str(write_qwen_image_file(model, tmp_path / "qwen.safetensors")))
    if damage == "missing":
        del sd["transformer_blocks.1.img_mlp.net.2.weight"]
    elif damage == "unexpected":
        sd["transformer_blocks.0.surprise.weight"] = torch.zeros(2)
    elif damage == "int8":
        sd["transformer_blocks.0.img_mlp.net.2.weight"] = sd["transformer_blocks.0.img_mlp.net.2.weight"].to(torch.int8)
    elif damage == "shape":
        sd["transformer_blocks.1.attn.to_q.weight"] = torch.zeros(64, 32)
    elif damage == "controlnet":
        sd["controlnet_blocks.0.weight"] = torch.zeros(64, 64)
    elif damage == "layered":
        sd["time_text_embed.addition_t_embedding.weight"] = torch.zeros(2, 64)
    elif damage == "channels":
        sd["proj_out.weight"] = torch.zeros(4 * 32, 64)
        sd["proj_out.bias"] = torch.zeros(4 * 32)
    path = tmp_path / f"broken_{damage}.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("damage, message", [
    ("missing", "1 missing keys \\(first: transformer_blocks.1.img_mlp.net.2.weight\\)"),
    ("unexpected", "1 unexpected keys \\(first: transformer_blocks.0.surprise.weight\\)"),
    ("int8", "stored as I8: quantized"),
    ("shape", "transformer_blocks.1.attn.to_q.weight' has shape \\(64, 32\\), expected \\(64, 64\\)"),
    ("controlnet", "a Qwen-Image ControlNet"),
    ("layered", "Qwen-Image-Layered, which is not supported"),
    ("channels", "makes 32 latent channels; Qwen-Image makes 16"),
])
def test_a_file_that_does_not_fit_is_refused_from_its_header(tmp_path, model, damage, message):
    with pytest.raises(CheckpointError, match=message):
        read_qwen_image_config(_damaged(tmp_path, model, damage))


def test_truncated_and_pickle_files_are_refused(tmp_path, model):
    path = write_qwen_image_file(model, tmp_path / "qwen.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        read_qwen_image_config(truncated)
    pickle = tmp_path / "qwen_image.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(CheckpointError, match="pickle-based checkpoints are refused"):
        read_qwen_image_config(pickle)
