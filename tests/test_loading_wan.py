"""Wan 2.1 / 2.2 text-to-video checkpoints in the formats ComfyUI users have load offline, bit for bit.

Small random transformers (width 256 = 2 heads of Wan's 128) are written at test time in the
original Wan layout (models/diffusion_models, with and without ComfyUI's ``model.diffusion_model.``
prefix), a diffusers-layout file and a diffusers pipeline folder; each must load into the same
WanTransformer3DModel weights. Other Wan variants and broken files are refused from the headers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.loading.wan import load_wan_transformer, read_wan_config
from comfy_xdit.models import families
from checkpoints import (COMFY_PREFIX, make_sd3_diffusers_model, make_wan_diffusers_model, write_diffusers_file,
                         write_diffusers_folder, write_sd3_file, write_vae_like_file, write_wan_file)

WAN = dict(num_layers=2, heads=2, head_dim=128, ffn_dim=64, text_dim=48, freq_dim=32)


def assert_same_weights(loaded, model):
    expected = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def model():
    return make_wan_diffusers_model(**WAN, seed=1)


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_original_wan_layout_loads_exactly(tmp_path, model, prefix):
    path = write_wan_file(model, tmp_path / "wan2.1_t2v_tiny.safetensors", prefix=prefix)
    config = read_wan_config(path)
    for name in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim", "freq_dim",
                 "in_channels", "out_channels", "cross_attn_norm"):
        assert config[name] == model.config[name], name
    assert tuple(config["patch_size"]) == tuple(model.config.patch_size)
    assert_same_weights(load_wan_transformer(path, dtype=torch.float32), model)
    assert families.detect(path) is families.WAN


def test_the_writer_agrees_with_diffusers_converter(model):
    # The test writer is independent of diffusers' converter (which the loader uses): they must be inverses.
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from checkpoints import diffusers_to_wan_state_dict

    back = convert_wan_transformer_to_diffusers(diffusers_to_wan_state_dict(model.state_dict()))
    assert sorted(back) == sorted(model.state_dict())


def test_diffusers_file_and_folder_load_exactly(tmp_path, model):
    file = write_diffusers_file(model, tmp_path / "wan_diffusers.safetensors")
    folder = write_diffusers_folder(model, tmp_path / "pipeline", pipeline=True)
    for path in (file, folder):
        assert_same_weights(load_wan_transformer(path, dtype=torch.float32), model)
        assert families.detect(path) is families.WAN


def test_a_folder_config_sets_the_heads(tmp_path):
    # Shapes cannot tell heads from head width; a diffusers folder's config.json can.
    model = make_wan_diffusers_model(num_layers=1, heads=4, head_dim=16, ffn_dim=32, text_dim=32, seed=2)
    folder = write_diffusers_folder(model, tmp_path / "folder")
    config = read_wan_config(folder)
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (4, 16)
    assert_same_weights(load_wan_transformer(folder, dtype=torch.float32), model)


def test_bfloat16_load_keeps_diffusers_float32_modules(tmp_path, model):
    path = write_wan_file(model, tmp_path / "wan.safetensors", prefix=COMFY_PREFIX)
    loaded = load_wan_transformer(path, dtype="bf16")
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert loaded.rope.freqs_cos.dtype == torch.float32 and not loaded.rope.freqs_cos.is_meta


def test_scaled_fp8_file_is_upcast_and_scaled(tmp_path, model):
    # ComfyUI's wan2.1_t2v_*_fp8_scaled files: float8 weights with a per-layer scale_weight.
    path = write_wan_file(model, tmp_path / "wan_fp8_scaled.safetensors", prefix=COMFY_PREFIX, scaled_fp8=True)
    loaded = load_wan_transformer(path, dtype=torch.float32).state_dict()
    for key, want in model.state_dict().items():
        # float8_e4m3fn keeps 3 mantissa bits: at most 1/16 relative error per element
        assert (loaded[key] - want).abs().max() <= want.abs().max() / 16 + 1e-6, key


def test_family_detection_tells_wan_from_others(tmp_path, model):
    wan = write_wan_file(model, tmp_path / "wan.safetensors", prefix=COMFY_PREFIX)
    sd3 = write_sd3_file(make_sd3_diffusers_model(num_layers=1, heads=2, head_dim=8, pos_embed_max_size=8),
                         tmp_path / "sd3.safetensors")
    assert families.detect(wan) is families.WAN
    assert families.detect(sd3) is families.SD3
    with pytest.raises(CheckpointError, match="not a checkpoint of a supported model family"):
        families.detect(write_vae_like_file(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan 2.1 / 2.2 transformer checkpoint"):
        read_wan_config(sd3)


def _damaged(tmp_path, model, damage: str):
    sd = load_file(str(write_wan_file(model, tmp_path / "wan.safetensors")))
    if damage == "missing":
        del sd["blocks.1.ffn.2.weight"]
    elif damage == "unexpected":
        sd["blocks.0.surprise.weight"] = torch.zeros(2)
    elif damage == "int8":
        sd["blocks.0.ffn.2.weight"] = sd["blocks.0.ffn.2.weight"].to(torch.int8)
    elif damage == "i2v":
        sd["img_emb.proj.0.weight"] = torch.ones(8)
    elif damage == "5b":
        sd["patch_embedding.weight"] = torch.zeros(256, 48, 1, 2, 2)
        sd["head.head.weight"] = torch.zeros(48 * 4, 256)
    path = tmp_path / f"broken_{damage}.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("damage, message", [
    ("missing", "1 missing keys \\(first: blocks.1.ffn.net.2.weight\\)"),
    ("unexpected", "1 unexpected keys \\(first: blocks.0.surprise.weight\\)"),
    ("int8", "stored as I8: quantized"),
    ("i2v", "image-to-video .* only text-to-video Wan models are supported"),
    ("5b", "Wan 2.2 TI2V 5B .* not supported yet"),
])
def test_a_file_that_does_not_fit_is_refused_from_its_header(tmp_path, model, damage, message):
    with pytest.raises(CheckpointError, match=message):
        read_wan_config(_damaged(tmp_path, model, damage))


def test_truncated_and_pickle_files_are_refused(tmp_path, model):
    path = write_wan_file(model, tmp_path / "wan.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        read_wan_config(truncated)
    pickle = tmp_path / "wan2.1_t2v.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(CheckpointError, match="pickle-based checkpoints are refused"):
        read_wan_config(pickle)
