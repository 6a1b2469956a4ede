"""PixArt checkpoints load offline from the files ComfyUI users have, into the same diffusers model.

Tiny random models (16 heads, as ComfyUI assumes for every PixArt file) are written at test time
in the original layout (bare and with ComfyUI's ``model.diffusion_model.`` prefix), in diffusers'
layout and as a diffusers folder; each must give the original model's weights and outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.loading.pixart import load_pixart_transformer, read_pixart_config
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from pixart_files import COMFY_PREFIX, make_pixart_diffusers_model, write_diffusers_pixart_file, write_original_pixart_file

HEADS, HEAD_DIM = 16, 3  # width 48: divides into 16 heads and by 3 (alpha's size embeddings)


@pytest.fixture(scope="module", params=["alpha", "sigma"])
def model(request):
    return make_pixart_diffusers_model(num_layers=2, heads=HEADS, head_dim=HEAD_DIM, alpha=request.param == "alpha", seed=4)


def _same_weights(loaded, model) -> None:
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def _forward(model, x, context):
    added = None
    if model.use_additional_conditions:
        added = {"resolution": torch.tensor([[512.0, 512.0]]), "aspect_ratio": torch.tensor([[1.0]])}
    with torch.no_grad():
        return model(x, encoder_hidden_states=context, timestep=torch.tensor([500.0]), added_cond_kwargs=added, return_dict=False)[0]


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_original_layout_loads_as_the_diffusers_model(model, prefix, tmp_path):
    path = write_original_pixart_file(model, tmp_path / "pixart.safetensors", prefix=prefix)
    assert families.detect(path) is families.PIXART
    config = read_pixart_config(path)
    assert config["use_additional_conditions"] == model.use_additional_conditions
    assert config["interpolation_scale"] is None  # no pos_embed table: ComfyUI's resolution-dependent interpolation
    loaded = load_pixart_transformer(path, dtype=torch.float32)
    _same_weights(loaded, model)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)
    assert torch.equal(_forward(loaded, x, context), _forward(model, x, context))


def test_a_stored_pos_embed_fixes_the_interpolation_as_comfyui(model, tmp_path):
    path = write_original_pixart_file(model, tmp_path / "pixart512.safetensors", pos_embed_grid=32)  # the 512 px model
    config = read_pixart_config(path)
    assert (config["sample_size"], config["interpolation_scale"]) == (64, 1)


def test_diffusers_file_and_folder_load(model, tmp_path):
    file = write_diffusers_pixart_file(model, tmp_path / "diffusers.safetensors")
    _same_weights(load_pixart_transformer(file, dtype=torch.float32), model)
    folder = tmp_path / "pipeline" / "transformer"
    write_diffusers_pixart_file(model, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**dict(model.config), "_class_name": "PixArtTransformer2DModel"}))
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert families.detect(tmp_path / "pipeline") is families.PIXART
    _same_weights(load_pixart_transformer(tmp_path / "pipeline", dtype=torch.float32), model)


def test_bad_files_are_refused_clearly(model, tmp_path):
    good = write_original_pixart_file(model, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_pixart_config(truncated)
    pickle = tmp_path / "PixArt-XL-2-1024-MS.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        read_pixart_config(pickle)
    other = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="not a PixArt"):
        read_pixart_config(other)
    # A block that lost its cross-attention: refused by the mapping check, before any weight is read.
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("blocks.1.cross_attn.")}
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(CheckpointError, match="missing keys.*transformer_blocks.1.attn2"):
        read_pixart_config(broken)
