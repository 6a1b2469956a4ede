"""HunyuanDiT checkpoints load offline from the files ComfyUI users have, into the same diffusers model.

Tiny random models (16 heads, as ComfyUI assumes for every HunyuanDiT file; DiT-g/2's MLP ratio
4.3637) are written at test time in the original layout (bare and with ComfyUI's
``model.diffusion_model.`` prefix), in diffusers' layout and as a diffusers folder; each must give
the original model's weights and outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.loading.hunyuan_dit import load_hunyuan_dit_transformer, read_hunyuan_dit_config
from comfy_xdit.loading.safetensors_files import CheckpointError
from comfy_xdit.models import families
from hunyuan_dit_files import (COMFY_PREFIX, make_hunyuan_dit_diffusers_model, write_diffusers_hunyuan_dit_file,
                               write_original_hunyuan_dit_file)

HEADS, HEAD_DIM = 16, 4  # width 64; the 2-D rotary needs a head width divisible by 4


@pytest.fixture(scope="module", params=["v1.1", "v1.2"])
def model(request):
    return make_hunyuan_dit_diffusers_model(num_layers=4, heads=HEADS, head_dim=HEAD_DIM, meta=request.param == "v1.1",
                                            mlp_ratio=4.3637, seed=4)


def _same_weights(loaded, model) -> None:
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def _forward(model, x):
    from comfy_xdit.models.hunyuan_dit import comfy_rotary

    g = torch.Generator().manual_seed(1)
    meta = model.config.use_style_cond_and_image_meta_size
    with torch.no_grad():
        return model(x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 7, 24, generator=g),
                     text_embedding_mask=torch.ones(1, 7), encoder_hidden_states_t5=torch.randn(1, 9, 32, generator=g),
                     text_embedding_mask_t5=torch.ones(1, 9),
                     image_meta_size=torch.tensor([[512.0, 512.0, 512.0, 512.0, 0.0, 0.0]]) if meta else None,
                     style=torch.zeros(1, dtype=torch.long) if meta else None,
                     image_rotary_emb=comfy_rotary(HEAD_DIM, 8, 8, 2, "cpu"), return_dict=False)[0]


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_original_layout_loads_as_the_diffusers_model(model, prefix, tmp_path):
    path = write_original_hunyuan_dit_file(model, tmp_path / "hunyuan_dit.safetensors", prefix=prefix)
    assert families.detect(path) is families.HUNYUAN_DIT
    config = read_hunyuan_dit_config(path)
    assert config["use_style_cond_and_image_meta_size"] == model.config.use_style_cond_and_image_meta_size
    assert (config["text_len"], config["text_len_t5"], config["num_layers"]) == (7, 9, 4)
    loaded = load_hunyuan_dit_transformer(path, dtype=torch.float32)
    _same_weights(loaded, model)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_forward(loaded, x), _forward(model, x))


def test_diffusers_file_and_folder_load(model, tmp_path):
    file = write_diffusers_hunyuan_dit_file(model, tmp_path / "diffusers.safetensors")
    _same_weights(load_hunyuan_dit_transformer(file, dtype=torch.float32), model)
    folder = tmp_path / "pipeline" / "transformer"
    write_diffusers_hunyuan_dit_file(model, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**dict(model.config), "_class_name": "HunyuanDiT2DModel"}))
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert families.detect(tmp_path / "pipeline") is families.HUNYUAN_DIT
    _same_weights(load_hunyuan_dit_transformer(tmp_path / "pipeline", dtype=torch.float32), model)


def test_bad_files_are_refused_clearly(model, tmp_path):
    good = write_original_hunyuan_dit_file(model, tmp_path / "good.safetensors")
    pickle = tmp_path / "HunyuanDiT-v1.2.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        read_hunyuan_dit_config(pickle)
    other = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="not a HunyuanDiT"):
        read_hunyuan_dit_config(other)
    # A block that lost its cross-attention: refused by the mapping check, before any weight is read.
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("blocks.1.attn2.")}
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(CheckpointError, match="missing keys.*blocks.1.attn2"):
        read_hunyuan_dit_config(broken)
