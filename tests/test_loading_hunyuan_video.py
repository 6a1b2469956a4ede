"""HunyuanVideo 1.0 text-to-video checkpoints in the formats ComfyUI users have load offline, bit for bit.

Small random transformers (width 256 = 2 heads of HunyuanVideo's 128, rotary axes (16, 56, 56))
are written at test time in the original HunyuanVideo layout (models/diffusion_models, with and
without ComfyUI's ``model.diffusion_model.`` prefix), a diffusers-layout file and a diffusers
pipeline folder; each must load into the same HunyuanVideoTransformer3DModel weights. The width is
not the released 3072, which diffusers' converter assumes for the single-stream blocks: the loader
splits those itself. Other HunyuanVideo variants and broken files are refused from the headers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.loading.hunyuan_video import load_hunyuan_video_transformer, read_hunyuan_video_config
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from checkpoints import (COMFY_PREFIX, make_flux_diffusers_model, make_hunyuan_video_diffusers_model, make_wan_diffusers_model,
                         write_diffusers_file, write_diffusers_folder, write_hunyuan_video_file, write_wan_file)

HUNYUAN = dict(num_layers=1, num_single_layers=2, num_refiner_layers=2, heads=2, head_dim=128, rope_axes_dim=(16, 56, 56),
               text_dim=48, pooled_dim=40, mlp_ratio=2.0)


def assert_same_weights(loaded, model):
    expected = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def model():
    return make_hunyuan_video_diffusers_model(**HUNYUAN, seed=1)


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_original_layout_loads_exactly(tmp_path, model, prefix):
    path = write_hunyuan_video_file(model, tmp_path / "hunyuan_video_t2v_tiny.safetensors", prefix=prefix)
    config = read_hunyuan_video_config(path)
    for name in ("num_layers", "num_single_layers", "num_refiner_layers", "num_attention_heads", "attention_head_dim",
                 "mlp_ratio", "text_embed_dim", "pooled_projection_dim", "guidance_embeds", "in_channels", "out_channels",
                 "patch_size", "patch_size_t"):
        assert config[name] == model.config[name], name
    assert tuple(config["rope_axes_dim"]) == tuple(model.config.rope_axes_dim)
    assert_same_weights(load_hunyuan_video_transformer(path, dtype=torch.float32), model)
    assert families.detect(path) is families.HUNYUAN_VIDEO


def test_the_writer_agrees_with_diffusers_converter_at_the_released_width():
    # The test writer is independent of diffusers' converter (which the loader uses). At the released
    # width (3072) the converter needs no help: both must be inverses there, checked on meta tensors.
    from diffusers import HunyuanVideoTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    from checkpoints import diffusers_to_hunyuan_video_state_dict

    with torch.device("meta"):
        full = HunyuanVideoTransformer3DModel(num_layers=1, num_single_layers=1, num_refiner_layers=1)
    state = full.state_dict()
    back = convert_hunyuan_video_transformer_to_diffusers(diffusers_to_hunyuan_video_state_dict(state))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_diffusers_file_and_folder_load_exactly(tmp_path, model):
    file = write_diffusers_file(model, tmp_path / "hunyuan_video_diffusers.safetensors")
    folder = write_diffusers_folder(model, tmp_path / "pipeline", pipeline=True)
    for path in (file, folder):
        assert_same_weights(load_hunyuan_video_transformer(path, dtype=torch.float32), model)
        assert families.detect(path) is families.HUNYUAN_VIDEO


def test_a_folder_config_sets_the_heads_and_rotary_axes(tmp_path):
    # Shapes cannot tell heads from head width, nor the rotary axes; a diffusers folder's config.json can.
    model = make_hunyuan_video_diffusers_model(heads=4, head_dim=16, rope_axes_dim=(4, 6, 6), seed=2)
    folder = write_diffusers_folder(model, tmp_path / "folder")
    config = read_hunyuan_video_config(folder)
    assert (config["num_attention_heads"], config["attention_head_dim"], tuple(config["rope_axes_dim"])) == (4, 16, (4, 6, 6))
    assert_same_weights(load_hunyuan_video_transformer(folder, dtype=torch.float32), model)


def test_an_image_to_video_folder_is_refused_by_its_config(tmp_path, model):
    import json

    folder = write_diffusers_folder(model, tmp_path / "i2v")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_condition_type": "token_replace"}))
    with pytest.raises(CheckpointError, match="image_condition_type is 'token_replace': an image-to-video model"):
        read_hunyuan_video_config(folder)


def test_bfloat16_load(tmp_path, model):
    path = write_hunyuan_video_file(model, tmp_path / "hv.safetensors", prefix=COMFY_PREFIX)
    loaded = load_hunyuan_video_transformer(path, dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())


def test_family_detection_tells_hunyuan_video_from_flux_and_wan(tmp_path, model):
    hunyuan = write_hunyuan_video_file(model, tmp_path / "hv.safetensors", prefix=COMFY_PREFIX)
    wan = write_wan_file(make_wan_diffusers_model(num_layers=1, heads=2, head_dim=128, ffn_dim=32, text_dim=32),
                         tmp_path / "wan.safetensors", prefix=COMFY_PREFIX)
    flux = write_diffusers_file(make_flux_diffusers_model(), tmp_path / "flux_diffusers.safetensors")
    assert families.detect(hunyuan) is families.HUNYUAN_VIDEO
    assert families.detect(wan) is families.WAN
    assert families.detect(flux) is families.FLUX
    with pytest.raises(CheckpointError, match="not a HunyuanVideo transformer checkpoint"):
        read_hunyuan_video_config(wan)


def _damaged(tmp_path, model, damage: str):
    sd = load_file(str(write_hunyuan_video_file(model, tmp_path / "hv.safetensors")))
    if damage == "missing":
        del sd["single_blocks.1.linear2.weight"]
    elif damage == "unexpected":
        sd["double_blocks.0.surprise.weight"] = torch.zeros(2)
    elif damage == "int8":
        sd["double_blocks.0.img_mlp.fc2.weight"] = sd["double_blocks.0.img_mlp.fc2.weight"].to(torch.int8)
    elif damage in ("i2v", "skyreels"):
        channels = 33 if damage == "i2v" else 32
        sd["img_in.proj.weight"] = torch.zeros(256, channels, 1, 2, 2)
    elif damage == "1.5":
        sd["byt5_in.fc1.weight"] = torch.zeros(8, 8)
    elif damage == "image":
        sd["img_in.proj.weight"] = torch.zeros(256, 16, 2, 2)
    path = tmp_path / f"broken_{damage}.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("damage, message", [
    ("missing", "1 missing keys \\(first: single_transformer_blocks.1.proj_out.weight\\)"),
    ("unexpected", "1 unexpected keys \\(first: transformer_blocks.0.surprise.weight\\)"),
    ("int8", "stored as I8: quantized"),
    ("i2v", "HunyuanVideo image-to-video model .* only HunyuanVideo 1.0 text-to-video models are supported"),
    ("skyreels", "SkyReels image-to-video model"),
    ("1.5", "HunyuanVideo 1.5 .* only HunyuanVideo 1.0 text-to-video"),
    ("image", "2-D patches \\(HunyuanImage 2.1\\?\\)"),
])
def test_a_file_that_does_not_fit_is_refused_from_its_header(tmp_path, model, damage, message):
    with pytest.raises(CheckpointError, match=message):
        read_hunyuan_video_config(_damaged(tmp_path, model, damage))
