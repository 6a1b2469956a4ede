"""Mochi 1 checkpoints in the formats ComfyUI users have load offline, bit for bit.

Small random transformers are written at test time in Genmo's layout (models/diffusion_models,
with and without ComfyUI's ``model.diffusion_model.`` prefix; 1, 2 and 3 blocks, while diffusers'
converter assumes the release's 48), a diffusers-layout file and a diffusers pipeline folder; each
must load into the same MochiTransformer3DModel weights. Broken files are refused from the headers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.loading.mochi import load_mochi_transformer, read_mochi_config
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from checkpoints import (COMFY_PREFIX, make_mochi_diffusers_model, make_wan_diffusers_model, write_diffusers_file,
                         write_diffusers_folder, write_mochi_file, write_wan_file)


def assert_same_weights(loaded, model):
    expected, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("prefix,blocks", [("", 2), (COMFY_PREFIX, 1), (COMFY_PREFIX, 3)])
def test_genmo_layout_loads_exactly(tmp_path, prefix, blocks):
    model = make_mochi_diffusers_model(num_layers=blocks, heads=2, head_dim=8, pooled_dim=8, text_dim=32, seed=blocks)
    path = write_mochi_file(model, tmp_path / "mochi_preview_tiny.safetensors", prefix=prefix)
    config = read_mochi_config(path)
    for name in ("num_layers", "num_attention_heads", "attention_head_dim", "pooled_projection_dim", "text_embed_dim",
                 "time_embed_dim", "in_channels", "patch_size"):
        assert config[name] == model.config[name], name
    assert_same_weights(load_mochi_transformer(path, dtype=torch.float32), model)
    assert families.detect(path) is families.MOCHI


def test_the_writer_agrees_with_diffusers_converter_at_the_released_size():
    # The test writer is independent of diffusers' converter; on the released 48 blocks (meta tensors)
    # the converter runs unaided and must invert it.
    from diffusers import MochiTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_mochi_transformer_checkpoint_to_diffusers

    from checkpoints import diffusers_to_genmo_state_dict

    with torch.device("meta"):
        model = MochiTransformer3DModel()
    # Distinct values per tensor would need real memory; shapes and names are what meta can check.
    state = model.state_dict()
    converted = convert_mochi_transformer_checkpoint_to_diffusers(diffusers_to_genmo_state_dict(state))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_diffusers_file_and_folder_load_exactly(tmp_path):
    model = make_mochi_diffusers_model(seed=4)
    assert_same_weights(load_mochi_transformer(write_diffusers_file(model, tmp_path / "mochi_diffusers.safetensors"),
                                               dtype=torch.float32), model)
    folder = write_diffusers_folder(model, tmp_path / "mochi-1-preview", pipeline=True)
    assert read_mochi_config(folder)["num_layers"] == 2
    assert_same_weights(load_mochi_transformer(folder, dtype=torch.float32), model)


def test_bf16_file_loads_as_its_values(tmp_path):
    model = make_mochi_diffusers_model(seed=5)
    path = write_mochi_file(model, tmp_path / "mochi_bf16.safetensors", prefix=COMFY_PREFIX, dtype=torch.bfloat16)
    loaded = load_mochi_transformer(path, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_broken_files_are_refused_by_name(tmp_path):
    model = make_mochi_diffusers_model(seed=6)
    path = write_mochi_file(model, tmp_path / "mochi.safetensors")
    state = load_file(str(path))
    missing = dict(state)
    del missing["blocks.0.attn.proj_y.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing.safetensors.*missing tensor .blocks.0.attn.proj_y.weight"):
        read_mochi_config(tmp_path / "missing.safetensors")
    extra = dict(state, **{"blocks.0.attn.stray.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys.*blocks.0.attn.stray.weight"):
        read_mochi_config(tmp_path / "extra.safetensors")
    wan = write_wan_file(make_wan_diffusers_model(), tmp_path / "wan.safetensors")
    with pytest.raises(CheckpointError, match="not a Mochi transformer checkpoint"):
        read_mochi_config(wan)
